"""The HTTP layer: an OpenAI-compatible API and a web chat page over `ernie45.engine`."""

from .app import create_app
from .media import MediaPolicy

__all__ = ["MediaPolicy", "create_app"]
