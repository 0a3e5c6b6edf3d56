"""Batch runs: a cohort in one call, within the rate limit, with a spending guard and progress.

:func:`analyze_many` submits many photos through a :class:`~skinlab.ledger.Ledger`, a few at a
time (a small thread pool), sharing the client's rate limiter. One image failing is recorded and
does not stop the others; account problems (a refused key, too few units) stop the run. A
``max_units`` cap stops before exceeding it; ``dry_run=True`` only says what would be submitted
and what it would cost. Ctrl-C stops starting new images; everything already sent is recorded
and :meth:`Ledger.resume` picks up tasks still running.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import errors
from .actions import resolve_actions, validate_actions

__all__ = ["BatchItem", "BatchReport", "analyze_many", "collect_images"]

log = logging.getLogger("skinlab")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Errors that concern the whole account or run, not one image: they stop the batch.
FATAL = (errors.AuthenticationError, errors.InsufficientCreditsError, errors.ConfigurationError)


def collect_images(images: Any) -> list[Any]:
    """Expand ``images`` into a list: a folder gives its JPEG/PNG files (sorted, not recursive);
    a path, bytes, PIL image or URL stays one item; a list is taken as it is."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise errors.InvalidParametersError(f"No .jpg, .jpeg or .png files in {str(images)!r}.")
        return files
    if isinstance(images, (str, os.PathLike, bytes, bytearray)) or hasattr(images, "read") or hasattr(images, "mode"):
        return [images]
    return list(images)


def _label(source: Any, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return text.rsplit("/", 1)[-1] if "://" in text else Path(text).name
    name = getattr(source, "name", None) or getattr(source, "filename", None)
    return Path(name).name if isinstance(name, str) and name else f"image #{index + 1}"


@dataclass
class BatchItem:
    """One image of a batch and what became of it."""

    index: int
    label: str
    outcome: str = "pending"  # done, reused, failed, skipped, interrupted, planned; running after Ctrl-C
    submission_id: int | None = None
    status: str | None = None
    units: int = 0
    error: str | None = None
    reason: str | None = None


@dataclass
class BatchReport:
    """The summary of a batch run (also a dry run)."""

    items: list[BatchItem]
    backend: str
    base_url: str
    units_estimated: int = 0
    balance: float | None = None
    dry_run: bool = False
    stopped: str | None = None
    ledger_path: str | None = None
    elapsed_s: float = 0.0
    ids: list[int] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for i in self.items if i.outcome == outcome)

    @property
    def units_spent(self) -> int:
        return sum(i.units for i in self.items if i.outcome == "done")

    @property
    def failures(self) -> dict[str, int]:
        """Failed images by reason (error code)."""
        return dict(Counter(i.reason or "error" for i in self.items if i.outcome == "failed"))

    def summary(self) -> str:
        if self.dry_run:
            lines = [f"DRY RUN on the {self.backend.upper()} backend ({self.base_url}): nothing was sent.",
                     f"  would submit {self.count('planned')} image(s), reuse {self.count('reused')} recorded, "
                     f"skip {self.count('skipped')} (pre-flight problems)",
                     f"  estimated cost {self.units_estimated} units"
                     + (f" against a balance of {self.balance:g}" if self.balance is not None else "")]
            if self.balance is not None and self.balance < self.units_estimated:
                lines.append("  the balance is too low for all of them")
        else:
            lines = [f"Batch on the {self.backend.upper()} backend ({self.base_url}) in {self.elapsed_s:.1f} s:",
                     f"  done {self.count('done')}, reused {self.count('reused')} (no new task), "
                     f"failed {self.count('failed')}, skipped {self.count('skipped')}"
                     + (f", not started {self.count('interrupted')}" if self.count("interrupted") else "")
                     + (f", still in flight {self.count('running')} (the ledger records how they end)"
                        if self.count("running") else ""),
                     f"  units spent {self.units_spent}"]
            for reason, n in sorted(self.failures.items()):
                lines.append(f"  failed with {reason}: {n}")
        for item in self.items:
            if item.outcome in ("failed", "skipped") and item.error:
                lines.append(f"  - {item.label}: {item.error}")
        if self.stopped:
            lines.append(f"  stopped early: {self.stopped}")
        if self.ledger_path:
            lines.append(f"  ledger: {self.ledger_path}")
        return "\n".join(lines)

    def frame(self):
        """The items as a DataFrame."""
        import pandas as pd

        return pd.DataFrame([vars(i) for i in self.items])

    def __repr__(self) -> str:
        return self.summary()


