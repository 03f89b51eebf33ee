"""The OpenAI-compatible HTTP server (`ropeway serve`): app.build_app over a context.ServerContext.

Nothing is imported here, so `ropeway --help` (server/cli.py) loads neither torch nor the engine."""
