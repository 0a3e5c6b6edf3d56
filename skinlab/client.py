"""HTTP client for the YouCam AI Skin Analysis API v2 (and skinlab's local emulator).

The client speaks the contract in ``api-contract.md``: it reserves an upload slot, PUTs the
bytes to the presigned URL, creates a task, polls it and downloads the results. It talks to the
local backend exactly as to the cloud, over HTTP.

Two retry policies (contract §8.1, §5.5):

* safe calls (upload slot, upload PUT, poll, downloads) retry connection errors, 429 and 5xx
  with exponential backoff and full jitter;
* task creation is retried only after a 429 or when the connection was never established.
  Any other failure after the request may have reached the service raises
  :class:`~skinlab.errors.TaskFateUnknownError` and is never re-sent: a second create would
  bill a second task.

A :meth:`Task.wait` deadline wins over both: no poll, and no retry of one, is sent after it.
Every request carries an explicit ``auth`` (the Bearer key on API calls, none on storage
calls), so ``~/.netrc`` credentials never replace or add an ``Authorization`` header, while
proxy settings still come from the environment, except for loopback URLs (the embedded
emulator and its storage), which are always reached directly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import requests

from . import errors
from ._net import is_loopback_url, redact_url
from .actions import (CATALOGUE, colour_actions, estimate_units, validate_actions, validate_format,
                      validate_miniserver_args)
from .errors import (
    APIError, AuthenticationError, ConfigurationError, InsufficientCreditsError,
    InvalidParametersError, InvalidTaskIdError, RateLimitError, ServerError,
    SkinlabConnectionError, TaskFateUnknownError, TaskTimeoutError, UploadError,
)
from .images import PreparedImage, prepare_image

__all__ = ["Client", "SubmissionPlan", "Task", "TaskStatus", "RetryPolicy", "PollSchedule", "RateLimiter", "DEFAULT_BASE_URL"]

log = logging.getLogger("skinlab")

DEFAULT_BASE_URL = "https://yce-api-01.makeupar.com"
API_VERSIONS = ("v2.0", "v2.1")
#: The token sent to a loopback emulator when no key is configured (the emulator accepts any).
LOCAL_TOKEN = "skinlab-local"


def normalise_key(key: str | None) -> str | None:
    """Clean a pasted API key: whitespace, quotes, angle brackets and a leading ``Bearer``."""
    if key is None:
        return None
    text = str(key).strip()
    for _ in range(3):
        text = text.strip().strip("\"'`").strip()
        if text[:1] == "<" and text[-1:] == ">":
            text = text[1:-1]
        if text.lower().startswith("bearer "):
            text = text[7:]
    text = text.strip()
    return text or None


_is_loopback = is_loopback_url


def _check_key_characters(key: str) -> None:
    """Refuse a key that cannot travel in an HTTP header (a pasted line break, tab or space inside
    it, or a non-ASCII character), before any request; the message never shows the key."""
    for i, ch in enumerate(key):
        if not (" " < ch < "\x7f"):
            what = {"\r": "a carriage return", "\n": "a line break", "\t": "a tab", " ": "a space"}.get(
                ch, f"the character U+{ord(ch):04X}")
            raise ConfigurationError(
                f"The API key holds {what} at position {i + 1} of {len(key)}, which cannot be sent in an HTTP "
                "header. Paste the key again as one line, exactly as the YouCam console shows it.")


class _Secret(str):
    """A header value holding the API key; its repr (tracebacks with locals, debuggers) hides it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'Bearer ***'"


class _BearerAuth(requests.auth.AuthBase):
    """Sets ``Authorization: Bearer <key>`` on an API call (contract §2.3), whatever else would.

    Passed as ``auth=`` on every API request: with ``auth`` left to None, requests applies
    ``~/.netrc`` (or ``$NETRC``) credentials for the host, which replace the Bearer header. The
    environment's proxy settings are still used. The key stays hidden from reprs.
    """

    __slots__ = ("_value",)

    def __init__(self, value: _Secret) -> None:
        self._value = value

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self._value
        return r

    def __repr__(self) -> str:
        return "<BearerAuth ***>"


class _NoAuth(requests.auth.AuthBase):
    """Removes any ``Authorization`` from a storage call (presigned PUT, result GET; §2.3, §3.4).

    Passed as ``auth=`` so that no netrc entry (for the storage host or a ``default`` one), nor a
    session-wide ``auth``, adds credentials: the presigned URL is the only credential sent.
    """

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers.pop("Authorization", None)
        return r

    def __repr__(self) -> str:
        return "<NoAuth>"


_NO_AUTH = _NoAuth()


def _proxies_for(url: str) -> dict[str, None] | None:
    """``proxies=`` for one request: loopback URLs never go through a proxy, whatever the
    environment (``http_proxy``, ``HTTPS_PROXY``, ``ALL_PROXY``) or ``no_proxy`` say; other URLs
    use the environment's proxies (None leaves them to requests).

    Every key a proxy could be chosen by is set to None: requests then fills nothing from the
    environment for them and drops them from the session's proxies too. A fresh dict each call
    (requests writes into it).
    """
    if not _is_loopback(url):
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    keys = ["http", "https", "all", f"{parts.scheme}://{host}", f"all://{host}"]
    return dict.fromkeys(keys)