def _sentences(*parts: str | None) -> str:
    """Join message parts as sentences."""
    out = []
    for p in parts:
        if p:
            p = p.strip()
            out.append(p if p[-1:] in ".!?" else p + ".")
    return " ".join(out)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        import ipywidgets  # noqa: F401  - tqdm.auto draws a widget bar only when this is present
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(total=total, desc="skinlab", unit="image")


def analyze_many(images: Any, actions: str | Iterable[str] = "all", *, ledger=None, client=None, tags=None,
                 hd: bool = False, max_workers: int = 4, max_units: int | None = None, dry_run: bool = False,
                 progress: bool = True, timeout: float | None = 600.0, force: bool = False,
                 on_update: Callable[[BatchItem], None] | None = None, stop: threading.Event | None = None,
                 **options: Any) -> BatchReport:
    """Analyse many photos, recording everything in a ledger.

    Parameters
    ----------
    images : folder, list of sources, or one source
        A folder gives its .jpg/.jpeg/.png files. Sources are anything
        :meth:`skinlab.Client.submit` accepts.
    actions : str or list of str
        Concern or action names, or ``"all"``; ``hd`` picks the HD names.
    ledger : skinlab.Ledger or path, optional
        Where submissions are recorded (and reused: an image already analysed with the same
        actions is not billed again). Default: a new temporary ledger, reported in the summary.
    client : skinlab.Client, optional
        Default: the cloud when an API key is set, else the embedded local backend.
    tags : dict, TagSheet, FilenamePattern or callable, optional
        Per-image tags (subject, timepoint, condition, ...).
    max_workers : int
        Images in flight at once. The client's shared rate limiter keeps the total under the
        service's 250 requests / 300 s.
    max_units : int, optional
        Stop before the units of the tasks created by this run would exceed this.
    dry_run : bool
        Run pre-flight and the ledger look-up, fetch the balance, and report; send nothing billable.
    timeout : float, optional
        Seconds to wait per task (a late task stays ``timeout`` in the ledger, resumable).
    on_update : callable, optional
        Called with each :class:`BatchItem` as it changes (from worker threads).
    stop : threading.Event, optional
        Set it to stop starting new images (the forms use this).
    **options
        ``format``, ``mask_overlay``, ``miniserver_args``, ``downscale`` as for ``Client.submit``.
    """
    from .client import connect
    from .ledger import Ledger, LedgerReuseWarning

    names = list(validate_actions(resolve_actions(actions, hd=hd)).names)
    sources = collect_images(images)
    own_client = client is None
    client = client or connect()
    if ledger is None:
        folder = tempfile.mkdtemp(prefix="skinlab-batch-")
        ledger = Ledger(Path(folder) / "ledger.sqlite")
        warnings.warn(f"No ledger given: results are kept in a temporary ledger at {folder}. Pass "
                      "ledger=skinlab.Ledger('study/ledger.sqlite') to keep them.", UserWarning, stacklevel=2)
    elif not isinstance(ledger, Ledger):
        ledger = Ledger(ledger)
    stop = stop or threading.Event()
    items = [BatchItem(i, _label(s, i)) for i, s in enumerate(sources)]
    report = BatchReport(items=items, backend=client.backend, base_url=client.base_url, dry_run=dry_run,
                         ledger_path=str(ledger.path))
    try:
        if dry_run:
            _dry_run(report, sources, names, ledger, client, tags, force, options)
            return report
        with warnings.catch_warnings():
            # Each reuse is counted in the summary; one warning per image would bury it.
            warnings.filterwarnings("ignore", category=LedgerReuseWarning)
            _run(report, sources, names, ledger, client, tags, force, options, max_workers=max_workers,
                 max_units=max_units, timeout=timeout, progress=progress, on_update=on_update, stop=stop)
        return report
    finally:
        if own_client:
            client.close()


