"""Clients that drive the core over real HTTP: import ``Client`` from
``keyrotor.transports.sync``, ``keyrotor.transports.asyncio`` or
``keyrotor.transports.trio`` (see docs/transports.md). Adapters that build on a
client import from ``keyrotor.transports.api``, never from a ``_`` module."""
