"""Verify the webhooks the platform (or skinlab's emulator) sends when a task ends (contract §8.7).

The platform signs webhooks under the Standard Webhooks scheme: the ``webhook-signature`` header
holds one or more space-separated ``v1,<base64 HMAC-SHA256>`` values, each computed over
``<webhook-id>.<webhook-timestamp>.<raw body>`` with the key that follows ``whsec_`` in the
endpoint's secret (base64-decoded).

A webhook only says that a task ended (``{"created_at": ..., "data": {"task_id": ...,
"task_status": "success"}}``); it carries no results, so poll the task once to get them. It is
not confirmed that skin analysis emits webhooks at all, and waiting on a task never depends on
them: :meth:`skinlab.Task.wait` polls.

>>> from skinlab import webhooks                                        # doctest: +SKIP
>>> event = webhooks.verify(request.body, request.headers, secret)      # doctest: +SKIP
>>> result = client.task(event["data"]["task_id"]).wait()               # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, Iterable, Mapping

from .errors import ConfigurationError, ResultFormatError, WebhookSignatureError

__all__ = ["verify", "DEFAULT_TOLERANCE_S"]

#: How far the ``webhook-timestamp`` may be from the receiver's clock, either way (Standard Webhooks).
DEFAULT_TOLERANCE_S = 300

_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def verify(payload: bytes | bytearray | memoryview | str, headers: Mapping[str, str] | Iterable[tuple[str, str]],
           secret: str | bytes, *, tolerance_s: float | None = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> dict[str, Any]:
    """Check a received webhook's signature and timestamp; return its parsed JSON body.

    Parameters
    ----------
    payload : bytes or str
        The raw request body, exactly as received. Not a parsed-and-re-serialised dict: the
        signature covers the original bytes.
    headers : mapping or iterable of (name, value)
        The request headers, looked up case-insensitively (a plain dict, ``http.server``'s
        ``self.headers``, Flask's or Starlette's headers). ``webhook-id``,
        ``webhook-timestamp`` and ``webhook-signature`` are needed.
    secret : str or bytes
        The endpoint's signing secret, ``whsec_`` followed by base64 (as shown in the console,
        or as given to the emulator's ``webhook_secret``); or the already decoded key as bytes.
    tolerance_s : float or None, keyword-only
        The largest accepted difference, in seconds, between ``webhook-timestamp`` and ``now``,
        in either direction (default 300). None skips the check, for re-verifying a stored
        message later; never for live traffic, since it allows replays.
    now : float, keyword-only, optional
        The current Unix time in seconds (default :func:`time.time`), for tests.

    Returns
    -------
    dict
        The event, e.g. ``{"created_at": 1767225600, "data": {"task_id": "...",
        "task_status": "success"}}``. The platform retries a delivery with the same
        ``webhook-id``: use that header to drop duplicates.

    Raises
    ------
    WebhookSignatureError
        The headers are missing or malformed, no ``v1`` signature matches (tampered body,
        another secret), or the timestamp is outside the tolerance. Answer 4xx and drop it.
    ConfigurationError
        ``secret`` is not ``whsec_<base64>``: fix the receiver's setting.
    ResultFormatError
        The signature is valid but the body is not a JSON object.
    TypeError
        ``payload`` is not bytes or str.

    Notes
    -----
    Signatures are compared in constant time (:func:`hmac.compare_digest`). Signatures of other
    schemes in the header (such as ``v1a,``) are ignored; at least one ``v1`` must match.
    """
    key = _key(secret)
    body = _raw(payload)
    found = _header_lookup(headers)
    missing = [name for name in _HEADERS if not found.get(name)]
    if missing:
        raise WebhookSignatureError(
            f"webhook: missing header(s) {', '.join(missing)}; the request is not a signed webhook, or a proxy or "
            "framework dropped its headers. Pass the headers exactly as received.", code="missing_headers")
    msg_id, stamp, signature = (found[name].strip() for name in _HEADERS)
    signed = f"{msg_id}.{stamp}.".encode("utf-8") + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    candidates = [part[3:].encode("ascii", "replace") for part in signature.split() if part.startswith("v1,")]
    if not candidates:
        raise WebhookSignatureError(
            "webhook: the webhook-signature header holds no v1 signature (expected 'v1,<base64>', several "
            "separated by spaces).", code="bad_signature")
    matched = False
    for candidate in candidates:          # check every candidate: the time does not tell which one matched
        matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise WebhookSignatureError(
            f"webhook {msg_id!r}: no signature matches the body. It was altered (verify the raw body, before any "
            "JSON parsing or re-encoding), signed with another secret (check this endpoint's whsec_ secret), or "
            "not sent by the platform. Drop it.", code="bad_signature")
    try:
        sent_at = int(stamp)
    except ValueError:
        raise WebhookSignatureError(f"webhook {msg_id!r}: webhook-timestamp {stamp[:40]!r} is not Unix seconds.",
                                    code="bad_timestamp") from None
    if tolerance_s is not None:
        current = time.time() if now is None else float(now)
        skew = current - sent_at
        if abs(skew) > tolerance_s:
            when = f"{skew:.0f} s old" if skew > 0 else f"{-skew:.0f} s in the future"
            raise WebhookSignatureError(
                f"webhook {msg_id!r}: its timestamp is {when}, beyond the {tolerance_s:g} s tolerance: a replay, or "
                "a clock that is off (check NTP on this machine). Drop it; the task can still be polled.",
                code="stale_timestamp")
    try:
        event = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        event = None
    if not isinstance(event, dict):
        raise ResultFormatError(f"webhook {msg_id!r}: the signature is valid but the body is not a JSON object.")
    return event


def _key(secret: str | bytes) -> bytes:
    """The HMAC key: the base64 part of ``whsec_<base64>``, decoded (or raw bytes as given)."""
    if isinstance(secret, (bytes, bytearray)):
        if not secret:
            raise ConfigurationError("webhook secret: the key is empty.")
        return bytes(secret)
    if not isinstance(secret, str):
        raise ConfigurationError(f"webhook secret: expected a 'whsec_<base64>' string, got {type(secret).__name__}.")
    text = secret.strip()
    if not text.startswith("whsec_"):
        raise ConfigurationError(
            "webhook secret: expected 'whsec_' followed by base64, as the console shows it. (An API key is not a "
            "webhook secret.)")
    try:
        key = base64.b64decode(text[len("whsec_"):], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("webhook secret: the part after 'whsec_' is not valid base64; copy the whole "
                                 "secret again.") from None
    if not key:
        raise ConfigurationError("webhook secret: nothing follows 'whsec_'; copy the whole secret again.")
    return key


def _raw(payload: Any) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"webhook payload: pass the raw request body (bytes or str), not {type(payload).__name__}; "
                    "a parsed and re-serialised body no longer matches the signature.")


def _header_lookup(headers: Any) -> dict[str, str]:
    """The three webhook headers, found case-insensitively in any headers object."""
    items = headers.items() if hasattr(headers, "items") else headers
    found: dict[str, str] = {}
    for name, value in items:
        lowered = (name.decode("latin-1") if isinstance(name, bytes) else str(name)).lower()
        if lowered in _HEADERS and value is not None:
            found[lowered] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return found
