"""One-call helpers for notebooks: analyse a photo on the cloud or the local backend."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from .actions import resolve_actions

__all__ = ["analyze", "submit"]

log = logging.getLogger("skinlab")


def submit(image, actions: str | Iterable[str], *, hd: bool = False, api_key: str | None = None,
           base_url: str | None = None, local: bool | None = None, **options: Any):
    """Submit one photo and return the :class:`~skinlab.client.Task` at once.

    ``actions`` may use concern names (``"wrinkle"``, ``"dark_circle"``) or ``"all"``; ``hd``
    picks the HD or SD names. The backend is the cloud when an API key is set, else the embedded
    local backend (``local=True`` forces it).
    """
    from .client import connect

    client = connect(api_key, base_url=base_url, local=local)
    names = resolve_actions(actions, hd=hd)
    log.info("skinlab: analysing on the %s backend (%s)", client.backend, client.base_url)
    return client.submit(image, names, **options)


def analyze(image, actions: str | Iterable[str] = "all", *, hd: bool = False, timeout: float | None = 300.0,
            api_key: str | None = None, base_url: str | None = None, local: bool | None = None,
            **options: Any):
    """Analyse one photo and return its :class:`~skinlab.results.AnalysisResult`.

    Examples
    --------
    >>> result = skinlab.analyze("face.jpg", "wrinkle,pore,redness")    # doctest: +SKIP
    >>> result.scores                                                  # doctest: +SKIP
    """
    return submit(image, actions, hd=hd, api_key=api_key, base_url=base_url, local=local,
                  **options).wait(timeout)