def check_transport(url: str, *, allow_insecure_http: bool = False, what: str = "request") -> None:
    """Refuse a URL that is not http(s), or plain http to a host other than loopback.

    Face photos (uploads) and results (which hold the working copy of the photo) must not cross
    the network unencrypted unless the caller allowed it explicitly.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InsecureTransportError(
            f"{what}: refusing to follow {parts.scheme or 'a scheme-less'} URL {redact_url(url)!r}; only http(s) "
            "URLs with a host are used. The service's answer is malformed; report it.")
    if parts.scheme == "http" and not _is_loopback(url) and not allow_insecure_http:
        raise errors.InsecureTransportError(
            f"{what}: refusing to send or fetch data over plain http to {parts.hostname} (from "
            f"{redact_url(url)!r}); face photos and results travel only over https. If you really mean it, "
            "create the client with allow_insecure_http=True.")


# --------------------------------------------------------------------------- policies


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter (contract §8.1).

    ``delay(n) = uniform(0, min(cap, base * factor**n))`` for retry ``n`` (0-based).
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    max_retries_429: int = 5
    max_retries_5xx: int = 3
    max_retries_connection: int = 3
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random | None = None

    def delay(self, attempt: int) -> float:
        rng = self.rng or random
        return rng.uniform(0, min(self.cap, self.base * self.factor ** attempt))


@dataclass
class PollSchedule:
    """When to poll a running task: wait ``first`` seconds, then multiply by ``factor`` up to ``cap``.

    The defaults spend few requests on the cloud, where polls count against the rate limit:
    tasks typically finish in 5-7 s, so the first poll at 7 s usually finds the task done (one
    poll per task); slower tasks are polled 1.5x less often each time, but at least every 10 s.
    The caller's deadline always wins.
    """

    first: float = 7.0
    factor: float = 1.5
    cap: float = 10.0
    minimum: float = 0.05

    def delays(self) -> Iterable[float]:
        delay = self.first
        while True:
            yield max(self.minimum, delay)
            delay = min(self.cap, max(delay * self.factor, self.minimum))


#: A schedule for the local backend, whose tasks finish in about a second.
LOCAL_POLL = PollSchedule(first=0.3, factor=1.5, cap=2.0)


class RateLimiter:
    """A sliding-window limiter shared by every thread that uses one API key.

    Keeps at most ``limit`` requests in any ``window`` seconds (the service allows 250 per
    300 s; the default leaves a small margin).
    """

    _shared: dict[tuple[str, str], "RateLimiter"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, limit: int = 240, window: float = 300.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.limit, self.window = limit, window
        self._clock, self._sleep = clock, sleep
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    @classmethod
    def for_key(cls, base_url: str, key: str, **kw) -> "RateLimiter":
        import hashlib

        ident = (base_url, hashlib.sha256(key.encode()).hexdigest())
        with cls._shared_lock:
            if ident not in cls._shared:
                cls._shared[ident] = cls(**kw)
            return cls._shared[ident]

    def acquire(self, *, max_wait: float | None = None) -> float:
        """Block until a request may be sent; return the seconds waited.

        Parameters
        ----------
        max_wait : float, optional
            Wait at most this long (a caller's deadline). When no slot is free by then,
            :class:`TimeoutError` is raised and nothing is counted: send no request.
        """
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                while self._times and now - self._times[0] >= self.window:
                    self._times.popleft()
                if len(self._times) < self.limit:
                    self._times.append(now)
                    return waited
                pause = self.window - (now - self._times[0]) + 0.01
            if max_wait is not None:
                if waited >= max_wait:
                    raise TimeoutError(f"no request slot within {max_wait:g} s ({self.limit} per {self.window:g} s)")
                pause = min(pause, max_wait - waited)
            self._sleep(pause)
            waited += pause


# --------------------------------------------------------------------------- responses


#: The largest API answer read (a full HD ``format=json`` poll is about 10 kB).
MAX_ANSWER_BYTES = 8 * 1024 * 1024


def _buffer(resp: requests.Response, limit: int) -> bool:
    """Read a streamed body into ``resp`` unless it exceeds ``limit``; return True when it does."""
    declared = resp.headers.get("Content-Length", "")
    chunks: list[bytes] = []
    total = 0
    over = declared.isdigit() and int(declared) > limit
    if not over:
        try:
            for chunk in resp.iter_content(1 << 16):
                total += len(chunk)
                if total > limit:
                    over = True
                    break
                chunks.append(chunk)
        except BaseException:
            resp.close()
            raise
    if over:
        resp.close()
        chunks = []
    resp._content = b"".join(chunks)
    resp._content_consumed = True
    return over


def _request_id(resp: requests.Response | None) -> str | None:
    return resp.headers.get("x-request-id") if resp is not None else None


def _json_body(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def unwrap(body: Any) -> Any:
    """Return the payload of a success envelope: ``data``, else ``result``, else ``results`` (§9.2, 22)."""
    if isinstance(body, dict):
        for key in ("data", "result", "results"):
            if key in body:
                return body[key]
    raise errors.ResultFormatError("The response has none of the envelope keys data, result or results.")


def error_from_response(resp: requests.Response, *, context: str = "") -> APIError:
    """Map an HTTP error response to the exception tree, by status and ``error_code`` (§2.4)."""
    body = _json_body(resp)
    rid = _request_id(resp)
    status = resp.status_code
    if isinstance(body, dict):
        text = str(body.get("error") or body.get("message") or "")
        code = body.get("error_code")
        code = str(code) if code is not None else None
    else:
        snippet = re.sub(r"\s+", " ", resp.text[:200]) if resp.text else ""
        text, code = f"unexpected non-JSON answer: {snippet!r}", None
    where = f"{context}: " if context else ""
    kw = dict(status=status, code=code, request_id=rid)
    if status == 401:
        local = (" This is a local server: it accepts only the keys it was started with (skinlab serve --api-key, "
                 "or api_keys=)." if _is_loopback(getattr(resp, "url", None) or "") else "")
        return AuthenticationError(
            f"{where}the API key was refused ({text or 'unauthorized'}). Check SKINLAB_API_KEY: paste the key "
            "alone, without 'Bearer' or angle brackets; it may be inactive or expired in the YouCam console."
            + local, **kw)
    if status == 429:
        if _is_loopback(getattr(resp, "url", None) or ""):
            return RateLimitError(f"{where}rate limit reached ({text or 'Too many requests'}); this local emulator "
                                  "limits requests per key and per address (skinlab serve --rate-limit sets it; the "
                                  "service allows 250 per 300 s). Wait a few minutes.", **kw)
        return RateLimitError(f"{where}rate limit reached ({text or 'Too many requests'}); the service allows "
                              "250 requests per 300 s per key. Wait a few minutes.", **kw)
    if code == "InvalidTaskId" or text.strip().lower() == "invalid task id":
        return InvalidTaskIdError(f"{where}invalid task ID: the task is unknown, deleted, someone else's, or "
                                  "expired (tasks live 24 h after completion).", **kw)
    if code == "CreditInsufficiency":
        return InsufficientCreditsError(f"{where}not enough units for this task ({text}). Top up in the YouCam "
                                        "console or request fewer concerns.", **kw)
    if status >= 500:
        return ServerError(f"{where}the service failed ({text or 'server error'}); safe calls are retried, "
                           "try again later.", **kw)
    if status in (400, 422) and code in (None, "InvalidParameters", "BadRequest"):
        return InvalidParametersError(f"{where}the service rejected the request: {text}", **kw)
    return APIError(f"{where}HTTP {status}: {text or resp.reason}", **kw)


# --------------------------------------------------------------------------- tasks


@dataclass
class SubmissionPlan:
    """A validated, pre-flighted submission, before (and after) its network calls.

    :meth:`Client.plan` makes one without any network call; :meth:`Client.upload_plan` and
    :meth:`Client.create` carry it out. The ledger records it between the steps.
    """

    kind: str  # "upload", "url" or "file_id"
    actions: tuple[str, ...]
    tier: str
    format: str = "zip"
    miniserver_args: dict[str, Any] = field(default_factory=dict)
    pf_camera_kit: bool | None = None
    file_name: str | None = None
    units: int = 0
    prepared: PreparedImage | None = None
    url: str | None = None
    file_id: str | None = None

    @property
    def source_key(self) -> str:
        """Identity of the source: the SHA-256 of the bytes sent, the URL, or the file id."""
        if self.prepared is not None:
            return f"sha256:{self.prepared.sha256}"
        if self.url is not None:
            return f"url:{self.url}"
        return f"file_id:{self.file_id}"

    def body(self) -> dict[str, Any]:
        """The create-task JSON body (§4.1)."""
        body: dict[str, Any] = {}
        if self.url is not None:
            body["src_file_url"] = self.url
        else:
            body["src_file_id"] = self.file_id
        body["dst_actions"] = list(self.actions)
        if self.miniserver_args:
            body["miniserver_args"] = dict(self.miniserver_args)
        body["format"] = self.format
        if self.pf_camera_kit is not None:
            body["pf_camera_kit"] = bool(self.pf_camera_kit)
        return body

    def source_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "key": self.source_key}
        if self.url is not None:
            info["url"] = self.url
        if self.file_id is not None:
            info["file_id"] = self.file_id
        p = self.prepared
        if p is not None:
            info.update(sha256=p.sha256, size=p.size, width=p.width, height=p.height, name=p.source_name,
                        changes=list(p.changes))
        return info




@dataclass
class TaskStatus:
    """One poll's answer."""

    state: str  # running | success | error
    error: str | None = None
    message: str | None = None
    results: Any = None
    request_id: str | None = None
    backend: str = "cloud"
    engine: str | None = None

    @property
    def done(self) -> bool:
        return self.state in ("success", "error")


class Task:
    """A submitted task. Returned at once by :meth:`Client.submit`.

    Use :meth:`status` for one poll, :meth:`wait` to block until it finishes (with a deadline),
    and :meth:`result` for the :class:`~skinlab.results.AnalysisResult`.
    """

    def __init__(self, client: "Client", task_id: str, *, actions: Iterable[str] = (), format: str = "zip",
                 api_version: str | None = None, source: Mapping[str, Any] | None = None,
                 units: int | None = None, created_at: float | None = None) -> None:
        self.client = client
        self.task_id = task_id
        self.actions = tuple(actions)
        self.format = format
        self.api_version = api_version or client.api_version
        self.source = dict(source or {})
        self.units = units
        self.created_at = created_at if created_at is not None else time.time()
        self.last_status: TaskStatus | None = None
        self._result = None

    def __repr__(self) -> str:
        state = self.last_status.state if self.last_status else "submitted"
        return f"<Task {self.task_id[:12]}... {state}, {len(self.actions)} actions, {self.format}>"

    def status(self) -> TaskStatus:
        """Poll once and return the :class:`TaskStatus`."""
        self.last_status = self.client._poll(self.task_id, self.api_version)
        return self.last_status

    def wait(self, timeout: float | None = 300.0, *, schedule: PollSchedule | None = None):
        """Poll until the task ends and return its :class:`~skinlab.results.AnalysisResult`.

        The deadline is on the monotonic clock and no poll is sent after it: it also bounds the
        retries of each poll (429, 5xx, dropped connections), whose backoff sleeps are cut to
        the time left.

        Raises
        ------
        TaskError
            (a subclass named after the engine code) when the task ended in ``error``.
        TaskTimeoutError
            When ``timeout`` seconds passed first, even while a poll was being retried; it
            keeps :attr:`task_id` so you can resume with ``client.task(task_id).wait()``
            instead of submitting again.
        """
        if self._result is not None:
            return self._result
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = iter((schedule or self.client.poll_schedule).delays())
        while True:
            status = self.last_status
            if status is None or not status.done:
                delay = next(delays)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0.01:
                        raise TaskTimeoutError(
                            f"Task {self.task_id} still running after {timeout:g} s. It is not lost: resume with "
                            f"client.task({self.task_id!r}).wait(); do not submit again (that bills twice).",
                            task_id=self.task_id)
                    delay = min(delay, remaining - 0.01)
                time.sleep(delay)
                # the deadline also bounds the poll's own retries (429, 5xx, connection errors)
                status = self.last_status = self.client._poll(self.task_id, self.api_version, deadline=deadline)
            if status.state == "success":
                from .results import AnalysisResult

                self._result = AnalysisResult.from_status(status, task=self)
                return self._result
            if status.state == "error":
                raise errors.task_error_for(status.error, status.message, task_id=self.task_id,
                                            request_id=status.request_id)

    def result(self, timeout: float | None = 300.0):
        """The :class:`~skinlab.results.AnalysisResult`, waiting for it if needed."""
        return self.wait(timeout)

    def delete(self) -> None:
        """Delete the finished task and its files on the service (free)."""
        self.client.delete_task(self.task_id)


# --------------------------------------------------------------------------- client


class Client:
    """A connection to the skin-analysis service, or to skinlab's local emulator.

    Parameters
    ----------
    api_key : str, optional
        The API key. Defaults to ``$SKINLAB_API_KEY``, then ``$YOUCAM_API_KEY``. Pasted forms such
        as ``"Bearer <sk-...>"`` are cleaned. Not needed for a loopback ``base_url``.
    base_url : str, optional
        The API host (default: the YouCam cloud). For the embedded emulator use
        :meth:`Client.local`, or the URL of ``skinlab serve``.
    api_version : {"v2.0", "v2.1"}
        Task endpoint version.
    upload_path : str
        The File API path used for upload slots (``/s2s/v2.0/file`` by default).
    timeout : (float, float)
        Connect and read timeouts for API calls (20 s, 60 s); the upload PUT uses ``put_timeout``.
    retry : RetryPolicy, poll_schedule : PollSchedule, rate_limiter : RateLimiter or False
        Tunables; by default a limiter is shared by every client using the same key and host.

    Examples
    --------
    >>> with skinlab.Client.local() as client:                          # doctest: +SKIP
    ...     result = client.submit("face.jpg", ["wrinkle", "pore"]).wait()
    """

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None, api_version: str = "v2.0",
                 upload_path: str = "/s2s/v2.0/file", timeout: tuple[float, float] = (20.0, 60.0),
                 put_timeout: float = 300.0, retry: RetryPolicy | None = None,
                 poll_schedule: PollSchedule | None = None, rate_limiter: RateLimiter | bool | None = None,
                 session: requests.Session | None = None, allow_insecure_http: bool = False) -> None:
        key = normalise_key(api_key)
        if key is None:
            key = environment_key()[1]
        if key is None and base_url is None:
            raise ConfigurationError(
                "No API key. Set one with skinlab.Client(api_key=...) or the SKINLAB_API_KEY (or YOUCAM_API_KEY) "
                "environment variable. To work offline without a key, use the embedded local backend: "
                "skinlab.Client.local(), or run `skinlab serve` and pass base_url=.")
        base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        parts = urlsplit(base)
        scheme = parts.scheme
        if scheme not in ("http", "https"):
            raise ConfigurationError(f"base_url must start with https:// (or http:// for a local server), got "
                                     f"{redact_url(base)!r}")
        if parts.query or parts.fragment:  # paths are appended to it: a query would end up inside them
            raise ConfigurationError(
                f"base_url must be the service's address without a query or fragment (…?{'…' if parts.query else ''}"
                f"{'#…' if parts.fragment else ''} found); give e.g. {redact_url(base)!r}. Keys go in api_key= or "
                "SKINLAB_API_KEY, never in the URL.")
        if scheme == "http" and not _is_loopback(base) and not allow_insecure_http:
            what = "an API key and face photos" if key is not None else "face photos and results"
            raise ConfigurationError(
                f"Refusing to send {what} over plain http to {parts.hostname}; use https, or pass "
                "allow_insecure_http=True if you really mean it.")
        if key is None:
            if not _is_loopback(base):
                raise ConfigurationError(
                    f"No API key for {redact_url(base)}. Set SKINLAB_API_KEY (or YOUCAM_API_KEY), or pass api_key=.")
            key = LOCAL_TOKEN
        if api_version not in API_VERSIONS:
            raise ConfigurationError(f"api_version must be one of {', '.join(API_VERSIONS)}, got {api_version!r}")
        errors.register_secret(key)
        _check_key_characters(key)
        self.__key = key
        self.allow_insecure_http = bool(allow_insecure_http)
        self.base_url = base
        self.api_version = api_version
        self.upload_path = upload_path
        self.timeout = timeout
        self.put_timeout = put_timeout
        self.retry = retry or RetryPolicy()
        self.poll_schedule = poll_schedule or (LOCAL_POLL if _is_loopback(base) else PollSchedule())
        if rate_limiter is None or rate_limiter is True:
            self.rate_limiter: RateLimiter | None = RateLimiter.for_key(base, key)
        else:
            self.rate_limiter = rate_limiter or None
        self.session = session or requests.Session()
        self.session.trust_env = True
        self.backend = "local" if _is_loopback(base) else "cloud"
        self.engine: str | None = None
        self._server = None  # an embedded LocalServer owned by this client

    # ---- construction helpers

    @classmethod
    def local(cls, **settings) -> "Client":
        """A client bound to a fresh embedded local backend (stopped by :meth:`close`).

        Keyword arguments go to :class:`skinlab.local.ServerConfig` (for example
        ``task_duration_s=0``); client options (``api_version``, ``poll_schedule``, ``retry``)
        are passed to the client. No API key is sent to the embedded backend, even when one is set,
        unless ``api_key=`` is given (e.g. to try the emulator's per-key limits with ``api_keys=``).
        """
        from . import local

        client_kw = {k: settings.pop(k) for k in ("api_version", "poll_schedule", "retry", "timeout")
                     if k in settings}
        api_key = settings.pop("api_key", None) or LOCAL_TOKEN
        settings.setdefault("task_duration_s", 0.0)
        server = local.LocalServer(**settings)
        server.start()
        try:
            # the embedded engine needs no key: the user's (from the environment) is never sent to it
            client = cls(api_key=api_key, base_url=server.url, **client_kw)
        except Exception:
            server.stop()
            raise
        client._server = server
        return client

    def __repr__(self) -> str:
        return f"<skinlab.Client {self.backend} {redact_url(self.base_url)} {self.api_version} key=***>"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (and the embedded server, if this client started one)."""
        self.session.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    # ---- low-level HTTP

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _api(self, method: str, path: str, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
             safe: bool = True, context: str = "", raw: bool = False, deadline: float | None = None,
             task_id: str | None = None) -> tuple[Any, requests.Response]:
        """One API-host call with the retry policy; returns (payload, response).

        The payload is the envelope's ``data`` (or ``result``/``results``), or the whole body
        with ``raw=True``.

        ``deadline`` is a :func:`time.monotonic` instant that wins over the retries: each
        backoff sleep (and a wait for the rate limiter) is cut to the time left, the request
        timeouts too, no request is sent at or after it, and when it passes
        :class:`~skinlab.errors.TaskTimeoutError` is raised, carrying ``task_id``.
        """
        retries = {"429": 0, "5xx": 0, "conn": 0}
        attempt = 0
        last: str | None = None            # what the client was doing when the deadline passed
        last_resp: requests.Response | None = None

        def time_left() -> float | None:
            """Seconds before the deadline (None without one); raises once it has passed."""
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise _deadline_error(task_id, context, last, last_resp)
            return left

        def backoff(delay: float) -> None:
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            self.retry.sleep(delay)

        while True:
            left = time_left()
            if self.rate_limiter is not None:
                try:
                    if left is None:
                        self.rate_limiter.acquire()
                    else:
                        self.rate_limiter.acquire(max_wait=left)
                except TimeoutError:
                    last = "waiting for a request slot under the client's rate limiter"
                    raise _deadline_error(task_id, context, last, last_resp) from None
                left = time_left()                  # the limiter may have waited
            timeout = self.timeout if left is None else _cap_timeout(self.timeout, left)
            headers = {"Authorization": _Secret(f"Bearer {self.__key}")}
            if json_body is not None:
                headers["Content-Type"] = "application/json"
            try:
                url = self._url(path)
                resp = self.session.request(method, url, json=json_body, params=params,
                                            headers=headers, auth=_BearerAuth(headers["Authorization"]),
                                            timeout=timeout, allow_redirects=False, stream=True,
                                            proxies=_proxies_for(url))
                oversized = _buffer(resp, MAX_ANSWER_BYTES)
            except requests.exceptions.RequestException as exc:
                never_sent = _never_connected(exc)
                if safe and deadline is not None and deadline - time.monotonic() <= 0:
                    last = f"waiting for the answer ({type(exc).__name__}, timeouts cut to the deadline)"
                    raise _deadline_error(task_id, context, last, None) from None
                if (safe or never_sent) and retries["conn"] < self.retry.max_retries_connection:
                    last, last_resp = f"retrying after a connection failure ({type(exc).__name__})", None
                    backoff(self.retry.delay(attempt))
                    retries["conn"] += 1
                    attempt += 1
                    continue
                if not safe and not never_sent:
                    raise TaskFateUnknownError(
                        f"{context or 'request'}: the connection failed after the request may have reached the "
                        f"service ({type(exc).__name__}). The task may exist and be billed; it was not re-sent. "
                        "Check your ledger or the console before submitting again.") from None
                raise SkinlabConnectionError(
                    f"{context or 'request'}: cannot reach {redact_url(self.base_url)} ({type(exc).__name__}). Check the "
                    "network, or work offline with skinlab.Client.local().") from None
            self._note_backend(resp)
            status = resp.status_code
            if status == 429 and retries["429"] < self.retry.max_retries_429:
                last, last_resp = "retrying after HTTP 429 (too many requests)", resp
                backoff(self.retry.delay(retries["429"]))
                retries["429"] += 1
                continue
            if status >= 500 and safe and retries["5xx"] < self.retry.max_retries_5xx:
                last, last_resp = f"retrying after HTTP {status}", resp
                backoff(self.retry.delay(retries["5xx"] + 1))
                retries["5xx"] += 1
                continue
            if status >= 500 and not safe:
                raise TaskFateUnknownError(
                    f"{context or 'request'}: the service answered HTTP {status} to a task creation; the task may "
                    "exist and be billed, so it was not re-sent. Check your ledger or the console before "
                    "submitting again.", status=status, request_id=_request_id(resp))
            if oversized:
                text = (f"{context or 'request'}: the answer is larger than {MAX_ANSWER_BYTES // (1 << 20)} MB, far "
                        "beyond any answer of this API; it was not read.")
                if not safe and status < 300:
                    raise TaskFateUnknownError(text + " The task may exist and be billed; it was not re-sent. Check "
                                               "your ledger or the console.", status=status,
                                               request_id=_request_id(resp))
                raise errors.ResultFormatError(text, status=status, request_id=_request_id(resp))
            if status >= 300:
                raise error_from_response(resp, context=context)
            body = _json_body(resp)
            if body is None:
                text = errors.redact(f"{context or 'request'}: expected JSON from {urlsplit(resp.url).path}, got "
                                     f"{resp.headers.get('Content-Type', 'no content type')}: {resp.text[:120]!r}")
                if not safe:
                    raise TaskFateUnknownError(text + ". The task may exist and be billed; it was not re-sent. Check "
                                               "your ledger or the console before submitting again.", status=status,
                                               request_id=_request_id(resp))
                raise errors.ResultFormatError(text, status=status, request_id=_request_id(resp))
            return (body if raw else unwrap(body)), resp

    def _note_backend(self, resp: requests.Response) -> None:
        """Label the instrument from the answer: skinlab's emulator says so in a header."""
        if resp.headers.get("x-skinlab-backend") == "local":
            engine = resp.headers.get("x-skinlab-engine")
            self.backend = "local"
            self.engine = f"skinlab-local {engine}" if engine else "skinlab-local"
        else:
            self.backend = "cloud"
            self.engine = f"youcam-skin-analysis {self.api_version}"

    def _storage(self, method: str, url: str, *, data: bytes | None = None, headers: Mapping[str, str] | None = None,
                 timeout: Any = None, stream: bool = False) -> requests.Response:
        """A storage call (no Authorization), retried as a safe call.

        Redirects are followed by hand (at most 5), and each hop must pass :func:`check_transport`:
        a redirect to plain http off loopback is refused, not followed.
        """
        attempt = 0
        while True:
            failure = None
            try:
                resp = self._storage_hops(method, url, data=data, headers=headers, timeout=timeout, stream=stream)
            except requests.exceptions.RequestException as exc:
                failure = type(exc).__name__
            if failure is not None:  # outside the except block: no chained urllib3 frames holding headers
                if attempt < self.retry.max_retries_connection:
                    self.retry.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise SkinlabConnectionError(f"storage {method} of {redact_url(url)} failed after "
                                             f"{attempt + 1} attempts: {failure}. Check the network and try again.")
            if (resp.status_code == 429 or resp.status_code >= 500) and attempt < self.retry.max_retries_5xx:
                resp.close()
                self.retry.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            return resp

    def _storage_hops(self, method: str, url: str, *, data, headers, timeout, stream) -> requests.Response:
        what = f"storage {method}"
        for _ in range(6):
            check_transport(url, allow_insecure_http=self.allow_insecure_http, what=what)
            resp = self.session.request(method, url, data=data, headers=dict(headers or {}), auth=_NO_AUTH,
                                        timeout=timeout or self.timeout, stream=stream, allow_redirects=False,
                                        proxies=_proxies_for(url))
            if not resp.is_redirect:
                return resp
            target = requests.compat.urljoin(resp.url, resp.headers.get("Location", ""))
            resp.close()
            if method != "GET" and resp.status_code not in (307, 308):
                raise UploadError(f"{what}: the storage answered HTTP {resp.status_code}, a redirect that would drop "
                                  "the upload; no task was created.", status=resp.status_code)
            what = f"storage {method} redirected by {urlsplit(url).hostname}"
            url = target
        raise errors.ResultFormatError(f"storage {method}: more than 5 redirects; giving up.")

    # ---- public API

    def upload(self, image, *, tier: str = "sd", downscale: bool = False, file_name: str | None = None,
               prepared: PreparedImage | None = None) -> str:
        """Run pre-flight, reserve an upload slot and PUT the bytes; return the ``file_id``.

        ``file_name`` is what the service sees (default: a neutral name from the image hash, so
        personal file names never leave the machine).
        """
        prep = prepared or prepare_image(image, tier=tier, downscale=downscale)
        name = file_name or prep.upload_name
        body = {"files": [{"content_type": prep.content_type, "file_name": name, "file_size": prep.size}]}
        payload, _ = self._api("POST", self.upload_path, json_body=body, context="upload slot")
        try:
            slot = payload["files"][0]
            file_id = slot["file_id"]
            req = slot["requests"][0]
        except (KeyError, IndexError, TypeError):
            raise errors.ResultFormatError("upload slot: the answer has no files[0].file_id/requests[0]") from None
        headers = _header_dict(req.get("headers"))
        headers.pop("Authorization", None)
        resp = self._storage(req.get("method", "PUT"), req["url"], data=prep.data, headers=headers,
                             timeout=(self.timeout[0], self.put_timeout))
        if resp.status_code != 200:
            raise UploadError(f"The image upload failed with HTTP {resp.status_code} ({_s3_code(resp)}); "
                              "no task was created.", status=resp.status_code, code=_s3_code(resp))
        return file_id

    def plan(self, source, actions, *, format: str = "zip", mask_overlay: bool = False,
             miniserver_args: Mapping[str, Any] | None = None, downscale: bool = False,
             file_name: str | None = None, pf_camera_kit: bool | None = None) -> "SubmissionPlan":
        """Validate everything and run pre-flight, with no network call; see :meth:`submit`."""
        validated = validate_actions(actions)
        fmt = validate_format(format)
        margs = validate_miniserver_args(miniserver_args)
        if mask_overlay:
            margs["enable_mask_overlay"] = True
        if pf_camera_kit is not None and self.api_version != "v2.1":
            raise InvalidParametersError("pf_camera_kit exists only on the v2.1 API; create the client with "
                                         "api_version='v2.1'.")
        kind, value = classify_source(source)
        plan = SubmissionPlan(kind=kind, actions=validated.names, tier=validated.tier, format=fmt,
                              miniserver_args=margs, pf_camera_kit=pf_camera_kit, file_name=file_name,
                              units=estimate_units(validated.names))
        if kind == "url":
            plan.url = value
        elif kind == "file_id":
            plan.file_id = value
        else:
            plan.prepared = prepare_image(source, tier=validated.tier, downscale=downscale)
            for change in plan.prepared.changes:
                log.info("pre-flight: %s", change)
            _refuse_colour_on_greyscale(plan.prepared, validated.names)
        return plan

    def upload_plan(self, plan: "SubmissionPlan") -> str:
        """Upload the plan's prepared image (if any, and not yet uploaded); return the file id."""
        if plan.file_id is None and plan.prepared is not None:
            plan.file_id = self.upload(None, prepared=plan.prepared, file_name=plan.file_name)
        if plan.file_id is None and plan.url is None:  # pragma: no cover - plan() guarantees one source
            raise InvalidParametersError("The plan has no source")
        return plan.file_id or ""

    def create(self, plan: "SubmissionPlan") -> Task:
        """Create the task of an uploaded plan (billed if it succeeds; never retried if its fate is unknown)."""
        self.upload_plan(plan)
        payload, resp = self._api("POST", f"/s2s/{self.api_version}/task/skin-analysis", json_body=plan.body(),
                                  safe=False, context="create task")
        try:
            task_id = payload["task_id"]
        except (KeyError, TypeError):
            raise errors.ResultFormatError("create task: the answer has no data.task_id") from None
        task = Task(self, task_id, actions=plan.actions, format=plan.format, source=plan.source_info(),
                    units=plan.units)
        task.request_id = _request_id(resp)  # the create call's x-request-id (recorded by the ledger)
        return task

    def submit(self, source, actions, *, format: str = "zip", mask_overlay: bool = False,
               miniserver_args: Mapping[str, Any] | None = None, downscale: bool = False,
               file_name: str | None = None, pf_camera_kit: bool | None = None,
               check_balance: bool = False) -> Task:
        """Create an analysis task and return its :class:`Task` at once.

        Parameters
        ----------
        source : path, bytes, binary file, PIL image, http(s) URL or file id
            A URL is sent as ``src_file_url``; a string that is neither an existing path nor a
            URL and looks like a file id is sent as ``src_file_id``; anything else is uploaded.
        actions : list of str or comma-separated str
            Action names (all HD or all SD). Checked before any network call.
        format : {"zip", "json"}
        mask_overlay : bool
            Masks blended over the photo (JPEG) instead of transparent PNGs.
        miniserver_args : dict, optional
            Further options (§4.3); unknown keys are errors.
        downscale : bool
            Allow downscaling images over 2560 px before upload.
        file_name : str, optional
            The name the service sees (default: neutral, from the image hash).
        pf_camera_kit : bool, optional
            v2.1 only.
        check_balance : bool
            Fetch the unit balance first and refuse (before uploading) if it is below the cost.
        """
        if check_balance:
            self.estimate(actions, check_balance=True)
        plan = self.plan(source, actions, format=format, mask_overlay=mask_overlay,
                         miniserver_args=miniserver_args, downscale=downscale, file_name=file_name,
                         pf_camera_kit=pf_camera_kit)
        return self.create(plan)

    def analyze(self, source, actions, *, timeout: float | None = 300.0, **options):
        """Submit and wait: ``client.analyze(photo, ["wrinkle"])`` returns an AnalysisResult."""
        return self.submit(source, actions, **options).wait(timeout)

    def task(self, task_id: str, *, api_version: str | None = None, actions: Iterable[str] = (),
             format: str = "zip") -> Task:
        """A handle for an existing task id, e.g. to resume waiting after a timeout."""
        return Task(self, task_id, api_version=api_version, actions=actions, format=format)

    def _poll(self, task_id: str, version: str, *, deadline: float | None = None) -> TaskStatus:
        """One poll (with the safe-call retries); ``deadline`` (monotonic) bounds it, see :meth:`_api`."""
        if not isinstance(task_id, str) or not task_id:
            raise InvalidParametersError("task_id must be a non-empty string")
        payload, resp = self._api("GET", f"/s2s/{version}/task/skin-analysis/{task_id}", context="poll",
                                  deadline=deadline, task_id=task_id)
        if not isinstance(payload, dict):
            raise errors.ResultFormatError("poll: data is not an object")
        state = payload.get("task_status") or payload.get("status")
        if state not in ("running", "success", "error"):
            raise errors.ResultFormatError(f"poll: unknown task_status {state!r}")
        return TaskStatus(state=state, error=payload.get("error"), message=payload.get("error_message"),
                          results=payload.get("results"), request_id=_request_id(resp),
                          backend=self.backend, engine=self.engine)

    def delete_task(self, task_id: str) -> None:
        """Delete a finished task (§8.4)."""
        self._api("POST", "/s2s/v2.0/task/delete", json_body={"task_id": task_id}, context="delete task", raw=True)

    def credits(self) -> list[dict[str, Any]]:
        """The unit lots of the account (§8.3): dicts with type, amount_dec, expiry."""
        payload, _ = self._api("GET", "/s2s/v1.0/client/credit", context="credit balance")
        return list(payload or [])

    def balance(self) -> float:
        """Total units available (sum of ``amount_dec``)."""
        return float(sum(float(c.get("amount_dec", c.get("amount", 0)) or 0) for c in self.credits()))

    def feature_cost(self) -> list[dict[str, Any]]:
        """Every SKU of the feature-cost endpoint, following ``next_token`` pages."""
        skus: list[dict[str, Any]] = []
        token = None
        for _ in range(100):
            params: dict[str, Any] = {"page_size": 20}
            if token:
                params["starting_token"] = token
            payload, _ = self._api("GET", "/s2s/v2.0/credit/feature-cost", params=params, context="feature cost")
            skus.extend(payload.get("skus") or [])
            token = payload.get("next_token")
            if not token:
                break
        return skus

    def estimate(self, actions, *, check_balance: bool = False) -> int:
        """Units one successful task with these actions costs (§8.2).

        With ``check_balance=True`` the account balance is fetched too, and
        :class:`~skinlab.errors.InsufficientCreditsError` is raised if it is lower, before any task
        is created.
        """
        units = estimate_units(validate_actions(actions).names)
        if check_balance:
            balance = self.balance()
            if balance < units:
                raise InsufficientCreditsError(
                    f"This task costs {units} units but the balance is {balance:g}. Top up in the YouCam console "
                    "or request fewer concerns (1-4 concerns cost the least).", code="CreditInsufficiency")
        return units

    def refreshing_download(self, task: "Task") -> Callable[[str], bytes]:
        """A download function that, when a result URL has expired (HTTP 403), polls ``task``
        again for fresh URLs (§8.5) and retries with the new URL of the same file."""

        def fetch(url: str) -> bytes:
            try:
                return self.download(url)
            except APIError as exc:
                if exc.status != 403:
                    raise
            name = urlsplit(url).path.rsplit("/", 1)[-1]
            status = task.status()
            for fresh in _urls_in(status.results):
                if urlsplit(fresh).path.rsplit("/", 1)[-1] == name:
                    log.info("result URL expired; polled again for a fresh one")
                    return self.download(fresh)
            raise errors.ResultFormatError(f"The refreshed task no longer lists {name}.")

        return fetch

    def download(self, url: str, *, max_bytes: int = 200 * 1024 * 1024) -> bytes:
        """GET a result URL (no Authorization) with a size limit.

        A body that stops early (connection dropped, or no data within the read timeout) is
        fetched again (a safe call), then raises :class:`~skinlab.errors.SkinlabConnectionError`.
        """
        for attempt in range(self.retry.max_retries_connection + 1):
            failure = None
            try:
                return self._download_once(url, max_bytes)
            except requests.exceptions.RequestException as exc:
                failure = f"{type(exc).__name__}"
            if attempt < self.retry.max_retries_connection:
                self.retry.sleep(self.retry.delay(attempt))
        raise SkinlabConnectionError(
            f"The download of {redact_url(url)} stopped before the end ({failure}), {attempt + 1} times. Nothing "
            "was saved from it; poll the task again later (the results stay available for 24 h).")

    def _download_once(self, url: str, max_bytes: int) -> bytes:
        resp = self._storage("GET", url, stream=True)
        try:
            if resp.status_code != 200:
                code = _s3_code(resp)
                raise APIError(f"Download failed with HTTP {resp.status_code} ({code}). Result URLs expire "
                               "after 2 h; polling the task again gives fresh ones.", status=resp.status_code,
                               code=code)
            if _buffer(resp, max_bytes):
                raise errors.ResultFormatError(f"The download is larger than the {max_bytes}-byte limit; it was "
                                               "not read.")
            return resp.content
        finally:
            resp.close()      # back to the pool (or dropped) whatever happened


