"""The emulator's WSGI application: the YouCam Skin Analysis API v2 contract, in memory.

:class:`SkinlabApp` implements ``api-contract.md`` (upload slots, presigned storage, create,
poll, delete, units, rate limits, retention, webhooks) with state held in memory behind one
lock. Image checks and the engine run off the request thread, in a small worker pool started
at the first create. Time is read only through ``ServerConfig.clock``, so tests can cross the
2 h, 24 h and 30-day limits instantly.

The app is plain WSGI (PEP 3333) and depends on the standard library only; the measurement
engine (:mod:`skinlab.local.engine`) is imported at the first task or at :meth:`SkinlabApp.warm_up`.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import collections
import hashlib
import hmac
import http
import json
import logging
import math
import random
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from ..actions import CATALOGUE, CONCERNS, DARK_BACKGROUND_CONCERNS, UNIT_TIERS
from .imaging import MAX_FILE_BYTES, MIN_SHORT_SIDE, STRICT_MAX_LONG_SIDE, ImageRejected, decode_image
from .render import build_zip, score_info_bytes
from .results import build_results

__all__ = ["ENGINE_ERROR_MESSAGES", "Faults", "LatencyModel", "ServerConfig", "SkinlabApp"]

log = logging.getLogger("skinlab.local")

#: ``error_message`` per engine error code (§5.3); codes not listed get no ``error_message``.
ENGINE_ERROR_MESSAGES: dict[str, str] = {
    "error_below_min_image_size": "Input image resolution is too small",
    "error_exceed_max_image_size": "Input image resolution is too large",
    "error_src_face_too_small": "The face area in the uploaded image is too small",
    "error_src_face_out_of_bound": "The face area in the uploaded image is out of bound",
    "error_lighting_dark": "The lighting in the uploaded image is too dark",
    "exceed_max_filesize": "Input file size is too large",
    "error_download_image": "Download source image error",
    "error_decode_image": "Decode source image error",
    "error_no_face": "No face detected on source image",
    "error_face_parsing": "Failed to do face segmentation",
    "unknown_internal_error": "Unknown internal error",
}

ACCEPTED_CONTENT_TYPES = ("image/jpeg", "image/jpg", "image/png")
HOOK_PATTERN = re.compile(r"__([a-z][a-z0-9_]*?)__")
DOWNLOAD_TIMEOUT_S = 30.0
_HEX6 = re.compile(r"^[0-9A-Fa-f]{6}$")
_EXT = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_DRAIN_LIMIT = 1 << 30  # larger bodies are not even read: the connection is closed
#: Storage errors (§3.4, §8.5): (HTTP status, S3 code, message).
_STORAGE_ERRORS = {
    "bad": (403, "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided."),
    "expired": (403, "AccessDenied", "Request has expired"),
    "authorization": (400, "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                      "query parameter or the Authorization header should be specified"),
    "missing": (404, "NoSuchKey", "The specified key does not exist."),
    "too_large": (400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size"),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclass
class LatencyModel:
    """Task durations like the real service's: mostly ``low_s``–``high_s``, a few ``slow_*``.

    Durations are drawn from a generator seeded by ``ServerConfig.seed`` (repeatable), and
    multiplied by ``time_scale`` (e.g. 0.01 to run a benchmark 100 times faster).
    """

    low_s: float = 5.0
    high_s: float = 7.0
    slow_share: float = 0.03
    slow_low_s: float = 30.0
    slow_high_s: float = 60.0
    time_scale: float = 1.0

    def draw(self, rng: random.Random) -> float:
        if rng.random() < self.slow_share:
            seconds = rng.uniform(self.slow_low_s, self.slow_high_s)
        else:
            seconds = rng.uniform(self.low_s, self.high_s)
        return seconds * self.time_scale


#: An opener that ignores proxy settings: loopback targets are reached directly.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _urlopen(request: urllib.request.Request, *, timeout: float):
    """``urlopen``, but never through a proxy for a loopback host (http_proxy in the
    environment would otherwise send the emulator's own fetches of 127.0.0.1 to the proxy)."""
    from . import _is_loopback

    host = (urlsplit(request.full_url).hostname or "").strip("[]").lower()
    opener = _DIRECT if _is_loopback(host) else urllib.request.build_opener()
    return opener.open(request, timeout=timeout)


def _shutting_down(app, exc: BaseException) -> bool:
    """True when ``exc`` comes from the process or the emulator shutting down (the thread pools
    of the engine refuse new work once the interpreter exits, e.g. after Ctrl-C), not from a
    failure of the engine: such tasks are not logged with a traceback."""
    import sys

    closing = getattr(app, "_closing", None)
    return (sys.is_finalizing() or (closing is not None and closing.is_set())
            or (isinstance(exc, RuntimeError) and "after shutdown" in str(exc)))


class Faults:
    """Per-server fault injection, so parallel tests do not interfere.

    Route names: ``upload``, ``create``, ``poll``, ``delete``, ``credit``, ``feature_cost``,
    ``storage_put``, ``storage_get`` (:attr:`ROUTES`), or ``"*"`` for every route. Each fault
    applies to the next ``n`` matching requests, then disarms itself. All methods return ``self``.
    """

    #: the route names a fault can target (besides ``"*"``)
    ROUTES = ("upload", "create", "poll", "delete", "credit", "feature_cost", "storage_put", "storage_get")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[dict[str, Any]] = []
        self.url_epoch = 0  # bumped by expire_urls(); URLs signed in an older epoch have expired

    def _arm(self, **spec: Any) -> "Faults":
        if isinstance(spec["n"], bool) or not isinstance(spec["n"], int) or spec["n"] < 1:
            raise ValueError(f"n must be a whole number of requests, at least 1; got {spec['n']!r}")
        if spec["route"] != "*" and spec["route"] not in self.ROUTES:
            raise ValueError(f"unknown route {spec['route']!r}; use one of {', '.join(self.ROUTES)} or '*'")
        with self._lock:
            self._armed.append(spec)
        return self

    def rate_limit(self, n: int = 1, route: str = "*") -> "Faults":
        """Answer the next ``n`` authenticated API requests with the 429 body."""
        return self._arm(kind="429", route=route, n=n)

    def fail(self, route: str, n: int = 1, status: int = 500, body: dict | None = None) -> "Faults":
        """Answer ``route`` with HTTP ``status`` (5xx) ``n`` times, before doing anything."""
        return self._arm(kind="fail", route=route, n=n, status=status, body=body)

    def drop(self, route: str, n: int = 1) -> "Faults":
        """Close the connection without any response, before doing anything."""
        return self._arm(kind="drop", route=route, n=n)

    def slow(self, route: str, seconds: float, n: int = 1) -> "Faults":
        """Wait ``seconds`` (real time) before handling the request."""
        return self._arm(kind="slow", route=route, n=n, seconds=seconds)

    def lose_create_response(self, n: int = 1, status: int | None = None) -> "Faults":
        """Create the task, then lose the answer: drop the connection, or answer ``status``."""
        return self._arm(kind="lose", route="create", n=n, status=status)

    def invalid_task_id(self, n: int = 1, route: str = "poll") -> "Faults":
        """Answer the next ``n`` polls (or deletes) with the 400 ``Invalid task ID`` body of §5.5,
        even for a live task: as if the service had lost it. ``route`` is ``"poll"``, ``"delete"``
        or ``"*"`` (both). Authentication and the rate limit are checked first; the task itself
        is left untouched.
        """
        if route not in ("poll", "delete", "*"):
            raise ValueError(f"invalid_task_id applies to 'poll', 'delete' or '*' (both), not {route!r}")
        return self._arm(kind="invalid_task_id", route=route, n=n)

    def expire_urls(self) -> "Faults":
        """Expire every upload and result URL issued so far (storage answers 403 AccessDenied)."""
        with self._lock:
            self.url_epoch += 1
        return self

    def clear(self) -> "Faults":
        """Disarm every pending fault."""
        with self._lock:
            self._armed.clear()
        return self

    def pending(self) -> int:
        """The number of armed faults."""
        with self._lock:
            return len(self._armed)

    def take(self, kinds: Iterable[str], route: str) -> dict[str, Any] | None:
        """Consume one armed fault of one of ``kinds`` matching ``route`` (for the app)."""
        kinds = set(kinds)
        with self._lock:
            for spec in self._armed:
                if spec["kind"] in kinds and spec["route"] in ("*", route):
                    spec["n"] -= 1
                    if spec["n"] <= 0:
                        self._armed.remove(spec)
                    return spec
        return None


@dataclass
class ServerConfig:
    """Every setting of the emulator (contract §9.1 settings table, plus test controls).

    Durations are in seconds of ``clock`` time.
    """

    public_base_url: str | None = None          # default: the bound address
    api_keys: frozenset[str] | None = None      # allow-list; None accepts any well-formed token
    initial_units: float = 1000                 # starting balance of each API key
    task_duration_s: float = 5.0                # fixed task duration (when latency_model is None)
    task_ttl_s: float = 86400                   # task lifetime after completion
    file_ttl_s: float = 2592000                 # file_id lifetime (30 days)
    upload_url_ttl_s: float = 7200
    result_url_ttl_s: float = 7200
    unpolled_expiry_s: float | None = None      # drop running tasks unpolled for this long
    rate_limit: int | None = 250                # requests per window, per key and per IP; None: off
    rate_window_s: float = 300
    strict_max_long_side: bool | int = False    # True: 4096; an int: that limit; False: off
    upload_headers_as_list: bool = False        # headers as [{"key", "value"}] instead of an object
    webhook_url: str | list[str] | None = None
    webhook_secret: str | None = field(default=None, repr=False)   # "whsec_<base64>"; never in reprs
    # --- test and operation controls -------------------------------------------------------
    clock: Callable[[], float] = time.time
    strict: bool = False                        # face width >= 0.60 and the 4096 px check
    min_face_width_fraction: float | None = None  # default 0.50, or 0.60 when strict
    gate_options: dict[str, Any] = field(default_factory=dict)  # extra engine.GateConfig fields
    seed: int | None = None                     # seeds ids and the latency model
    latency_model: LatencyModel | None = None
    faults: Faults = field(default_factory=Faults)
    allow_remote_bind: bool = False
    max_body_bytes: int = 1 << 20               # API request bodies
    max_upload_bytes: int = 32 << 20            # storage PUT bodies (above the 10 MB file limit)
    workers: int = 2                            # engine worker threads
    cache_images: int = 6                       # images whose decode/check/analysis/masks are cached
    download_timeout_s: float = DOWNLOAD_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.api_keys is not None and not isinstance(self.api_keys, frozenset):
            keys = [self.api_keys] if isinstance(self.api_keys, str) else self.api_keys
            self.api_keys = frozenset(keys)

    @property
    def max_long_side(self) -> int | None:
        """The strict-mode long-side limit, or None when off."""
        if not isinstance(self.strict_max_long_side, bool) and self.strict_max_long_side:
            return int(self.strict_max_long_side)
        return STRICT_MAX_LONG_SIDE if (self.strict_max_long_side or self.strict) else None

    @property
    def face_width_fraction(self) -> float:
        if self.min_face_width_fraction is not None:
            return self.min_face_width_fraction
        return 0.60 if self.strict else 0.50


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------

@dataclass
class FileRecord:
    file_id: str
    owner: str
    file_name: str
    content_type: str
    size: int
    issued_at: float
    slot: str               # first path segment of the upload URL
    object_name: str        # last path segment of the upload URL
    data: bytes | None = None


@dataclass
class Outcome:
    status: str                                    # "success" or "error"
    code: str | None = None                        # engine error code
    entries: list[dict[str, Any]] | None = None    # format=json template (mask file names)
    files: dict[str, bytes] = field(default_factory=dict)
    zip_name: str | None = None


@dataclass
class Task:
    task_id: str
    owner: str
    version: str
    names: tuple[str, ...]
    tier: str
    format: str
    args: dict[str, Any]
    cost: int
    created_at: float
    duration: float
    source_kind: str              # "file" or "url"
    source: Any                   # bytes (or None: never uploaded) or the URL
    hook: str | None
    results_key: str
    source_sha256: str | None = None  # of the uploaded bytes; kept after the bytes are freed (billing checks)
    last_touch: float = 0.0
    poll500_left: int = 0
    checks_done: bool = False         # checks 1 to 5 of §5.4 have run (or can no longer run)
    check_error: str | None = None    # the code of their failure, if one failed
    checked_image: Any = field(default=None, repr=False)   # (cache entry, decoded image) until the worker is done
    check_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    state: str = "running"
    dropped: bool = False
    outcome: Outcome | None = None
    engine_done_at: float | None = None
    completed_at: float | None = None


class _Drop(Exception):
    """Close the client connection without a response."""


@dataclass
class _Request:
    environ: dict
    method: str
    path: str
    query: str
    ip: str
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            value = self.environ.get(key)
            return value if value not in (None, "") else None
        return self.environ.get("HTTP_" + key)


_Response = tuple[int, list[tuple[str, str]], bytes]


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _err(status: int, error: str, code: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status, "error": error}
    if code is not None:
        body["error_code"] = code
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def _parse_json(body: bytes) -> Any:
    """Strict JSON (no NaN or Infinity); raises ValueError."""
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)


