"""A small asyncio TCP proxy that puts network faults between the library and PostgreSQL.

It listens on 127.0.0.1 (an ephemeral port) and forwards every connection to one upstream server on a
loopback address. While it runs, a test can:

- add ``latency`` (seconds) before each forwarded chunk, in both directions;
- reset connections at random (``reset_probability`` per forwarded chunk) or all at once
  (``reset_all()``: RST, as a crashed middlebox would), or close them (``close_all()``: FIN);
- ``stall()``: stop forwarding on every connection, existing and new, without closing anything
  (a half-open / black-holed network), until ``resume()``; ``hold_answers()`` stops only the
  server-to-client direction (the server's words are in flight while the client sends);
- ``hold_close``: when the server closes a connection, keep the client's side open, so the client
  has the server's last words (e.g. a FATAL message) but no end-of-file; ``release_held()`` ends them.

Only loopback addresses are accepted: these tests never send traffic anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from dash_storage.core.config import Settings

__all__ = ["FaultProxy", "ProxyStats", "proxy_for"]

_CHUNK = 65536


@dataclass
class ProxyStats:
    connections: int = 0  # client connections accepted
    resets: int = 0  # connections reset (random or on command)
    closed: int = 0  # connections closed on command
    held: int = 0  # client sides kept open after the server closed (hold_close)
    chunks: int = 0  # chunks forwarded


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's and the server's stream writers."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    done: bool = False
    held: bool = False


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN (SO_LINGER 0), the way a reset connection looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"the fault proxy only forwards to loopback addresses, not {host!r}")


def proxy_for(settings: Settings, **options: Any) -> FaultProxy:
    """A proxy in front of the test server (``async with proxy_for(settings) as proxy``).

    Skips the test when there is no server on a loopback TCP address to stand in for: the embedded
    server (Unix socket), or a DATABASE_URL (which would win over the proxy's host and port).
    """
    import pytest

    if settings.database_url is not None or not settings.postgres_host:
        pytest.skip("the fault proxy needs the test server at POSTGRES_HOST (a loopback TCP address)")
    try:
        return FaultProxy(settings.postgres_host, settings.postgres_port, **options)
    except ValueError as exc:
        pytest.skip(str(exc))


class FaultProxy:
    """``async with FaultProxy("127.0.0.1", 5432) as proxy:`` then connect to ``proxy.port``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        latency: float = 0.0,
        reset_probability: float = 0.0,
        seed: int | None = None,
    ) -> None:
        _check_loopback(upstream_host)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.latency = latency
        self.reset_probability = reset_probability
        self.hold_close = False
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._to_server = asyncio.Event()
        self._to_server.set()
        self._to_client = asyncio.Event()
        self._to_client.set()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def overrides(self) -> dict[str, Any]:
        """The settings that connect through this proxy: ``make_database(**proxy.overrides, ...)``."""
        return {"postgres_host": "127.0.0.1", "postgres_port": self.port}

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and reset every connection still open."""
        self.resume()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._end(link, reset=True)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults -----------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections currently open (held ones included)."""
        return len(self._links)

    @property
    def stalled(self) -> bool:
        return not (self._to_server.is_set() and self._to_client.is_set())

    def stall(self) -> None:
        """Stop forwarding bytes on every connection, existing and new; close nothing."""
        self._to_server.clear()
        self._to_client.clear()

    def hold_answers(self) -> None:
        """Stop forwarding what the server sends (the client's bytes still go through)."""
        self._to_client.clear()

    def resume(self) -> None:
        self._to_server.set()
        self._to_client.set()

    def _end_all(self, *, reset: bool) -> int:
        links = [link for link in self._links if not link.done]
        for link in links:
            self._end(link, reset=reset)
        return len(links)

    def reset_all(self) -> int:
        """Reset every open connection now; returns how many."""
        n = self._end_all(reset=True)
        self.stats.resets += n
        return n

    def close_all(self) -> int:
        """Close every open connection (FIN to both sides); returns how many."""
        n = self._end_all(reset=False)
        self.stats.closed += n
        return n

    def release_held(self) -> int:
        """Close the client sides kept open by ``hold_close``; returns how many."""
        held = [link for link in self._links if link.held]
        for link in held:
            link.held = False
            self._end(link, reset=False)
        return len(held)

    # -- forwarding -------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _abort(client_writer)
            return
        link = _Link(client_writer, server_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(client_reader, server_writer, link, to_server=True)),
            asyncio.create_task(self._pump(server_reader, client_writer, link, to_server=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            for task in link.tasks:
                task.cancel()
            if not link.held:
                self._end(link, reset=False)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, to_server: bool
    ) -> None:
        flowing = self._to_server if to_server else self._to_client
        while not link.done:
            try:
                data = await reader.read(_CHUNK)
            except (ConnectionError, OSError):
                self._end(link, reset=True)
                return
            if not data:
                break
            await flowing.wait()  # stalled: hold the bytes, keep the sockets open
            if self.latency:
                await asyncio.sleep(self.latency)
            if link.done:
                return
            if self.reset_probability and self._random.random() < self.reset_probability:
                self.stats.resets += 1
                self._end(link, reset=True)
                return
            try:
                writer.write(data)
                self.stats.chunks += 1
                await writer.drain()
            except (ConnectionError, OSError):
                if to_server:
                    # The server is gone: drop what the client sends, but let the server's last
                    # words (maybe still held) reach the client before the connection ends.
                    return
                self._end(link, reset=True)
                return
        if not to_server and self.hold_close and not link.done:
            # The server hung up: the client keeps what it was sent but hears nothing more.
            link.held = True
            self.stats.held += 1
            with contextlib.suppress(OSError):
                link.server.close()
            return
        if not link.held:
            self._end(link, reset=False)

    def _end(self, link: _Link, *, reset: bool) -> None:
        if link.done and not link.held:
            return
        link.done = True
        link.held = False
        for writer in (link.client, link.server):
            with contextlib.suppress(OSError, RuntimeError):
                if reset:
                    _abort(writer)
                else:
                    writer.close()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._links.discard(link)