def _cap_timeout(timeout: Any, left: float) -> Any:
    """The request timeouts cut to the ``left`` seconds before a deadline (never below 50 ms)."""
    left = max(left, 0.05)
    if isinstance(timeout, tuple):
        return tuple(min(t, left) if t is not None else left for t in timeout)
    return left if timeout is None else min(timeout, left)


def _deadline_error(task_id: str | None, context: str, last: str | None,
                    resp: requests.Response | None) -> TaskTimeoutError:
    """The error for a caller's deadline that passed while a call was retried or not yet sent."""
    why = f" while {last}" if last else ""
    if task_id:
        text = (f"Task {task_id}: the deadline passed{why}; no {context or 'request'} was sent after it. The task "
                f"is not lost: resume with client.task({task_id!r}).wait(); do not submit again (that bills twice).")
    else:
        text = f"{context or 'request'}: the deadline passed{why}; nothing was sent after it. Try again later."
    return TaskTimeoutError(text, task_id=task_id, status=resp.status_code if resp is not None else None,
                            request_id=_request_id(resp))


def _urls_in(results: Any) -> list[str]:
    """Every URL in a poll's ``results`` (ZIP URL, mask URLs), in any of the contract's shapes."""
    if isinstance(results, str):
        return [results]
    urls: list[str] = []
    if isinstance(results, dict):
        if isinstance(results.get("url"), str):
            urls.append(results["url"])
        for item in results.get("output") or []:
            if isinstance(item, dict):
                urls.extend(u for u in item.get("mask_urls") or [] if isinstance(u, str))
    return urls