@dataclass
class _Measured:
    """The part of an engine ``Analysis`` that results are built from."""

    concerns: dict[str, Any]
    skin_age: int | None


class _ImageEntry:
    """Cached per-image work: decoding, the face check, the measurements, the rendered masks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decoded: Any = None
        self.rejected: str | None = None
        self.checks: dict[Any, Any] = {}
        self.measured: dict[str, Any] = {}  # concern key -> engine ConcernMeasurement
        self.skin_age: int | None = None
        self.files: dict[Any, bytes] = {}   # rendered masks, by (file name, background)


# ----------------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------------

class SkinlabApp:
    """The emulator as a WSGI application. Thread-safe; all state is in memory.

    Attributes useful in tests: ``config``, ``faults``, ``counters`` (``analyze``, ``check``,
    ``decode`` counts), :meth:`balance`, :meth:`task`, :meth:`engine_header`.
    """

    def __init__(self, config: ServerConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = ServerConfig(**settings)
        elif settings:
            import dataclasses

            config = dataclasses.replace(config, **settings)
        self.config = config
        self.bound_url: str | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._lock = threading.RLock()
        self._rng = random.Random(config.seed) if config.seed is not None else random.SystemRandom()
        self._latency_rng = random.Random(config.seed)
        self._secret = secrets.token_bytes(32)
        self._files: dict[str, FileRecord] = {}
        self._slots: dict[str, str] = {}
        self._tasks: dict[str, Task] = {}
        self._results: dict[str, str] = {}
        self._balances: dict[str, float] = {}
        self._rate_keys: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._rate_ips: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._last_request_id = 0
        self._started_at = config.clock()
        self._images: collections.OrderedDict[str, _ImageEntry] = collections.OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._ticker: threading.Thread | None = None
        self._closing = threading.Event()
        self._engine_mod: Any = None
        self._engine_error: str | None = None
        self._engine_lock = threading.Lock()

    # -- public helpers ----------------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self.config.faults

    def now(self) -> float:
        return float(self.config.clock())

    def base_url(self, environ: dict | None = None) -> str:
        """The public base URL every returned URL starts with."""
        if self.config.public_base_url:
            return self.config.public_base_url.rstrip("/")
        if self.bound_url:
            return self.bound_url
        if environ is not None:
            host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME')}:{environ.get('SERVER_PORT')}"
            return f"{environ.get('wsgi.url_scheme', 'http')}://{host}"
        return "http://127.0.0.1"

    def balance(self, api_key: str) -> float:
        """The unit balance of ``api_key``, with every finished task charged."""
        with self._lock:
            self._sweep(self.now())
            return self._balances.get(api_key, float(self.config.initial_units))

    def task(self, task_id: str) -> Task | None:
        """The task record (for tests), after bringing it up to date."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                self._advance(task, self.now())
            return self._tasks.get(task_id)

    def task_ids(self, api_key: str | None = None) -> list[str]:
        """The ids of the live tasks (of ``api_key``, or of every key)."""
        with self._lock:
            self._sweep(self.now())
            return [t.task_id for t in self._tasks.values()
                    if not t.dropped and (api_key is None or t.owner == api_key)]

    def warm_up(self) -> None:
        """Import the engine now rather than at the first request."""
        self._engine()

    def close(self) -> None:
        """Stop the worker pool and the background ticker."""
        self._closing.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- engine ------------------------------------------------------------------------------
    def _engine(self) -> Any:
        with self._engine_lock:
            if self._engine_mod is None and self._engine_error is None:
                try:
                    from . import engine
                except Exception as exc:  # the emulator still serves every route
                    self._engine_error = f"{type(exc).__name__}: {exc}"
                    log.error("skinlab.local.engine cannot be imported (%s); every task will fail "
                              "with unknown_internal_error", self._engine_error)
                else:
                    self._engine_mod = engine
            return self._engine_mod

    def engine_header(self) -> str:
        """The value of the ``x-skinlab-engine`` header."""
        engine = self._engine()
        if engine is None:
            return "unavailable; face=none"
        return f"{getattr(engine, 'ENGINE_VERSION', 'unknown')}; face={getattr(engine, 'FACE_BACKEND', 'unknown')}"

    # -- WSGI --------------------------------------------------------------------------------
    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        req = _Request(environ=environ, method=environ.get("REQUEST_METHOD", "GET").upper(), path=path,
                       query=environ.get("QUERY_STRING", ""), ip=environ.get("REMOTE_ADDR", ""))
        try:
            status, headers, body = self._dispatch(req)
        except _Drop:
            conn = environ.get("skinlab.connection")
            if conn is not None:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise ConnectionAbortedError("connection dropped by fault injection") from None
        except Exception:
            log.exception("internal error on %s %s", req.method, req.path)
            status, headers, body = self._json(500, _err(500, "Internal Server Error"))
        start_response(_status_line(status), headers)
        return [b"" if req.method == "HEAD" else body]

    # -- responses ---------------------------------------------------------------------------
    def _request_id(self) -> str:
        with self._lock:
            # Snowflake style: milliseconds since 2020 shifted left, plus a sequence; 18 digits.
            candidate = 10**17 + (int((time.time() - 1577836800) * 1000) << 12)
            self._last_request_id = max(candidate, self._last_request_id + 1)
            return str(self._last_request_id)

    def _api_headers(self, content_type: str | None, length: int) -> list[tuple[str, str]]:
        headers = []
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        headers += [
            ("Content-Length", str(length)),
            ("x-request-id", self._request_id()),
            ("access-control-allow-origin", "*"),
            ("access-control-expose-headers", "x-request-id, x-skinlab-backend, x-skinlab-engine"),
            ("x-skinlab-backend", "local"),
            ("x-skinlab-engine", self.engine_header()),
        ]
        return headers

    def _json(self, status: int, obj: Any, extra: list[tuple[str, str]] | None = None) -> _Response:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return status, self._api_headers("application/json", len(body)) + (extra or []), body

    @staticmethod
    def _xml_error(status: int, code: str, message: str) -> _Response:
        """An S3-style storage error (no JSON envelope, no x-request-id)."""
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>{secrets.token_hex(8).upper()}</RequestId>"
                "</Error>").encode("utf-8")
        return status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))], body

    # -- routing -----------------------------------------------------------------------------
    _ROUTES: list[tuple[re.Pattern, str, tuple[str, ...]]] = [
        (re.compile(r"^/s2s/v2\.0/file$"), "upload", ("POST",)),
        (re.compile(r"^/s2s/v2\.[01]/file/skin-analysis$"), "upload", ("POST",)),
        (re.compile(r"^/s2s/v2\.([01])/task/skin-analysis$"), "create", ("POST",)),
        (re.compile(r"^/s2s/v2\.[01]/task/skin-analysis/([^/]+)$"), "poll", ("GET",)),
        (re.compile(r"^/s2s/v2\.0/task/delete$"), "delete", ("POST",)),
        (re.compile(r"^/s2s/v2\.0/credit/feature-cost$"), "feature_cost", ("GET",)),
        (re.compile(r"^/s2s/v1\.0/client/credit$"), "credit", ("GET",)),
        (re.compile(r"^/_storage/upload/([^/]+)/([^/]+)$"), "storage_put", ("PUT",)),
        (re.compile(r"^/_storage/results/([^/]+)/([^/]+)$"), "storage_get", ("GET", "HEAD")),
    ]

    def _dispatch(self, req: _Request) -> _Response:
        if req.method == "OPTIONS":
            requested = req.header("Access-Control-Request-Headers") or "Authorization, Content-Type"
            headers = [h for h in self._api_headers(None, 0) if h[0] != "Content-Length"]
            return 204, headers + [
                ("access-control-allow-methods", "GET, POST, PUT, HEAD, OPTIONS"),
                ("access-control-allow-headers", requested),
                ("access-control-max-age", "86400"),
            ], b""
        for pattern, route, methods in self._ROUTES:
            match = pattern.match(req.path)
            if match is None:
                continue
            if req.method not in methods:
                return self._json(405, _err(405, "Method Not Allowed"), [("Allow", ", ".join(methods))])
            return self._route(req, route, match)
        return self._json(404, _err(404, "Not Found"))

    def _route(self, req: _Request, route: str, match: re.Match) -> _Response:
        storage = route.startswith("storage_")
        fault = self.faults.take(("drop", "slow", "fail"), route)
        if fault is not None:
            if fault["kind"] == "drop":
                self._read_body(req, self.config.max_upload_bytes if storage else self.config.max_body_bytes)
                raise _Drop()
            if fault["kind"] == "slow":
                time.sleep(fault["seconds"])
            else:
                status = fault["status"]
                if storage:
                    return self._xml_error(status, *_STORAGE_ERRORS["internal"][1:])
                return self._json(status, fault["body"] or _err(status, http.HTTPStatus(status).phrase))
        if storage:
            if not self._read_body(req, self.config.max_upload_bytes):
                return self._xml_error(*_STORAGE_ERRORS["too_large"])
            return self._storage_put(req, match) if route == "storage_put" else self._storage_get(req, match)
        key = self._authenticate(req)
        if key is None:
            return self._json(401, _err(401, "This API key is not recognized.", "InvalidApiKey"))
        if self._rate_limited(key, req.ip, route):
            return self._json(429, _err(429, "Too many requests"))
        if not self._read_body(req, self.config.max_body_bytes):
            return self._json(413, _err(413, "Request Entity Too Large"))
        if route in ("poll", "delete") and self.faults.take(("invalid_task_id",), route) is not None:
            return self._invalid("Invalid task ID", "InvalidTaskId")
        handler = getattr(self, "_" + route)
        return handler(req, match, key)

    @staticmethod
    def _read_body(req: _Request, limit: int) -> bool:
        """Read the request body; False (body drained and dropped) when it exceeds ``limit``.

        The body is always consumed, so that closing the connection never resets it before the
        client has read the answer.
        """
        try:
            length = int(req.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > _DRAIN_LIMIT:
            return False
        stream = req.environ.get("wsgi.input")
        chunks, left = [], length
        while left > 0 and stream is not None:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                break
            if length <= limit:
                chunks.append(chunk)
            left -= len(chunk)
        req.body = b"".join(chunks)
        return length <= limit

    # -- auth and rate limit -----------------------------------------------------------------
    def _authenticate(self, req: _Request) -> str | None:
        header = req.header("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        if any(ch.isspace() or ch in "<>" for ch in token):
            return None
        allow = self.config.api_keys
        if allow is not None and token not in allow:
            return None
        return token

    def _rate_limited(self, key: str, ip: str, route: str) -> bool:
        if self.faults.take(("429",), route) is not None:
            return True
        limit = self.config.rate_limit
        if not limit:
            return False
        now = self.now()
        horizon = now - self.config.rate_window_s
        with self._lock:
            buckets = (self._rate_keys[key], self._rate_ips[ip])
            for bucket in buckets:
                while bucket and bucket[0] <= horizon:
                    bucket.popleft()
            if any(len(bucket) >= limit for bucket in buckets):
                return True
            for bucket in buckets:
                bucket.append(now)
        return False

    # -- URL signing -------------------------------------------------------------------------
    def _signature(self, epoch: int, method: str, path: str, extra: str, date: str, expires: str) -> str:
        message = "\n".join((str(epoch), method, path, extra, date, expires)).encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _presign(self, base: str, method: str, path: str, ttl: float, extra: str, signed_headers: str) -> str:
        """An absolute presigned URL for ``path`` under ``base`` (S3-style query)."""
        now = self.now()
        date = time.strftime(_AMZ_DATE, time.gmtime(now))
        expires = str(int(ttl))
        params = [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", f"SKINLABLOCAL/{date[:8]}/us-west-2/s3/aws4_request"),
            ("X-Amz-Date", date),
            ("X-Amz-Expires", expires),
            ("X-Amz-SignedHeaders", signed_headers),
            ("X-Amz-Signature", self._signature(self.faults.url_epoch, method, path, extra, date, expires)),
        ]
        return f"{base}{quote(path)}?{urlencode(params, quote_via=quote)}"

    def _verify(self, method: str, req: _Request, extra: str) -> str:
        """``"ok"``, ``"expired"`` or ``"bad"`` for the presigned request ``req``."""
        query = dict(parse_qsl(req.query, keep_blank_values=True))
        date, expires, signature = (query.get("X-Amz-Date", ""), query.get("X-Amz-Expires", ""),
                                    query.get("X-Amz-Signature", ""))
        current = self.faults.url_epoch
        for epoch in range(current, -1, -1):
            expected = self._signature(epoch, method, req.path, extra, date, expires)
            if hmac.compare_digest(expected, signature):
                break
        else:
            return "bad"
        if epoch != current:
            return "expired"
        try:
            issued = calendar.timegm(time.strptime(date, _AMZ_DATE))
            ttl = int(expires)
        except ValueError:
            return "bad"
        return "expired" if self.now() > issued + ttl else "ok"

    # -- ids ---------------------------------------------------------------------------------
    def _token(self, nbytes: int) -> bytes:
        with self._lock:
            return self._rng.randbytes(nbytes)

    def _new_file_id(self) -> str:
        while True:
            fid = base64.b64encode(self._token(48)).decode("ascii")  # 64 characters
            if "+" in fid and "/" in fid and fid not in self._files:
                return fid

    def _new_task_id(self) -> str:
        while True:
            tid = base64.urlsafe_b64encode(self._token(80)).decode("ascii").rstrip("=")  # 107 characters
            if tid not in self._tasks:
                return tid

    def _new_key(self) -> str:
        return base64.urlsafe_b64encode(self._token(16)).decode("ascii").rstrip("=")[:22]

    def _new_uuid(self) -> str:
        return str(uuid.UUID(bytes=self._token(16), version=4))

    # -- File API (§3) -----------------------------------------------------------------------
    def _upload(self, req: _Request, match: re.Match, key: str) -> _Response:
        invalid = self._json(400, _err(400, "Invalid parameter value", "InvalidParameters"))
        try:
            body = _parse_json(req.body)
        except ValueError:
            return invalid
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list) or not 1 <= len(files) <= 10:
            return invalid
        for item in files:
            if not isinstance(item, dict):
                return invalid
            ctype, name, size = item.get("content_type"), item.get("file_name"), item.get("file_size")
            if (not isinstance(ctype, str) or ctype not in ACCEPTED_CONTENT_TYPES
                    or not isinstance(name, str) or not name
                    or not isinstance(size, int) or isinstance(size, bool) or size <= 0):
                return invalid
        now = self.now()
        out = []
        for item in files:
            ctype, name, size = item["content_type"], item["file_name"], item["file_size"]
            ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
            object_name = self._new_uuid() + (ext if _EXT.match(ext) else "")
            with self._lock:
                record = FileRecord(file_id=self._new_file_id(), owner=key, file_name=name, content_type=ctype,
                                    size=size, issued_at=now, slot=self._new_key(), object_name=object_name)
                self._files[record.file_id] = record
                self._slots[record.slot] = record.file_id
            path = f"/_storage/upload/{record.slot}/{object_name}"
            url = self._presign(self.base_url(req.environ), "PUT", path, self.config.upload_url_ttl_s,
                                f"{ctype}\n{size}",
                                "content-length;content-type;host")
            headers: Any = {"Content-Length": str(size), "Content-Type": ctype}
            if self.config.upload_headers_as_list:
                headers = [{"key": k, "value": v} for k, v in headers.items()]
            out.append({"content_type": ctype, "file_name": name, "file_id": record.file_id,
                        "requests": [{"method": "PUT", "url": url, "headers": headers}]})
        return self._json(200, {"status": 200, "data": {"files": out}})

    # -- storage (§3.4, §8.5) ----------------------------------------------------------------
    def _storage_put(self, req: _Request, match: re.Match) -> _Response:
        slot, object_name = match.group(1), match.group(2)
        mismatch = self._xml_error(*_STORAGE_ERRORS["bad"])
        with self._lock:
            record = self._files.get(self._slots.get(slot, ""))
        if record is None or record.object_name != object_name:
            return mismatch
        verdict = self._verify("PUT", req, f"{record.content_type}\n{record.size}")
        if verdict != "ok":
            return self._xml_error(*_STORAGE_ERRORS[verdict])
        if req.header("Authorization") is not None:
            return self._xml_error(*_STORAGE_ERRORS["authorization"])
        if req.header("Content-Type") != record.content_type:
            return mismatch
        length = req.header("Content-Length")
        if length is None or length.strip() != str(record.size) or len(req.body) != record.size:
            return mismatch
        with self._lock:
            record.data = req.body
        etag = '"' + hashlib.md5(req.body).hexdigest() + '"'
        return 200, [("ETag", etag), ("Content-Length", "0")], b""

    def _storage_get(self, req: _Request, match: re.Match) -> _Response:
        results_key, name = match.group(1), match.group(2)
        verdict = self._verify("GET", req, "")
        if verdict == "bad":
            return self._xml_error(*_STORAGE_ERRORS["bad"])
        with self._lock:
            task = self._tasks.get(self._results.get(results_key, ""))
            if task is not None:
                self._advance(task, self.now())
                task = self._tasks.get(task.task_id)
            data = task.outcome.files.get(name) if task is not None and task.outcome is not None else None
        # A deleted or expired task answers 404 even when the URL has expired too (§8.5).
        if data is None or task is None or task.state != "success":
            return self._xml_error(*_STORAGE_ERRORS["missing"])
        if verdict == "expired":
            return self._xml_error(*_STORAGE_ERRORS["expired"])
        if req.header("Authorization") is not None:
            return self._xml_error(*_STORAGE_ERRORS["authorization"])
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        return 200, [("Content-Type", "binary/octet-stream"), ("Content-Length", str(len(data))),
                     ("ETag", etag), ("access-control-allow-origin", "*")], data

    # -- create (§4) -------------------------------------------------------------------------
    def _invalid(self, text: str, code: str = "InvalidParameters") -> _Response:
        return self._json(400, _err(400, text, code))

    def _create(self, req: _Request, match: re.Match, key: str) -> _Response:
        version = "v2." + match.group(1)
        try:
            body = _parse_json(req.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._invalid("Request body must be a JSON object")
        has_id, has_url = "src_file_id" in body, "src_file_url" in body
        if not has_id and not has_url:
            return self._invalid("src_file_id is required but wasn't included in your request")
        if has_id and has_url:
            return self._invalid("src_file_id and src_file_url cannot both be set")
        source_field = "src_file_id" if has_id else "src_file_url"
        source = body[source_field]
        if not isinstance(source, str) or not source:
            return self._invalid(f"{source_field} must be a non-empty string")
        allowed = {"src_file_id", "src_file_url", "dst_actions", "miniserver_args", "format"}
        if version == "v2.1":
            allowed.add("pf_camera_kit")
        for name in body:
            if name not in allowed:
                return self._invalid(f"Unexpected request parameter {name}", "BadRequest")
        actions = body.get("dst_actions")
        if actions is None:
            return self._invalid("dst_actions is required but wasn't included in your request")
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            return self._invalid("dst_actions must be an array of strings")
        if not actions:
            return self._invalid("dst_actions must not be empty")
        for name in actions:
            if name not in CATALOGUE:
                return self._invalid(f"Not available dst_action {name}")
        names = tuple(dict.fromkeys(actions))
        tiers = {CATALOGUE[n].tier for n in names}
        if len(tiers) > 1:
            return self._invalid("cannot mix HD and SD dst_actions")
        tier = tiers.pop()
        fmt = body.get("format", "zip")
        if fmt not in ("json", "zip"):
            shown = fmt if isinstance(fmt, str) else json.dumps(fmt)
            return self._invalid(f"Not available format {shown}")
        args = body.get("miniserver_args", {})
        if not isinstance(args, dict):
            return self._invalid("miniserver_args must be an object")
        bad = self._bad_miniserver_field(args, names)
        if bad is not None:
            return self._invalid(f"Invalid value for miniserver_args.{bad}")
        if "pf_camera_kit" in body and not isinstance(body["pf_camera_kit"], bool):
            return self._invalid("pf_camera_kit must be a boolean")
        cost = self._cost(len(names), tier)
        now = self.now()
        with self._lock:
            self._sweep(now)
            if self._balances.get(key, float(self.config.initial_units)) < cost:
                return self._invalid("Insufficient units to run this task", "CreditInsufficiency")
            task = self._new_task(key, version, names, tier, fmt, args, cost, now, source_field, source)
        fault = self.faults.take(("lose",), "create")
        if fault is not None:
            if fault["status"] is None:
                raise _Drop()
            status = fault["status"]
            return self._json(status, _err(status, http.HTTPStatus(status).phrase))
        return self._json(200, {"status": 200, "data": {"task_id": task.task_id}})

    @staticmethod
    def _bad_miniserver_field(args: dict, names: tuple[str, ...]) -> str | None:
        """The first known field with a bad value (§4.3), or None. Unknown keys are ignored."""
        for field_name, value in args.items():
            if field_name == "enable_mask_overlay":
                if not isinstance(value, bool):
                    return field_name
                continue
            prefix, _, concern = field_name.partition("_dark_background_")
            if not concern or concern not in DARK_BACKGROUND_CONCERNS or concern not in names:
                continue
            if prefix == "enable" and not isinstance(value, bool):
                return field_name
            if prefix == "color" and not (isinstance(value, str) and _HEX6.match(value)):
                return field_name
            if prefix == "opacity" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not math.isfinite(value) or not 0 <= value <= 1):
                return field_name
        return None

    @staticmethod
    def _cost(count: int, tier: str) -> int:
        for limit, sd, hd in UNIT_TIERS:
            if count <= limit:
                return hd if tier == "hd" else sd
        raise ValueError(f"{count} concerns")  # pragma: no cover - at most 16 distinct names exist

    def _new_task(self, key: str, version: str, names: tuple[str, ...], tier: str, fmt: str, args: dict,
                  cost: int, now: float, source_field: str, source: str) -> Task:
        """Make and schedule a task (under the lock). The source bytes are read now."""
        if source_field == "src_file_id":
            record = self._files.get(source)
            usable = (record is not None and record.owner == key and record.data is not None
                      and now < record.issued_at + self.config.file_ttl_s)
            payload: Any = record.data if usable else None
            hook_text = record.file_name if record is not None and record.owner == key else ""
            kind = "file"
        else:
            payload, kind = source, "url"
            hook_text = urlsplit(source).path.rsplit("/", 1)[-1]
        hook = HOOK_PATTERN.search(hook_text)
        model = self.config.latency_model
        duration = model.draw(self._latency_rng) if model is not None else float(self.config.task_duration_s)
        task = Task(task_id=self._new_task_id(), owner=key, version=version, names=names, tier=tier,
                    format=fmt, args=dict(args), cost=cost, created_at=now, duration=max(0.0, duration),
                    source_kind=kind, source=payload, hook=hook.group(1) if hook else None,
                    results_key=self._new_key(), last_touch=now,
                    source_sha256=hashlib.sha256(payload).hexdigest() if isinstance(payload, bytes) else None)
        if task.hook == "poll500":
            task.poll500_left = 2
        self._tasks[task.task_id] = task
        self._results[task.results_key] = task.task_id
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.config.workers),
                                            thread_name_prefix="skinlab-engine")
        self._pool.submit(self._run, task)
        self._start_ticker()
        return task

    # -- poll (§5) ---------------------------------------------------------------------------
    def _live_task(self, task_id: Any, key: str, now: float) -> Task | None:
        task = self._tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None or task.owner != key:
            return None
        self._advance(task, now)
        return self._tasks.get(task_id)

    def _poll(self, req: _Request, match: re.Match, key: str) -> _Response:
        now = self.now()
        with self._lock:
            task = self._live_task(match.group(1), key, now)
            if task is None or task.dropped:
                return self._invalid("Invalid task ID", "InvalidTaskId")
            hooked = task.poll500_left > 0
        if hooked:
            # A real failure of checks 1 to 5 takes precedence over the poll500 hook (§5.6), so
            # their verdict is needed first: run them here if the worker has not yet (outside the
            # app lock, since they may download or decode the image).
            try:
                self._precheck(task)
            except Exception as exc:  # the worker meets the same failure and reports it as the outcome
                if not _shutting_down(self, exc):
                    log.exception("checks of task %s failed inside the emulator", task.task_id[:12])
        with self._lock:
            if hooked:
                task = self._live_task(match.group(1), key, now)
                if task is None or task.dropped:
                    return self._invalid("Invalid task ID", "InvalidTaskId")
            task.last_touch = now
            if task.poll500_left > 0:
                if task.check_error is not None:
                    task.poll500_left = 0       # the real failure wins: the task behaves normally
                else:
                    task.poll500_left -= 1
                    return self._json(500, _err(500, "Task execution timed out", "TaskTimeout"))
            state, outcome = task.state, task.outcome
        if state == "running":
            data: dict[str, Any] = {"error": None, "results": None, "task_status": "running"}
        elif state == "error":
            assert outcome is not None
            data = {"error": outcome.code}
            if outcome.code in ENGINE_ERROR_MESSAGES:
                data["error_message"] = ENGINE_ERROR_MESSAGES[outcome.code]
            data.update(results=None, task_status="error")
        else:
            assert outcome is not None
            results = self._signed_results(self.base_url(req.environ), task, outcome)
            data = {"error": None, "results": results, "task_status": "success"}
        return self._json(200, {"status": 200, "data": data})

    def _signed_results(self, base: str, task: Task, outcome: Outcome) -> dict[str, Any]:
        """The ``results`` of a successful poll, with freshly signed URLs."""
        def url(name: str) -> str:
            return self._presign(base, "GET", f"/_storage/results/{task.results_key}/{name}",
                                 self.config.result_url_ttl_s, "", "host")

        if outcome.zip_name is not None:
            return {"url": url(outcome.zip_name)}
        output = []
        for template in outcome.entries or []:
            entry = dict(template)
            if "mask_urls" in entry:
                entry["mask_urls"] = [url(name) for name in entry["mask_urls"]]
                entry["url"] = entry.pop("url")  # keep "url" last
            output.append(entry)
        return {"output": output}

    # -- task lifecycle ----------------------------------------------------------------------
    def _advance(self, task: Task, now: float) -> None:
        """Bring ``task`` up to ``now`` (under the lock): complete, charge, drop, expire."""
        if task.state == "running":
            done_at = None
            if task.outcome is not None:
                done_at = max(task.created_at + task.duration, task.engine_done_at or 0.0)
            limit = self.config.unpolled_expiry_s
            if limit is not None and not task.dropped:
                horizon = now if done_at is None else min(now, done_at)
                if horizon - task.last_touch > limit:
                    task.dropped = True
            if done_at is not None and now >= done_at:
                assert task.outcome is not None
                task.state = task.outcome.status
                task.completed_at = done_at
                if task.state == "success":
                    balance = self._balances.get(task.owner, float(self.config.initial_units))
                    self._balances[task.owner] = max(0.0, balance - task.cost)
                if not task.dropped:
                    self._notify(task)
        if task.state != "running" and (task.dropped or now >= (task.completed_at or 0.0) + self.config.task_ttl_s):
            self._remove(task)

    def _remove(self, task: Task) -> None:
        self._tasks.pop(task.task_id, None)
        self._results.pop(task.results_key, None)

    def _sweep(self, now: float) -> None:
        for task in list(self._tasks.values()):
            self._advance(task, now)
        for fid, record in list(self._files.items()):
            if now >= record.issued_at + max(self.config.file_ttl_s, self.config.upload_url_ttl_s):
                self._files.pop(fid, None)
                self._slots.pop(record.slot, None)

    def _start_ticker(self) -> None:
        if self._ticker is not None:
            return

        def tick() -> None:
            while not self._closing.wait(0.1):
                with self._lock:
                    self._sweep(self.now())

        self._ticker = threading.Thread(target=tick, name="skinlab-ticker", daemon=True)
        self._ticker.start()

    # -- the worker --------------------------------------------------------------------------
    def _run(self, task: Task) -> None:
        try:
            outcome = self._execute(task)
        except Exception as exc:
            if _shutting_down(self, exc):   # the process is exiting (Ctrl-C): not an engine failure
                log.debug("task %s stopped: the emulator is shutting down (%s)", task.task_id[:12], exc)
            else:
                log.exception("task %s failed inside the emulator", task.task_id[:12])
            outcome = Outcome(status="error", code="unknown_internal_error")
        with task.check_lock:
            task.checks_done = True     # also when they raised: a poll no longer waits for them
            task.checked_image = None
        with self._lock:
            task.source = None
            task.outcome = outcome
            task.engine_done_at = self.now()
            if task.task_id in self._tasks:
                self._advance(task, task.engine_done_at)

    def _precheck(self, task: Task) -> str | None:
        """Run checks 1 to 5 of §5.4 once per task; the code of the first failure, or None.

        The worker runs them first; a poll of a task whose ``poll500`` hook is still armed runs
        them itself when the worker has not got to them yet, because a real failure of these
        checks takes precedence over the hook (§5.6). Whoever comes second waits for, and reuses,
        the first one's verdict.
        """
        with task.check_lock:
            if not task.checks_done:
                task.check_error, task.checked_image = self._image_checks(task)
                task.checks_done = True
            return task.check_error

    def _image_checks(self, task: Task) -> tuple[str | None, Any]:
        """Checks 1 to 5 of §5.4 in order: ``(code, None)`` or ``(None, (entry, decoded))``."""
        if task.source_kind == "file":
            data = task.source
            if data is None:
                return "unknown_internal_error", None
        else:
            data = self._download(task.source)
            if data is None:
                return "error_download_image", None
        if len(data) > MAX_FILE_BYTES:
            return "exceed_max_filesize", None
        entry = self._image_entry(hashlib.sha256(data).hexdigest())
        with entry.lock:
            if entry.decoded is None and entry.rejected is None:
                self._count("decode")
                try:
                    entry.decoded = decode_image(data)
                except ImageRejected as exc:
                    entry.rejected = exc.code
        if entry.rejected is not None:
            return entry.rejected, None
        decoded = entry.decoded
        if decoded.short_side < MIN_SHORT_SIDE[task.tier]:
            return "error_below_min_image_size", None
        max_long = self.config.max_long_side
        if max_long is not None and decoded.long_side > max_long:
            return "error_exceed_max_image_size", None
        return None, (entry, decoded)

    def _execute(self, task: Task) -> Outcome:
        """The checks of §5.4 in order, then the engine and the rendering."""
        def error(code: str) -> Outcome:
            return Outcome(status="error", code=code)

        code = self._precheck(task)
        if code is not None:
            return error(code)
        entry, decoded = task.checked_image
        if task.hook is not None and task.hook != "poll500":
            return error(task.hook)
        engine = self._engine()
        if engine is None:
            return error("unknown_internal_error")
        gate = dict(self.config.gate_options, min_face_width_fraction=self.config.face_width_fraction)
        gate_key = tuple(sorted(gate.items()))
        with entry.lock:
            check = entry.checks.get(gate_key)
            if check is None:
                self._count("check")
                check = engine.check_image(decoded.rgb, config=engine.GateConfig(**gate))
                entry.checks[gate_key] = check
            if check.error:
                return error(check.error)
            wanted = {CATALOGUE[n].concern for n in task.names}
            missing = [c for c in CONCERNS if c in wanted and c not in entry.measured]
            if missing:
                # Each concern is measured once per image; the engine's measurements and its
                # skin-age proxy do not depend on which other concerns are requested.
                self._count("analyze")
                fresh = engine.analyze(decoded.rgb, missing, check=check)
                entry.measured.update(fresh.concerns)
                entry.skin_age = fresh.skin_age
            analysis = _Measured(concerns=dict(entry.measured), skin_age=entry.skin_age)
        results = build_results(task.names, analysis, decoded.rgb, task_id=task.task_id,
                                miniserver_args=task.args, ui_score=engine.ui_score, cache=entry.files)
        if task.format == "zip":
            zip_name = self._new_uuid() + ".zip"
            members = [("skinanalysisResult/score_info.json", score_info_bytes(results.score_info))]
            members += [("skinanalysisResult/" + name, blob) for name, blob in results.files]
            return Outcome(status="success", files={zip_name: build_zip(members, self.now())}, zip_name=zip_name)
        return Outcome(status="success", entries=results.entries, files=dict(results.files))

    def precompute(self, data: bytes, names: Iterable[str] = ("redness",)) -> str:
        """Run the checks and the engine on ``data`` now, filling the per-image cache, and return
        the outcome (``"success"`` or an error code). Benchmarks use it so that the engine's
        compute time does not blur a measurement of the HTTP protocol; nothing is billed."""
        names = tuple(names)
        task = Task(task_id="precompute", owner="", version="v2.0", names=names,
                    tier=CATALOGUE[names[0]].tier, format="json", args={}, cost=0, created_at=self.now(),
                    duration=0.0, source_kind="file", source=data, hook=None, results_key="")
        outcome = self._execute(task)
        return outcome.status if outcome.status == "success" else outcome.code

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _image_entry(self, sha: str) -> _ImageEntry:
        with self._lock:
            entry = self._images.get(sha)
            if entry is None:
                entry = self._images[sha] = _ImageEntry()
                while len(self._images) > max(1, self.config.cache_images):
                    self._images.popitem(last=False)
            else:
                self._images.move_to_end(sha)
            return entry

    def _download(self, url: str) -> bytes | None:
        if urlsplit(url).scheme not in ("http", "https"):
            return None
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "skinlab-local-emulator"})
            with _urlopen(request, timeout=self.config.download_timeout_s) as resp:
                if not 200 <= resp.status < 300:
                    return None
                return resp.read(self.config.max_upload_bytes + 1)
        except (OSError, ValueError, urllib.error.URLError):
            return None

    # -- webhooks (§8.7) ---------------------------------------------------------------------
    def _notify(self, task: Task) -> None:
        urls = self.config.webhook_url
        secret = self.config.webhook_secret
        if not urls or not secret:
            return
        payload = {"created_at": int(self.now()), "data": {"task_id": task.task_id, "task_status": task.state}}
        for url in [urls] if isinstance(urls, str) else list(urls):
            threading.Thread(target=self._send_webhook, args=(url, secret, payload),
                             name="skinlab-webhook", daemon=True).start()

    def _send_webhook(self, url: str, secret: str, payload: dict) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        msg_id = "msg_" + secrets.token_hex(12)
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"))
        except (binascii.Error, ValueError):
            log.error("webhook_secret is not whsec_<base64>; webhook not sent")
            return
        for attempt in range(3):
            stamp = str(int(self.now()))
            signed = f"{msg_id}.{stamp}.".encode("utf-8") + body
            signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Content-Type": "application/json", "webhook-id": msg_id,
                "webhook-timestamp": stamp, "webhook-signature": f"v1,{signature}"})
            try:
                with _urlopen(request, timeout=10) as resp:
                    if 200 <= resp.status < 300:
                        return
            except (OSError, urllib.error.URLError) as exc:
                log.debug("webhook to %s failed: %s", url, exc)
            if self._closing.wait(0.5 * 2 ** attempt):
                return
        log.warning("webhook to %s failed 3 times; giving up", url)

    # -- delete, balance, costs (§8) ---------------------------------------------------------
    def _delete(self, req: _Request, match: re.Match, key: str) -> _Response:
        try:
            body = _parse_json(req.body)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("task_id") in (None, ""):
            return self._invalid("task_id is required but wasn't included in your request")
        task_id = body["task_id"]
        with self._lock:
            if isinstance(task_id, str) and task_id in self._files:
                return self._invalid("Operation not supported", "OperationNotSupport")
            task = self._live_task(task_id, key, self.now())
            if task is None or task.dropped:
                return self._invalid("Invalid task ID", "InvalidTaskId")
            if task.state == "running":
                return self._invalid("Task is not finished", "OperationInvalid")
            self._remove(task)
            task.outcome = Outcome(status=task.state)  # drop the result files
        return self._json(200, {"status": 200})

    def _credit(self, req: _Request, match: re.Match, key: str) -> _Response:
        balance = self.balance(key)
        expiry_ms = int((self._started_at + 365 * 86400) * 1000)
        lot_id = 48213377020950000 + int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:6], 16) % 10000
        return self._json(200, {"status": 200, "results": [{
            "id": lot_id, "type": "ApiPaygToken", "amount": math.floor(balance),
            "amount_dec": float(balance), "expiry": expiry_ms}]})

    def _feature_cost(self, req: _Request, match: re.Match, key: str) -> _Response:
        invalid = self._invalid("Invalid parameter value")
        query = dict(parse_qsl(req.query, keep_blank_values=True))
        try:
            page_size = int(query.get("page_size", "20"))
        except ValueError:
            return invalid
        if not 1 <= page_size <= 20:
            return invalid
        start = 0
        token = query.get("starting_token")
        if token:
            try:
                start = int(base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("ascii"))
            except (binascii.Error, ValueError, UnicodeDecodeError):
                return invalid
        skus = []
        run_url = f"{self.base_url(req.environ)}/s2s/v2.0/task/skin-analysis"
        for tier_index, tier in ((1, "SD"), (2, "HD")):
            low = 1
            for row in UNIT_TIERS:
                skus.append({"description": f"AI Skin Analysis for {tier} {low}~{row[0]} concerns",
                             "amount": row[tier_index], "unit": "result_image", "proc_unit": 1,
                             "run_task_url": run_url})
                low = row[0] + 1
        if not 0 <= start <= len(skus):
            return invalid
        page = skus[start:start + page_size]
        end = start + len(page)
        next_token = base64.b64encode(str(end).encode("ascii")).decode("ascii").rstrip("=") if end < len(skus) else None
        return self._json(200, {"status": 200, "result": {"next_token": next_token, "skus": page}})

