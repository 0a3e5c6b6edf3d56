"""Many photos through the local engine: any ``concurrent.futures`` executor, or a Dask cluster.

>>> from skinlab.local.engine.parallel import analyze_many
>>> results = analyze_many(["a.jpg", "b.jpg"], ["wrinkle", "pore"])          # doctest: +SKIP

* :func:`analyze_many` runs :func:`skinlab.local.engine.analyze` on each image in an executor and
  returns the results in input order. Without ``executor`` it starts a process pool (``spawn``
  start method, one worker per core by default) and shuts it down afterwards; pass any
  :class:`concurrent.futures.Executor` (a :class:`~concurrent.futures.ThreadPoolExecutor`, a
  long-lived process pool, ``distributed.Client.get_executor()``, ...) to control where the
  work runs.
* :func:`map_images` is the underlying ordered map of a picklable function over images.
* :func:`analyze_on_dask` submits the same work to a ``dask.distributed`` client (install the
  ``dask`` extra: ``pip install "skinlab[dask]"``), for collections that outgrow one machine.

Images may be HxWx3 uint8 arrays, PIL images, or file paths (read by the worker, so only the
path travels to it; EXIF orientation is applied). The engine is deterministic, so every route
gives results identical to a serial loop. Each worker keeps the engine's per-process caches.
With ``keep_masks=False`` the detection masks are dropped before results travel back (they are
most of a result's size); scores and measurements are kept.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Sequence

__all__ = ["analyze_many", "map_images", "analyze_on_dask", "default_executor", "load_rgb",
           "ImageFailed"]


class ImageFailed(Exception):
    """One image of a batch failed; ``index`` is its position, ``cause`` the original error
    (as text, so that it pickles from any worker)."""

    def __init__(self, index: int, cause: str):
        super().__init__(f"image {index}: {cause}")
        self.index = index
        self.cause = cause

    def __reduce__(self):
        return (ImageFailed, (self.index, self.cause))


def load_rgb(item: Any):
    """An image given as an array, a PIL image or a path -> HxWx3 uint8 numpy array."""
    import numpy as np

    if isinstance(item, (str, os.PathLike)):
        from PIL import Image, ImageOps

        with Image.open(item) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    if hasattr(item, "convert") and hasattr(item, "size"):       # a PIL image
        return np.asarray(item.convert("RGB"))
    return np.asarray(item)


def _init_worker() -> None:            # pragma: no cover - runs in worker processes
    import skinlab.local.engine  # noqa: F401  (import once per worker, before the first task)


def default_executor(max_workers: int | None = None) -> ProcessPoolExecutor:
    """The default pool: ``max_workers`` (default: the number of cores) processes started with
    ``spawn`` (safe in notebooks and threaded programs), each importing the engine once."""
    import multiprocessing

    n = max_workers or os.cpu_count() or 1
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)


def _strip_masks(analysis):
    from dataclasses import replace

    return replace(analysis, concerns={c: replace(m, masks={}) for c, m in analysis.concerns.items()})


def _analyze_item(item: Any, concerns: Sequence[str] | None, keep_masks: bool, index: int,
                  safe: bool):
    """Worker task: load, analyze, optionally drop masks. With ``safe`` an error comes back as
    an :class:`ImageFailed` value instead of being raised."""
    from skinlab.actions import CONCERNS

    from . import analyze

    try:
        rgb = load_rgb(item)
        res = analyze(rgb, list(concerns) if concerns is not None else list(CONCERNS))
        return res if keep_masks else _strip_masks(res)
    except Exception as exc:
        if not safe:
            raise
        return ImageFailed(index, f"{type(exc).__name__}: {exc}")


def map_images(func: Callable, images: Iterable[Any], *, executor: Executor | None = None,
               max_workers: int | None = None, args: tuple = ()) -> list:
    """``[func(image, *args) for image in images]`` run in ``executor`` (default: a fresh
    :func:`default_executor`, shut down afterwards), results in input order. ``func`` and the
    images must pickle for a process pool."""
    items = list(images)
    if not items:
        return []
    own = executor is None
    ex = default_executor(max_workers) if own else executor
    try:
        futures = [ex.submit(func, item, *args) for item in items]
        return [f.result() for f in futures]
    finally:
        if own:
            ex.shutdown(wait=True, cancel_futures=True)


def _check_on_error(on_error: str) -> bool:
    if on_error not in ("raise", "return"):
        raise ValueError("on_error must be 'raise' or 'return'")
    return on_error == "return"


def analyze_many(images: Iterable[Any], concerns: Sequence[str] | None = None, *,
                 executor: Executor | None = None, max_workers: int | None = None,
                 keep_masks: bool = True, on_error: str = "raise") -> list:
    """Analyze every image (all 16 concerns unless ``concerns`` is given) in ``executor``.

    Returns one :class:`~skinlab.local.engine.Analysis` per image, in input order. With
    ``on_error="raise"`` (default) the first failure is raised; with ``"return"`` a failed
    image gives an :class:`ImageFailed` in its place and the rest go on.
    """
    safe = _check_on_error(on_error)
    items = list(images)
    concerns = None if concerns is None else list(concerns)
    if not items:
        return []
    own = executor is None
    ex = default_executor(max_workers) if own else executor
    try:
        futures = [ex.submit(_analyze_item, item, concerns, keep_masks, i, safe)
                   for i, item in enumerate(items)]
        return [f.result() for f in futures]
    finally:
        if own:
            ex.shutdown(wait=True, cancel_futures=True)


def analyze_on_dask(client, images: Iterable[Any], concerns: Sequence[str] | None = None, *,
                    keep_masks: bool = True, on_error: str = "raise") -> list:
    """Analyze every image on a ``dask.distributed`` cluster through ``client`` (e.g.
    ``Client(LocalCluster())`` or a client of a remote scheduler). Paths must be readable by
    the workers. Results in input order; ``on_error`` as in :func:`analyze_many`.

    Needs the optional ``dask`` extra (``pip install "skinlab[dask]"``).
    """
    safe = _check_on_error(on_error)
    items = list(images)
    if not items:
        return []
    concerns = None if concerns is None else list(concerns)
    futures = [client.submit(_analyze_item, item, concerns, keep_masks, i, safe, pure=False)
               for i, item in enumerate(items)]
    try:
        return client.gather(futures)
    finally:
        for f in futures:
            f.release()
