"""OpenAI-compatible HTTP server over the engine (issue 5): `server.build_app(engine)`."""
