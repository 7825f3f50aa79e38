"""keyrotor: pool many LLM API keys behind one client or proxy.

- ``keyrotor.core``: the sans-IO rotation and health state machine;
- ``keyrotor.transports.sync`` / ``.asyncio`` / ``.trio``: clients over real HTTP;
- ``keyrotor.adapters``: the proxy (``keyrotor serve``) and its configuration;
- ``keyrotor.testing``: a fake OpenRouter for tests, demos and benchmarks.
"""

__version__ = "0.1.0"