def _never_connected(exc: BaseException) -> bool:
    """True when no byte of the request can have reached the server."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        import urllib3.exceptions as u3

        reason = exc.args[0] if exc.args else None
        inner = getattr(reason, "reason", reason)
        return isinstance(inner, (u3.NewConnectionError, u3.ConnectTimeoutError))
    return False


def _header_dict(headers: Any) -> dict[str, str]:
    """Upload headers as an object or a list of {key, value} (§3.3); values as strings."""
    if isinstance(headers, dict):
        return {str(k): str(v) for k, v in headers.items()}
    if isinstance(headers, list):
        out = {}
        for item in headers:
            if isinstance(item, dict) and "key" in item:
                out[str(item["key"])] = str(item.get("value", ""))
        return out
    return {}


def _s3_code(resp: requests.Response) -> str:
    m = re.search(r"<Code>([^<]+)</Code>", resp.text or "")
    return m.group(1) if m else f"HTTP {resp.status_code}"


_FILE_ID = re.compile(r"^[A-Za-z0-9+/=_-]{16,}$")


def _refuse_colour_on_greyscale(prepared, names) -> None:
    """A greyscale photo has no colour to measure: refuse the colour concerns before anything is
    sent (they would come back as normal-looking but meaningless scores)."""
    if not prepared.greyscale:
        return
    colour = colour_actions(names)
    if colour:
        label = repr(prepared.source_name) if prepared.source_name else "The photo"
        raise errors.ImageError(
            f"{label} is a greyscale photo, and {', '.join(colour)} {'measures' if len(colour) == 1 else 'measure'} "
            "colour, which it does not hold. "
            "Drop those actions for this photo (wrinkles, pores, texture and the other concerns can still be "
            "measured), or use a colour photo.")


def classify_source(source: Any) -> tuple[str, Any]:
    """Say how a source is sent: ("url", url), ("file_id", id) or ("upload", source)."""
    if isinstance(source, str):
        scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]+):", source)  # two letters or more: not a drive letter
        if scheme and (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source)
                       or (scheme.group(1).lower() in ("data", "file", "javascript", "mailto", "about", "blob")
                           and not os.path.exists(source))):
            name = scheme.group(1).lower()
            if name not in ("http", "https"):
                hint = (" Decode it to bytes (base64.b64decode) and pass the bytes instead." if name == "data" else
                        " Pass the file's path instead." if name == "file" else
                        " Download the image and pass the file path instead.")
                raise InvalidParametersError(f"Only http(s) image URLs can be sent, got a {name}: URL.{hint}")
            if not urlsplit(source).hostname:
                raise InvalidParametersError(f"The URL {source!r} has no host name; give the full address of a "
                                             "publicly reachable JPEG or PNG, e.g. https://example.com/face.jpg.")
            return "url", source
        if not os.path.exists(source) and _FILE_ID.match(source) and not re.search(r"\.(jpe?g|png)$", source, re.I):
            return "file_id", source
    return "upload", source


# --------------------------------------------------------------------------- choosing a backend

_shared_server = None
_shared_lock = threading.Lock()


def _shared_local_url() -> str:
    """URL of a process-wide embedded local backend, started on first use and stopped at exit."""
    global _shared_server
    with _shared_lock:
        if _shared_server is None:
            import atexit

            from . import local

            server = local.LocalServer(task_duration_s=0.0)
            server.start()
            atexit.register(server.stop)
            _shared_server = server
        return _shared_server.url


#: Where a client made without a key looks for one, in order.
KEY_VARIABLES = ("SKINLAB_API_KEY", "YOUCAM_API_KEY")


def environment_key() -> tuple[str | None, str | None]:
    """``(variable, key)``: the first of :data:`KEY_VARIABLES` holding a key, cleaned by
    :func:`normalise_key`; ``(None, None)`` when neither does."""
    for name in KEY_VARIABLES:
        key = normalise_key(os.environ.get(name))
        if key:
            return name, key
    return None, None


def has_api_key() -> bool:
    """True when ``SKINLAB_API_KEY`` or ``YOUCAM_API_KEY`` holds a key."""
    return environment_key()[1] is not None


def connect(api_key: str | None = None, *, base_url: str | None = None, local: bool | None = None,
            **client_kw) -> Client:
    """A client for the cloud when a key is available, else for the embedded local backend.

    Parameters
    ----------
    api_key : str, optional
        Defaults to ``$SKINLAB_API_KEY`` / ``$YOUCAM_API_KEY``.
    base_url : str, optional
        An explicit service or emulator URL; wins over everything else.
    local : bool, optional
        Force the local backend (True) or the cloud (False; raises without a key).
    """
    if base_url is not None:
        return Client(api_key, base_url=base_url, **client_kw)
    use_local = local if local is not None else (normalise_key(api_key) is None and not has_api_key())
    if use_local:  # the embedded engine needs no key: the user's is never sent to it
        return Client(LOCAL_TOKEN, base_url=_shared_local_url(), **client_kw)
    return Client(api_key, **client_kw)
