"""The local backend: an emulator of the YouCam Skin Analysis API v2 on loopback.

``skinlab.local`` serves the real service's HTTP contract (``api-contract.md``) from this
machine, so skinlab works with no API key and no internet. Scores come from the local
measurement engine (:mod:`skinlab.local.engine`), which is imported only when the first task
runs, never when this package is imported.

>>> import skinlab.local
>>> with skinlab.local.serve(task_duration_s=0) as srv:   # doctest: +SKIP
...     print(srv.url)                                    # http://127.0.0.1:<port>

:func:`measure` runs the engine in-process and returns its physical measurements (mm, ΔL*,
fractions, ... with unit and region) as a tidy pandas DataFrame:

>>> df = skinlab.local.measure("face.jpg", ["hd_wrinkle", "hd_dark_circle"])   # doctest: +SKIP

:class:`LocalServer` binds 127.0.0.1 on a free port and serves in a daemon thread. Every
setting of :class:`ServerConfig` can be passed as a keyword argument.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .._net import is_loopback_host as _is_loopback

if TYPE_CHECKING:  # pragma: no cover
    from .server import Faults, ServerConfig, SkinlabApp

__all__ = ["LocalServer", "ServerConfig", "Faults", "LatencyModel", "SkinlabApp", "serve", "measure"]

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


#: the ``backend`` column of :func:`measure`: these are local measurements, never YouCam numbers
MEASURE_BACKEND = "skinlab-local-engine"
_MEASURE_COLUMNS = ["concern", "action", "quantity", "region", "value", "unit", "kind", "proxy", "resolvable",
                    "category", "key", "method", "backend", "engine_version", "face_backend", "px_per_mm"]


def _load_upright_rgb(image: Any):
    """A path, bytes, binary file object, PIL image or HxWx3 uint8 array -> an upright RGB uint8
    array, as the emulator would measure it: files and bytes are decoded by the emulator's own
    decoder (JPEG or PNG, EXIF orientation applied, long side resized to 2560 px with Lanczos,
    as the service does); PIL images get the same orientation and resize, arrays the resize."""
    import numpy as np
    from PIL import Image, ImageOps

    from ..errors import ImageError
    from .imaging import ImageRejected, decode_image, resized_size

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ImageError(f"an image array must be HxWx3 (or HxWx4) uint8, got shape {image.shape} "
                             f"and dtype {image.dtype}")
        pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    elif isinstance(image, Image.Image):
        pil = ImageOps.exif_transpose(image)
        if pil.mode != "RGB":
            pil = pil.convert("RGBA").convert("RGB") if pil.mode in ("P", "LA", "PA") else pil.convert("RGB")
    else:
        from ..images import _read_source

        data, name, _ = _read_source(image)
        try:
            return decode_image(data).rgb
        except ImageRejected as exc:
            label = repr(name) if name else "the image"
            raise ImageError(f"{label} was rejected as the service would reject it: {exc.code} "
                             "(JPEG or PNG only, decodable, not a decompression bomb).") from None
    size = resized_size(*pil.size)
    if size != pil.size:
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.uint8)


def measure(image: Any, actions: Any = "all", *, hd: bool = False, gates: Any = None):
    """Measure skin concerns on one photo with the local engine; a tidy DataFrame, one row per
    physical quantity and region.

    Parameters
    ----------
    image
        A path, bytes, binary file object (JPEG or PNG, decoded as the emulator decodes
        uploads), PIL image or HxWx3 uint8 RGB array. The EXIF orientation is applied (as the
        upload pre-flight does) and a long side above 2560 px is resized to 2560 (as the
        service does).
    actions
        Action names (``"hd_wrinkle"``, ``"dark_circle_v2"``, ...), concern keys
        (``"wrinkle"``), a comma-separated string, or ``"all"``; validated by
        :func:`skinlab.actions.validate_actions` (no HD/SD mix, unknown names suggested).
        Concern keys and ``"all"`` mean the SD actions unless ``hd=True``. The measurements
        do not depend on the tier; ``action`` records which was asked for.
    gates : skinlab.local.engine.GateConfig, optional
        Thresholds of the image checks; the contract's defaults otherwise. A failed check
        raises ``ValueError`` naming the service's error code.

    Returns
    -------
    pandas.DataFrame
        Columns: ``concern``, ``action``, ``quantity`` (what is measured), ``region`` (where),
        ``value``, ``unit`` (``mm``, ``ΔL*``, ``%``, ``1/cm²``, ...: see
        ``skinlab.local.engine.UNITS``), ``kind`` (``measurement``, ``index``, ``flag``,
        ``diagnostic``), ``proxy`` (True when the concern's value is only a proxy for the
        named property), ``resolvable`` (False, with an empty ``value``, for quantities the
        image's scale cannot resolve, e.g. pore counts below 8 px/mm), ``category`` (the skin
        type rows), ``key`` (the engine's measurement name), ``method``, and, on every row,
        ``backend`` (``"skinlab-local-engine"``), ``engine_version``, ``face_backend`` and
        ``px_per_mm``, so that these rows are never pooled with cloud scores unnoticed.
        ``DataFrame.attrs`` holds the image size, the tier, the skin-age proxy and the face
        check details. Not clinically validated: see ``docs/engine-methods.md``.
    """
    import math

    import pandas as pd

    from ..actions import CATALOGUE, resolve_actions, validate_actions
    from . import engine
    from .engine._quantities import NOT_RESOLVABLE, QUANTITIES, records

    validated = validate_actions(resolve_actions(actions, hd=hd))
    rgb = _load_upright_rgb(image)
    check = engine.check_image(rgb, config=gates) if gates is not None else None
    analysis = engine.analyze(rgb, [CATALOGUE[n].concern for n in validated.names], check=check)
    common = {"backend": MEASURE_BACKEND, "engine_version": analysis.engine_version,
              "face_backend": analysis.face_backend, "px_per_mm": analysis.px_per_mm}
    rows: list[dict] = []
    for name in validated.names:
        concern = CATALOGUE[name].concern
        m = analysis.concerns[concern]
        base = {"concern": concern, "action": name, "proxy": bool(m.proxy), "method": m.method}
        seen = set()
        for q, key, value in records(concern, m.measurements):
            seen.add(key)
            rows.append({**base, "quantity": q.quantity if q else key, "region": q.region if q else None,
                         "value": value, "unit": q.unit if q else None, "kind": q.kind if q else None,
                         "resolvable": True, "category": None, "key": key, **common})
        if concern in NOT_RESOLVABLE and not m.measurements.get(f"{concern}_resolvable", 1.0):
            for key in NOT_RESOLVABLE[concern]:
                if key in seen:
                    continue
                q = QUANTITIES[concern][key]
                rows.append({**base, "quantity": q.quantity, "region": q.region, "value": math.nan,
                             "unit": q.unit, "kind": q.kind, "resolvable": False, "category": None,
                             "key": key, **common})
        for region, category in m.skin_types.items():
            rows.append({**base, "quantity": "skin_type", "region": region, "value": math.nan,
                         "unit": "category", "kind": "measurement", "resolvable": True,
                         "category": category, "key": f"skin_type_{region}", **common})
    undeclared = sorted({r["key"] for r in rows if r["unit"] is None})
    if undeclared:
        import warnings

        warnings.warn(f"engine measurement(s) without a declared unit: {', '.join(undeclared)}",
                      RuntimeWarning, stacklevel=2)
    df = pd.DataFrame(rows, columns=_MEASURE_COLUMNS)
    df["value"] = df["value"].astype(float)
    df["category"] = df["category"].astype(object)     # the same dtype with or without skin types
    df.attrs.update({"image_width": int(rgb.shape[1]), "image_height": int(rgb.shape[0]),
                     "tier": validated.tier, "actions": list(validated.names),
                     "skin_age_years_proxy": analysis.skin_age, **common,
                     "face_check": dict(analysis.face.details)})
    return df
