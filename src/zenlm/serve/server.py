"""Running the app: the server's limits, uvicorn set up to keep them, and a server on a background thread.

What one client may hold of the server, and for how long (all but template_timeout are ``zenlm serve`` flags):

    max_request_bytes   a request body larger than this is answered 413 before it is read (Content-Length),
                        or as soon as the bytes read pass it (chunked bodies)
    request_timeout     seconds a client has to send its request: the headers from the moment it connects (or
                        its previous answer ended), the body from the moment the headers arrived; then 408 or
                        the connection is closed. Idle kept-alive connections close after 5 s
    max_connections     open connections; one more is answered 503 and closed at once, before it is read, so
                        idle or half-sent connections cannot use up the process's file descriptors (the limit
                        is also kept below the descriptor limit, RLIMIT_NOFILE). uvicorn's own
                        limit_concurrency could not do this: it answers 503 only once a whole request arrived
    max_embedding_inputs  inputs of one /v1/embeddings request (OpenAI's limit is 2,048)
    template_timeout    seconds the model's chat template may take to render one conversation (it runs in a
                        worker process, zenlm.chat_template, under a memory limit; past this it is killed)

On SIGTERM or Ctrl+C the server stops accepting, closes idle and half-sent connections (headers or body
still arriving), and gives running requests ``SHUTDOWN_GRACE_S`` seconds to finish.

The event loop's "socket.accept() out of system resource" error (file descriptors ran out anyway, for example
to other threads) is logged at most once per ``LOG_EVERY_S`` seconds with a count, instead of a traceback per
failed accept, and each of uvicorn's warnings (such as "Invalid HTTP request received.") is too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from zenlm.errors import ConfigError

log = logging.getLogger("zenlm.serve")

SHUTDOWN_GRACE_S = 10  # seconds running requests get to finish after SIGTERM
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this many seconds
MAX_HEADER_BYTES = 64 << 10  # request line + headers
FD_HEADROOM = 64  # file descriptors kept free of connections (model files, pipes, the template worker)
LOG_EVERY_S = 10.0
BACKLOG = 2048  # connections the kernel queues before they are accepted (uvicorn's default)


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the server (see the module docstring)."""

    max_request_bytes: int = 4 << 20
    request_timeout: float = 30.0
    max_connections: int = 512
    max_embedding_inputs: int = 2048
    template_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_connections", "max_embedding_inputs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout}.")


def connection_limit(limits: Limits) -> int:
    """``limits.max_connections``, lowered to leave FD_HEADROOM of this process's file-descriptor limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):  # no RLIMIT_NOFILE on this platform
        return limits.max_connections
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft - FD_HEADROOM))


_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"connection: close\r\ncontent-length: 38\r\n\r\ntoo many open connections; retry later")


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a connection limit and a deadline for each request's headers.

    uvicorn times out only idle kept-alive connections, after a response: a client that connects and sends
    nothing, or half a request line, would hold its connection (and file descriptor) forever. Here a timer
    armed when the connection opens and after each response closes it unless the next request's headers
    have arrived by then (a new request cycle began)."""

    max_open: int = 512
    header_timeout: float = 30.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_open:
            _warn_rate_limited("connections", "%d connections are open (--max-connections); closing new ones",
                               len(self.connections))
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Stopping: uvicorn closes idle connections and lets running requests finish; a request still
        sending its body has not started, so its connection is closed too (its handler sees a disconnect)
        rather than holding the shutdown until the body or the grace time runs out."""
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_started:
            self.transport.close()
            return
        super().shutdown()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late, self.cycle)

    def _headers_late(self, cycle: object) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no new request since the timer was armed
            self.transport.close()


_last_warned: dict[str, list[float]] = {}  # key -> [time of the last line, calls since]


def _warn_rate_limited(key: str, msg: str, *args: object) -> None:
    """``log.warning(msg)`` at most once per LOG_EVERY_S for ``key``, saying how many were left out."""
    now = time.monotonic()
    last = _last_warned.setdefault(key, [-LOG_EVERY_S, 0])
    last[1] += 1
    if now - last[0] >= LOG_EVERY_S:
        skipped = last[1] - 1
        log.warning(msg + (f" ({skipped} more like this in the last {LOG_EVERY_S:g} s)" if skipped else ""), *args)
        last[0], last[1] = now, 0


class _OncePerInterval(logging.Filter):
    """Lets each distinct message through at most once per LOG_EVERY_S (uvicorn's "Invalid HTTP request
    received." would otherwise give a hostile client a log line per request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        now, key = time.monotonic(), "uvicorn:" + str(record.msg)
        last = _last_warned.setdefault(key, [-LOG_EVERY_S, 0])
        if now - last[0] < LOG_EVERY_S:
            return False
        last[0] = now
        return True


def _loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Out-of-descriptor accept errors are rate-limited; everything else goes to asyncio's default handler."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        _warn_rate_limited("accept", "cannot accept connections: %s", exc)
        return
    loop.default_exception_handler(context)


class _Server(uvicorn.Server):
    """uvicorn.Server that installs the rate-limited loop exception handler when it starts."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(_loop_exception_handler)
        await super().startup(sockets)


def make_server(app: Any, limits: Limits, *, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``app`` that keeps ``limits`` (see the module docstring)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _OncePerInterval) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_OncePerInterval())
    protocol = type("GuardedH11", (_GuardedH11,), {"max_open": connection_limit(limits),
                                                   "header_timeout": limits.request_timeout})
    # log_config=None: uvicorn's default would run logging.config.dictConfig, which closes every logging
    # handler of the process (a notebook's, an application's, or one whose stream is a redirected
    # sys.stderr); uvicorn's records go to the root logger's handlers instead (`zenlm serve` sets those up)
    config = uvicorn.Config(
        app, http=protocol, log_config=None, log_level=log_level, access_log=False, lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, backlog=BACKLOG,
    )
    return _Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one) and listening, so clients that connect before
    the server runs wait in the backlog instead of being refused; ConfigError when the address is taken."""
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections of
    # a socket whose protocol says TCP; with proto 0 every answer on a kept-alive connection waited ~40 ms
    # for the client's delayed ACK between its header and body writes
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port: give one from 1 to 65535 (0: any free one).")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use; stop what runs there or pick another "
                              "with --port.") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}).") from None
    sock.listen(BACKLOG)
    return sock


class ServerThread:
    """Run ``app`` with uvicorn on a background thread (tests, benchmarks, notebooks).

    ``with ServerThread(app) as srv: srv.url`` — binds ``host`` on a free port (or ``port``), waits until
    the server accepts connections, and shuts it down on exit. The app's limits (``app.state.limits``,
    set by create_app) are kept as ``zenlm serve`` keeps them.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, getattr(app.state, "limits", Limits()))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=SHUTDOWN_GRACE_S + 5)
        self.sock.close()


__all__ = ["Limits", "ServerThread", "bind", "connection_limit", "make_server"]
