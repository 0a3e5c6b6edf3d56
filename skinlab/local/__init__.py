"""The local backend: an emulator of the YouCam Skin Analysis API v2 on loopback.

``skinlab.local`` serves the real service's HTTP contract (``api-contract.md``) from this
machine, so skinlab works with no API key and no internet. Scores come from the local
measurement engine (:mod:`skinlab.local.engine`), which is imported only when the first task
runs, never when this package is imported.

>>> import skinlab.local
>>> with skinlab.local.serve(task_duration_s=0) as srv:   # doctest: +SKIP
...     print(srv.url)                                    # http://127.0.0.1:<port>

:class:`LocalServer` binds 127.0.0.1 on a free port and serves in a daemon thread. Every
setting of :class:`ServerConfig` can be passed as a keyword argument.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

if TYPE_CHECKING:  # pragma: no cover
    from .server import Faults, ServerConfig, SkinlabApp

__all__ = ["LocalServer", "ServerConfig", "Faults", "LatencyModel", "SkinlabApp", "serve"]

log = logging.getLogger("skinlab.local")


def __getattr__(name: str) -> Any:
    # The server module is light too, but keep ``import skinlab.local`` minimal.
    if name in ("ServerConfig", "Faults", "LatencyModel", "SkinlabApp"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RequestHandler(WSGIRequestHandler):
    """wsgiref's handler, quiet, with a read timeout and the socket exposed to the app."""

    timeout = 60  # seconds a client may stall while sending a request

    def get_environ(self) -> dict:
        environ = super().get_environ()
        if self.headers.get("content-type") is None:
            environ["CONTENT_TYPE"] = ""  # wsgiref would invent "text/plain"
        environ["skinlab.connection"] = self.connection  # lets fault injection drop the connection
        return environ

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error from %s", client_address, exc_info=True)


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalServer:
    """The emulator bound to a local port.

    Parameters
    ----------
    config : ServerConfig, optional
        The settings; keyword ``settings`` override single fields of it.
    host : str
        Address to bind. Only loopback addresses are allowed unless ``allow_remote_bind=True``.
    port : int
        0 (the default) picks a free port.

    Attributes
    ----------
    url : str
        The bound base URL, e.g. ``http://127.0.0.1:50123`` (available after :meth:`start`).
    app : SkinlabApp
        The WSGI application, for inspecting state in tests.
    """

    def __init__(self, config: "ServerConfig | None" = None, *, host: str = "127.0.0.1", port: int = 0,
                 **settings: Any) -> None:
        from .server import ServerConfig, SkinlabApp
        from ..errors import ConfigurationError

        if config is None:
            config = ServerConfig(**settings)
        elif settings:
            import dataclasses

            config = dataclasses.replace(config, **settings)
        if not _is_loopback(host) and not config.allow_remote_bind:
            raise ConfigurationError(
                f"Refusing to bind the local emulator to {host!r}: it accepts any API key. "
                "Bind 127.0.0.1, or pass allow_remote_bind=True if you really mean it."
            )
        self.config = config
        self.host = host
        self.port = port
        self.app = SkinlabApp(config)
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def _bind(self) -> None:
        if self._httpd is not None:
            return
        cls = _ThreadingServer6 if ":" in self.host else _ThreadingServer
        httpd = cls((self.host, self.port), _RequestHandler)
        httpd.set_app(self.app)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.app.bound_url = f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL clients should use (``public_base_url`` when configured)."""
        if self._httpd is None:
            raise RuntimeError("the server is not started; call start() first")
        return self.app.base_url()

    @property
    def faults(self) -> "Faults":
        """This server's fault injector (see :class:`skinlab.local.server.Faults`)."""
        return self.app.faults

    def start(self) -> "LocalServer":
        """Bind and serve in a daemon thread; return ``self``. Starting twice is a no-op."""
        if self._thread is not None:
            return self
        self._bind()
        assert self._httpd is not None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"skinlab-local-{self.port}", daemon=True,
        )
        self._thread.start()
        self.app.warm_up()
        log.info("skinlab local emulator serving at %s", self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (Ctrl-C) or :meth:`stop`."""
        self._bind()
        assert self._httpd is not None
        self.app.warm_up()
        log.info("skinlab local emulator serving at %s", self.url)
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` seconds pass); True once it has stopped."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stop(self) -> None:
        """Stop serving and release the port and the worker threads."""
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._close()

    def _close(self) -> None:
        if self._httpd is not None:
            self._httpd.server_close()
        self._httpd = None
        self._thread = None
        self.app.close()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.app.base_url() if self._httpd is not None else "stopped"
        return f"<LocalServer {state}>"


@contextlib.contextmanager
def serve(config: "ServerConfig | None" = None, *, host: str = "127.0.0.1", port: int = 0,
          **settings: Any) -> Iterator[LocalServer]:
    """Run the emulator for the duration of a ``with`` block and yield the started server.

    >>> with serve(task_duration_s=0) as srv:   # doctest: +SKIP
    ...     requests.get(srv.url + "/s2s/v1.0/client/credit", headers={"Authorization": "Bearer k"})
    """
    server = LocalServer(config, host=host, port=port, **settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()
