"""The pool as a trio client: ``from keyrotor.transports.trio import Client``.

The same class as ``keyrotor.transports.asyncio.Client`` (written once on anyio).
"""

from ._async import AsyncClient as Client
from ._async import StreamResponse
from ._http import HTTPOptions, Response
from .errors import KeyrotorError, NoKeyAvailable, UpstreamError

__all__ = [
    "Client",
    "HTTPOptions",
    "KeyrotorError",
    "NoKeyAvailable",
    "Response",
    "StreamResponse",
    "UpstreamError",
]
