"""Which hosts are this machine (no third-party imports: used by the client, the ledger and the
local emulator alike)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["is_loopback_host", "is_loopback_url", "redact_url"]


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``, with or without
    brackets); False for names such as ``127.0.0.1.example.com``."""
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is this machine (see :func:`is_loopback_host`)."""
    return is_loopback_host(urlsplit(url).hostname)


def redact_url(url) -> str:
    """``url`` for messages: without its user info (``http://me:secret@host``) and its query
    (presigned signatures). Text that is no URL is returned as it is."""
    text = "" if url is None else str(url)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}{parts.path}"
