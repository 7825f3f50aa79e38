"""A stream body for the server and ASGI tests: says when its next chunk is in hand."""

from __future__ import annotations

import anyio


class Lookahead:
    """A stream that says whether its next chunk is in hand (``ready``), as the
    proxy's relay does; the chunk at index ``gated`` waits for ``gate``."""

    def __init__(self, parts: list[bytes], gated: int = -1) -> None:
        self.parts = parts
        self.index = 0
        self.gated = gated
        self.gate = anyio.Event()

    @property
    def ready(self) -> bool:
        return self.index != self.gated or self.gate.is_set()

    def __aiter__(self) -> Lookahead:
        return self

    async def __anext__(self) -> bytes:
        if self.index == self.gated:
            await self.gate.wait()
        if self.index == len(self.parts):
            raise StopAsyncIteration
        self.index += 1
        return self.parts[self.index - 1]
