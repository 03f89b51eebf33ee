"""The OpenAI-compatible HTTP server (`ropeway serve`)."""

from .app import build_app
from .context import ServerContext, ServerSettings

__all__ = ["build_app", "ServerContext", "ServerSettings"]