def _dry_run(report: BatchReport, sources, names, ledger, client, tags, force, options) -> None:
    total = 0
    for item, src in zip(report.items, sources):
        try:
            decision = ledger.lookup(client, src, names, **options)
        except errors.SkinlabError as exc:
            item.outcome, item.error, item.reason = "skipped", str(exc), exc.code or type(exc).__name__
            continue
        if decision.reusable and not force:
            item.outcome, item.submission_id = "reused", decision.submission_id
        else:
            item.outcome, item.units = "planned", decision.units
            total += decision.units
    report.units_estimated = total
    try:
        report.balance = client.balance()
    except errors.SkinlabError as exc:  # the balance is informative only
        log.warning("could not fetch the unit balance: %s", exc)


def _run(report: BatchReport, sources, names, ledger, client, tags, force, options, *, max_workers, max_units,
         timeout, progress, on_update, stop) -> None:
    t0 = time.monotonic()
    bar = _progress(len(sources), progress)
    budget_lock = threading.Lock()
    committed = [0]
    units_each = client.estimate(names)

    def notify(item: BatchItem) -> None:
        if on_update is not None:
            try:
                on_update(item)
            except Exception:  # a display callback must never break the batch
                log.exception("on_update callback failed")

    def work(item: BatchItem, src: Any) -> BatchItem:
        try:
            return attempt(item, src)
        finally:
            notify(item)  # in the worker, so a stop set by the callback is seen before the next image

    def attempt(item: BatchItem, src: Any) -> BatchItem:
        if stop.is_set():
            item.outcome = "interrupted"
            return item
        with budget_lock:
            if max_units is not None and committed[0] + units_each > max_units:
                item.outcome, item.reason = "skipped", "max_units"
                item.error = f"not submitted: it would take the run past max_units={max_units}"
                return item
            committed[0] += units_each
        item.outcome = "running"
        notify(item)
        try:
            sub = ledger.submit(client, src, names, tags=tags, force=force, wait=True, timeout=timeout, **options)
        except FATAL:
            with budget_lock:
                committed[0] -= units_each
            raise
        except errors.SkinlabError as exc:
            with budget_lock:
                committed[0] -= units_each
            item.outcome, item.error, item.reason = "failed", str(exc), exc.code or type(exc).__name__
            return item
        item.submission_id, item.status = sub.id, sub.status
        if sub.reused:
            with budget_lock:
                committed[0] -= units_each
        if sub.status == "success":
            item.outcome = "reused" if sub.reused else "done"
            item.units = 0 if sub.reused else (sub.units_charged or 0)
        else:
            item.outcome = "failed"
            item.reason = sub.error_code or sub.status
            item.error = _sentences(sub.error_message, sub.next_step) or sub.status
        return item

    pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="skinlab-batch")
    pending: dict[Future, BatchItem] = {}
    interrupted = False
    try:
        for item, src in zip(report.items, sources):
            pending[pool.submit(work, item, src)] = item
        while pending:
            done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    if isinstance(exc, FATAL):
                        item.outcome, item.error, item.reason = "failed", str(exc), exc.code or type(exc).__name__
                        report.stopped = f"{type(exc).__name__}: {exc}"
                        stop.set()
                    else:
                        item.outcome, item.error, item.reason = "failed", f"{type(exc).__name__}: {exc}", "bug"
                        log.error("unexpected error on %s", item.label, exc_info=exc)
                    notify(item)
                if item.submission_id is not None:
                    report.ids.append(item.submission_id)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{item.label}: {item.outcome}", refresh=False)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        report.stopped = ("interrupted (Ctrl-C): no new images were started; tasks already created are "
                          "recorded, and ledger.resume(client) finishes them")
        for fut, item in pending.items():
            if fut.cancel():
                item.outcome = "interrupted"
    finally:
        # After Ctrl-C, do not block: workers still polling record their outcome when it comes.
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        if bar is not None:
            bar.close()
        for item in report.items:
            # Not started: interrupted. Started: its worker goes on and the ledger records the outcome.
            if item.outcome == "pending" and stop.is_set():
                item.outcome = "interrupted"
        report.elapsed_s = time.monotonic() - t0
