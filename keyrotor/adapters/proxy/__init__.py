"""The bundled OpenAI-compatible proxy: an h11 server on trio in front of the pool."""
