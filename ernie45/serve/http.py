"""The HTTP server in front of the app: uvicorn with a deadline for a request's headers (a client that opens a
connection and sends nothing, or a byte at a time, is closed), keep-alive and concurrency limits."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request's headers have not all arrived within
    `header_timeout` seconds of the connection opening or of its last response."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._waiting_for = self.cycle  # headers are in once uvicorn starts a new request cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._waiting_for:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deadline is None and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def server(app: Any, *, host: str, port: int, log_level: str = "warning", header_timeout: float = 10.0,
           keep_alive: int = 5, max_connections: int | None = 512) -> uvicorn.Server:  # fmt: skip
    """A uvicorn server for `app`: headers within `header_timeout` s, idle keep-alive connections closed after
    `keep_alive` s, and beyond `max_connections` open connections (or running requests) new requests get 503."""
    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                            timeout_keep_alive=keep_alive, limit_concurrency=max_connections)  # fmt: skip
    return uvicorn.Server(config)
