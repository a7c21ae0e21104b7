"""The node's listener: its runner (connection timeouts) and an aiohttp site that caps open connections and sets the backlog.

A connection beyond `max_connections` is answered at once with a canned 503 (JSON,
Retry-After) and closed, without an HTTP parser, a request object or a handler task:
the cheapest refusal the node can make that a client still reads as "overloaded",
where the kernel's own refusal (a full accept backlog) drops the SYN and the client
retries a second later, late, without being told.
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

LINGERING_S = 1.0
SHUTDOWN_TIMEOUT_S = 3.0
_BODY = json.dumps({"error": "too many open connections to this node; retry later"}).encode()
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: the canned answer, then closed."""

    def __init__(self, site: "CappedSite"):
        self.site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.site.refused += 1
        transport.write(REFUSAL)
        transport.close()


class CappedSite(web.TCPSite):
    """TCPSite whose protocol factory refuses connections beyond `max_connections`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int, backlog: int):
        super().__init__(runner, host, port, backlog=backlog)
        self.max_connections, self.refused = max_connections, 0

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        if len(server.connections) >= self.max_connections:
            return _Refuse(self)
        return server()

    async def start(self) -> None:
        # BaseSite.start registers the site with the runner; TCPSite.start would
        # listen with the runner's server as the factory, which has no cap.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, backlog=self._backlog,
                                                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def make_runner(app: web.Application, server_config) -> web.AppRunner:
    """The app's runner with the server's connection timeouts (a ServerConfig).

    aiohttp arms its keep-alive timer when a connection opens and again after each answer,
    and closes the connection if no complete request header has come when it fires: so
    it is also the header timeout that keeps slow-header (slowloris) connections from
    being held for ever."""
    from .http import NodeRunner        # aiohttp's own refusals answered in JSON
    # shutdown_timeout: runner.cleanup runs after the runtime has drained and answered every
    # admitted input, so what is left are kept-alive connections; aiohttp's default waits 60 s
    # for them, and a node Ctrl-C'd under load was seen still waiting after 30 s.
    # lingering_time: after an answer that left the body unread (a refusal before reading it, a
    # 413), aiohttp reads and drops the rest of the body this long before closing, so that the
    # client reads the answer rather than a reset; its default of 10 s kept a refused connection
    # (and its slot of server.max_connections) for as long as a stalled sender held it.
    return NodeRunner(app, access_log=None, keepalive_timeout=server_config.idle_timeout_s,
                      shutdown_timeout=SHUTDOWN_TIMEOUT_S, lingering_time=LINGERING_S)


def make_site(runner: web.AppRunner, server_config) -> CappedSite:
    return CappedSite(runner, server_config.host, server_config.port,
                      max_connections=server_config.max_connections, backlog=server_config.backlog)
