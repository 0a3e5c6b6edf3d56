"""skinlab: a Jupyter-friendly toolkit for the YouCam AI Skin Analysis API v2.

Submit face photos for skin analysis, wait for the results and get tidy pandas tables and
aligned masks, from the cloud service (with an API key) or from the embedded local backend
(no key, no internet), which measures the skin from the pixels.

>>> import skinlab
>>> result = skinlab.analyze("face.jpg", ["wrinkle", "pore", "redness"])   # doctest: +SKIP
>>> result.scores                                                           # doctest: +SKIP

Heavy parts (HTTP, pandas, the local engine) are imported on first use, so ``import skinlab``
stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import errors
from .actions import CATALOGUE, estimate_units, resolve_actions, validate_actions, validate_miniserver_args
from .errors import *  # noqa: F401,F403 - the exception tree is public

__version__ = "0.1.0"

_LAZY = {
    "Client": "skinlab.client",
    "Task": "skinlab.client",
    "TaskStatus": "skinlab.client",
    "RetryPolicy": "skinlab.client",
    "PollSchedule": "skinlab.client",
    "RateLimiter": "skinlab.client",
    "connect": "skinlab.client",
    "AnalysisResult": "skinlab.results",
    "prepare_image": "skinlab.images",
    "PreparedImage": "skinlab.images",
    "analyze": "skinlab.helpers",
    "submit": "skinlab.helpers",
    "sample_portrait": "skinlab.samples",
    "Ledger": "skinlab.ledger",
    "analyze_many": "skinlab.batch",
    "app": "skinlab.widgets",
}
_SUBMODULES = {"local", "samples", "cli", "client", "results", "images", "helpers", "ledger", "tags", "plots", "display",
               "batch", "widgets", "actions", "webhooks"}

__all__ = [
    "__version__",
    "CATALOGUE",
    "AnalysisResult",
    "Client",
    "Ledger",
    "PollSchedule",
    "PreparedImage",
    "RateLimiter",
    "RetryPolicy",
    "Task",
    "TaskStatus",
    "analyze",
    "analyze_many",
    "connect",
    "errors",
    "estimate_units",
    "prepare_image",
    "resolve_actions",
    "sample_portrait",
    "submit",
    "validate_actions",
    "validate_miniserver_args",
] + list(errors.__all__)


#: Lazy names that need an optional extra, and the extra. They stay out of ``__all__`` so that
#: ``from skinlab import *`` works on the core install.
_EXTRAS = {"app": ("ipywidgets", "notebook"), "widgets": ("ipywidgets", "notebook")}


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        need = _EXTRAS.get(name)
        if need and exc.name == need[0]:
            raise ModuleNotFoundError(f"skinlab.{name} needs {need[0]}, which is not installed: pip install "
                                      f"'skinlab[{need[1]}]' (or pip install {need[0]}).", name=need[0]) from exc
        raise


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_import(_LAZY[name], name), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _import(f"skinlab.{name}", name)
    raise AttributeError(f"module 'skinlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover
    from .batch import analyze_many
    from .client import Client, PollSchedule, RateLimiter, RetryPolicy, Task, TaskStatus, connect
    from .helpers import analyze, submit
    from .images import PreparedImage, prepare_image
    from .ledger import Ledger
    from .results import AnalysisResult
    from .samples import sample_portrait
    from .widgets import app
