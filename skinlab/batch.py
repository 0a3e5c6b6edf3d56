"""Batch runs: a cohort in one call, within the rate limit, with a spending guard and progress.

:func:`analyze_many` submits many photos through a :class:`~skinlab.ledger.Ledger`, a few at a
time (a small thread pool), sharing the client's rate limiter. One image failing is recorded and
does not stop the others; account problems (a refused key, too few units) stop the run. A
``max_units`` cap stops before exceeding it: units are reserved only for images that will create
a task (not for those the ledger already holds), in input order whatever the number of workers
(so the run sends the images its dry run lists), and given back when a task fails unbilled.
``dry_run=True`` only says what would be submitted and what it would cost. An image whose upload
slot or create call is still refused with HTTP 429 after the client's retries (nothing was
created) is tried again after a pause, a few times, instead of failing. The backend (cloud or
local) is stated on the progress bar, in the log at the start and in the summary. Ctrl-C stops
starting new images, and the images in flight stop at their next step (within
:data:`STOP_GRACE_S`), so nothing goes on behind the returned report: one not yet created is
recorded ``interrupted`` (nothing billed; the next run submits it), one whose task exists is
left ``running`` with its task id (:meth:`Ledger.resume` or the next run collects it; a local
one whose emulator has gone with its process is analysed again, free). Several processes may
run batches on one ledger at once, also each with its own embedded local emulator (see the
ledger's guarantees): an image another process is analysing is waited for, and reused.
"""

from __future__ import annotations

import logging
import os
import random
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
from ._net import redact_url
from .actions import resolve_actions, validate_actions
from .ledger import sentences

__all__ = ["BatchItem", "BatchReport", "FolderScan", "analyze_many", "collect_images", "scan_folder"]

log = logging.getLogger("skinlab")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Image types the service does not take: a folder's files of these types are left out and
#: listed in :attr:`FolderScan.others` (other files, e.g. notes or sheets, are skipped silently).
OTHER_IMAGE_SUFFIXES = frozenset({".webp", ".gif", ".heic", ".heif", ".avif", ".tif", ".tiff", ".bmp", ".jp2",
                                  ".jxl", ".dng"})
#: Errors that concern the whole account or run, not one image: they stop the batch.
FATAL = (errors.AuthenticationError, errors.InsufficientCreditsError, errors.ConfigurationError)
#: How many times an image refused with HTTP 429 before any task existed is tried again.
REQUEUES_AFTER_429 = 3
#: Images listed one by one in a dry run's summary (``report.frame()`` has them all).
LISTED_IN_DRY_RUN = 20
#: Seconds Ctrl-C waits for the images in flight to stop at their next step.
STOP_GRACE_S = 15.0


class _OverBudget(Exception):
    """Raised by the ``max_units`` reservation: creating this task would pass the cap."""


#: Files that operating systems leave beside photos (besides hidden files, whose names start with '.',
#: such as macOS's ``._NAME.jpg`` AppleDouble sidecars and ``.DS_Store``): never photos.
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


#: The keys of the ``result.json`` that :meth:`skinlab.results.AnalysisResult.save` writes: a folder
#: holding one is a result folder of skinlab's (its masks and resize_image.jpg are not photos).
_RESULT_JSON_KEYS = frozenset({"task_id", "format", "tier", "backend", "engine", "scores"})
#: The first bytes of an SQLite database file (a ledger).
_SQLITE_HEADER = b"SQLite format 3\x00"


def _is_result_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``result.json`` written by skinlab (``AnalysisResult.save``)."""
    import json

    path = folder / "result.json"
    try:
        if not path.is_file() or path.stat().st_size > 64 * 1024 * 1024:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and _RESULT_JSON_KEYS <= data.keys() and isinstance(data.get("scores"), list)


def _is_ledger_results(folder: Path) -> bool:
    """Whether ``folder`` is a ledger's results directory: named ``results`` beside an SQLite file
    (the ledger, whatever its name), as :class:`~skinlab.ledger.Ledger` lays them out."""
    if folder.name != "results":
        return False
    try:
        siblings = [q for q in folder.parent.iterdir() if q.is_file() and not q.name.endswith(("-wal", "-shm",
                                                                                              "-journal"))]
    except OSError:
        return False
    for q in siblings:
        try:
            with open(q, "rb") as fh:
                if fh.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER:
                    return True
        except OSError:
            continue
    return False


@dataclass
class FolderScan:
    """What :func:`scan_folder` found in a folder."""

    files: list[Path]  # the photos, sorted (by relative path when recursive)
    skipped: list[Path]  # hidden and system files (``._S05_T0.jpg``, ``.DS_Store``, ``Thumbs.db``)
    subfolders: list[Path]  # subfolders holding photos that a search that is not recursive left out
    #: skinlab's own output folders, not searched: those holding a ``result.json`` written by skinlab
    #: (a per-photo result folder), and a ledger's ``results`` directory
    results: list[Path] = field(default_factory=list)
    #: image files of types the service does not take (WebP, GIF, HEIC, TIFF, ...), left out
    others: list[Path] = field(default_factory=list)

    def photos(self, folder: Any) -> list[Path]:
        """:attr:`files`, or an error saying why ``folder`` gave none."""
        if self.files:
            return self.files
        why = f"No .jpg, .jpeg or .png files in {str(folder)!r}"
        if self.results and self.results[0] == Path(folder):
            why += (" to analyse: it is a skinlab result folder (it holds skinlab's result.json), whose "
                    "images are skinlab's output, not photos. Give the folder of the original photos")
        elif self.subfolders:
            names = ", ".join(p.name for p in self.subfolders[:5]) + (", ..." if len(self.subfolders) > 5 else "")
            why += (f"; its subfolder(s) {names} hold some, and the search is not recursive. "
                    "Pass recursive=True to include subfolders")
        elif self.skipped:
            why += f" (only hidden or system files, skipped: {', '.join(p.name for p in self.skipped[:3])})"
        elif self.results:
            why += (f" outside skinlab's own result folders ({', '.join(p.name for p in self.results[:3])}), "
                    "which are skipped: their images are skinlab's output, not photos")
        raise errors.InvalidParametersError(why + ".")

    def skipped_line(self, folder: Any) -> str | None:
        """One line saying how many hidden or system files and skinlab result folders were skipped, or None."""
        parts = []
        if self.skipped:
            shown = ", ".join(p.name for p in self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            parts.append(f"{len(self.skipped)} hidden or system file(s) in {str(folder)!r} ({shown}): sidecar "
                         "files that macOS or Windows leave beside photos, not photos")
        if self.results:
            root = Path(folder)

            def name(p: Path) -> str:
                try:
                    return p.relative_to(root).as_posix() if p != root else str(folder)
                except ValueError:
                    return str(p)

            shown = ", ".join(name(p) for p in self.results[:3]) + (", ..." if len(self.results) > 3 else "")
            parts.append(f"{len(self.results)} skinlab result folder(s) "
                         + ("" if self.skipped else f"in {str(folder)!r} ")
                         + f"({shown}): skinlab's own output (result.json, masks, resize_image.jpg, a ledger's "
                           "results directory), not photos")
        if not parts:
            return None
        return "Skipped " + "; and ".join(parts) + "."


def scan_folder(folder: str | os.PathLike, *, recursive: bool = False,
                exclude: Iterable[str | os.PathLike] = ()) -> FolderScan:
    """The JPEG/PNG files of ``folder`` (and of its subfolders when ``recursive``), skipping hidden
    files and folders (names starting with '.'), system files such as ``Thumbs.db``, and skinlab's
    own output: a folder holding a ``result.json`` written by skinlab (its masks and
    ``resize_image.jpg``), a ledger's ``results`` directory, and the folders in ``exclude``."""
    root = Path(folder)
    files: list[Path] = []
    skipped: list[Path] = []
    subfolders: list[Path] = []
    results: list[Path] = []
    others: list[Path] = []
    excluded = set()
    for e in exclude:
        try:
            excluded.add(Path(e).expanduser().resolve())
        except (OSError, RuntimeError):
            pass

    def skinlab_output(p: Path) -> bool:
        try:
            if p.resolve() in excluded:
                return True
        except (OSError, RuntimeError):
            pass
        return _is_result_folder(p) or _is_ledger_results(p)

    def has_photos(here: Path) -> bool:
        """Whether a search of ``here`` that is recursive would find photos."""
        if skinlab_output(here):
            return False
        for q in sorted(here.iterdir()):
            if _hidden(q.name):
                continue
            if q.is_dir():
                if has_photos(q):
                    return True
            elif q.suffix.lower() in IMAGE_SUFFIXES and q.is_file():
                return True
        return False

    def walk(here: Path) -> None:
        for p in sorted(here.iterdir()):
            if _hidden(p.name):
                if p.is_file() or recursive:
                    skipped.append(p)
            elif p.is_dir():
                if recursive:
                    if skinlab_output(p):
                        results.append(p)
                    else:
                        walk(p)
                elif has_photos(p):
                    subfolders.append(p)
            elif p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                files.append(p)
            elif p.suffix.lower() in OTHER_IMAGE_SUFFIXES and p.is_file():
                others.append(p)

    if skinlab_output(root):  # e.g. skinlab analyze out/S01_T0: its files are skinlab's output
        results.append(root)
    else:
        walk(root)
    return FolderScan(files=files, skipped=skipped, subfolders=subfolders, results=results, others=others)


def collect_images(images: Any, *, recursive: bool = False, exclude: Iterable[str | os.PathLike] = ()) -> list[Any]:
    """Expand ``images`` into a list: a folder gives its JPEG/PNG files (sorted; those of its
    subfolders too when ``recursive``), skipping hidden files (``._S05_T0.jpg``, ``.DS_Store``),
    system files (``Thumbs.db``) and skinlab's own result folders (see :func:`scan_folder`); a
    path, bytes, PIL image or URL stays one item; a list is taken as it is."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        scan = scan_folder(images, recursive=recursive, exclude=exclude)
        if scan.skipped or scan.results:
            log.info("%s", scan.skipped_line(images))
        return scan.photos(images)
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
    """One image of a batch and what became of it.

    Attributes
    ----------
    outcome : str
        ``done``, ``reused``, ``failed`` (also an ambiguous create: ``status`` is then
        ``"ambiguous"``), ``skipped``, ``interrupted`` (not started, or stopped by Ctrl-C before
        its task was created: nothing billed); ``running`` while in flight, and after Ctrl-C for
        an image whose task was created (left running, its id kept). In a dry run: ``planned``
        (would be sent), ``reused``, ``held`` (the ledger holds an ambiguous, running or
        in-progress submission of it, so nothing would be sent; the decision is in ``reason``) or
        ``skipped`` (``reason`` ``max_units``, or a pre-flight problem's code: the run then submits
        it and records it ``failed``, which the summary says).
    status : str or None
        The ledger row's status.
    units : int
        Units billed (``done``), the estimated cost (``planned``), or the most an ambiguous create
        may have been billed (``status == "ambiguous"``); 0 otherwise.
    note : str or None
        For ``done``: why an image the ledger already had was analysed again (local only: another
        engine version, or its task lost with its emulator); for ``planned``, likewise.
    collected_units : int or None
        For ``reused``: the units of a task created before this run (e.g. by a run stopped with
        Ctrl-C) that finished during it, billed then; None otherwise.
    tag_conflicts : tuple of str
        For ``reused``: tags given that differ from the recorded ones (which were kept).
    """

    index: int
    label: str
    outcome: str = "pending"
    submission_id: int | None = None
    status: str | None = None
    units: int = 0
    error: str | None = None
    reason: str | None = None
    note: str | None = None
    collected_units: int | None = None
    tag_conflicts: tuple = ()

    @property
    def ambiguous(self) -> bool:
        """A create whose fate is unknown: a task may exist and be billed (never re-sent)."""
        return self.status == "ambiguous" and self.outcome == "failed"


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
        """Units billed for the tasks this run completed (ambiguous creates not included)."""
        return sum(i.units for i in self.items if i.outcome == "done")

    @property
    def ambiguous(self) -> list[BatchItem]:
        """Images whose create may or may not have reached the service (see :attr:`BatchItem.ambiguous`)."""
        return [i for i in self.items if i.ambiguous]

    @property
    def units_at_risk(self) -> int:
        """The most the ambiguous creates may have been billed."""
        return sum(i.units for i in self.ambiguous)

    @property
    def failures(self) -> dict[str, int]:
        """Failed images by reason (error code); ambiguous creates are in :attr:`ambiguous`."""
        return dict(Counter(i.reason or "error" for i in self.items if i.outcome == "failed" and not i.ambiguous))

    def summary(self) -> str:
        backend = f"the {self.backend.upper()} backend ({redact_url(self.base_url)})"
        if self.dry_run:
            held = Counter(i.reason or "held" for i in self.items if i.outcome == "held")
            # a pre-flight problem is "skipped" here (nothing would be sent) but the run records it as failed
            doomed = sum(1 for i in self.items if _fails_in_run(i))
            lines = [f"DRY RUN on {backend}: nothing was sent.",
                     f"  would submit {self.count('planned')} image(s), reuse {self.count('reused')} recorded"
                     + (f", skip {self.count('skipped') - doomed} (max_units)" if self.count("skipped") > doomed
                        else "")
                     + (f", fail {doomed} (pre-flight problems: the run records them as failed, nothing billed)"
                        if doomed else ""),
                     f"  estimated cost {self.units_estimated} units"
                     + (f" against a balance of {self.balance:g}" if self.balance is not None else "")]
            if held:
                lines.append(f"  held back {sum(held.values())} (0 units: the ledger already has them "
                             f"{', '.join(f'{k} {n}' for k, n in sorted(held.items()))}; nothing would be sent)")
            if self.balance is not None and self.balance < self.units_estimated:
                lines.append("  the balance is too low for all of them")
            again = Counter(i.note for i in self.items if i.outcome == "planned" and i.note)
            for why, n in sorted(again.items()):
                lines.append(f"  would analyse again {n}: {why}")
            planned = [i for i in self.items if i.outcome == "planned"]
            if planned:
                lines.append("  would send:")
                lines += [f"    {i.label}: {i.units} units" for i in planned[:LISTED_IN_DRY_RUN]]
                if len(planned) > LISTED_IN_DRY_RUN:
                    lines.append(f"    ... and {len(planned) - LISTED_IN_DRY_RUN} more (report.frame() lists all)")
        else:
            lines = [f"Batch on {backend} in {self.elapsed_s:.1f} s:",
                     f"  done {self.count('done')}, reused {self.count('reused')} (no new task), "
                     f"failed {self.count('failed')}, skipped {self.count('skipped')}"
                     + (f", not started {self.count('interrupted')}" if self.count("interrupted") else "")
                     + (f", left running {self.count('running')} (their tasks exist: ledger.resume(client) or the "
                        "next run collects them)" if self.count("running") else ""),
                     f"  units spent {self.units_spent}"]
            differ = [i for i in self.items if i.tag_conflicts]
            if differ:
                shown = "; ".join(f"{i.label} ({', '.join(i.tag_conflicts)})" for i in differ[:3])
                lines.append(f"  tags differ from the recorded ones for {len(differ)} reused photo(s), which kept "
                             f"the recorded tags: {shown}" + (" ..." if len(differ) > 3 else "")
                             + " (the same bytes as a photo analysed before; ledger.tag(id, ...) changes them)")
            collected = [i for i in self.items if i.collected_units is not None]
            if collected:
                lines.append(f"  finished during this run: {len(collected)} task(s) created earlier (e.g. by a run "
                             f"stopped early), {sum(i.collected_units for i in collected)} units, billed when they "
                             "finished and not in units spent")
            again = Counter(i.note for i in self.items if i.outcome == "done" and i.note)
            for why, n in sorted(again.items()):
                lines.append(f"  analysed again {n}: {why}")
            if self.ambiguous:
                lines.append(f"  ambiguous {len(self.ambiguous)} (may be billed up to {self.units_at_risk} units; "
                             "never re-sent: see next_step in ledger.submissions(status='ambiguous'), then "
                             "ledger.resolve)")
            for reason, n in sorted(self.failures.items()):
                lines.append(f"  failed with {reason}: {n}")
        for item in self.items:
            if item.outcome in ("failed", "skipped", "held") and item.error:
                said = "would fail: " if self.dry_run and _fails_in_run(item) else ""
                lines.append(f"  - {item.label}: {said}{item.error}")
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


def _fails_in_run(item: BatchItem) -> bool:
    """A dry run's item skipped for a pre-flight problem (not for ``max_units``): the run submits it
    and records it as ``failed``."""
    return item.outcome == "skipped" and item.reason != "max_units"


def _progress(total: int, enabled: bool, backend: str | None = None):
    """A progress bar labelled with the backend (``skinlab local`` / ``skinlab cloud``), or None."""
    if not enabled:
        return None
    try:
        import ipywidgets  # noqa: F401  - tqdm.auto draws a widget bar only when this is present
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(total=total, desc=f"skinlab {backend}" if backend else "skinlab", unit="image")


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
        Stop before the units of the tasks created by this run would exceed this. Only images
        that create a task count (a recorded success reused, a running task waited for or an
        ambiguous row costs nothing); a task that fails unbilled gives its units back.
    dry_run : bool
        Run pre-flight and the ledger look-up, fetch the balance, and report what would be sent
        (each image and its units, within ``max_units``); send nothing billable.
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
            _dry_run(report, sources, names, ledger, client, tags, force, options, max_units=max_units)
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


#: A dry run's names for the ledger decisions that send nothing (``Lookup.decision``).
_HELD = {"attach": "running", "wait": "running", "ambiguous": "ambiguous", "busy": "busy"}


def _dry_run(report: BatchReport, sources, names, ledger, client, tags, force, options, *,
             max_units: int | None = None) -> None:
    """What :func:`_run` would do, decided by the same ledger look-up, at the same cost."""
    total = 0
    planned: dict[str, str] = {}  # source key -> the label of the first image planned with it
    for item, src in zip(report.items, sources):
        try:
            decision = ledger.lookup(client, src, names, force=force, **options)
        except errors.SkinlabError as exc:
            item.outcome, item.error, item.reason = "skipped", str(exc), exc.code or type(exc).__name__
            continue
        item.submission_id = decision.submission_id
        if decision.decision == "reuse":
            item.outcome = "reused"
        elif decision.creates_task and not force and decision.source_key in planned:
            # the same bytes earlier in this run: the run creates one task and reuses it here
            item.outcome = "reused"
            item.note = f"the same photo as {planned[decision.source_key]} earlier in this run: its result is reused"
        elif decision.decision in _HELD:
            item.outcome, item.reason, item.error = "held", _HELD[decision.decision], decision.note
        elif max_units is not None and total + decision.units > max_units:
            item.outcome, item.reason = "skipped", "max_units"
            item.error = (f"would not be submitted: its {decision.units} units would take the run past "
                          f"max_units={max_units}")
        else:
            item.outcome, item.units = "planned", decision.units
            item.note = decision.rerun
            total += decision.units
            planned.setdefault(decision.source_key, item.label)
    report.units_estimated = total
    try:
        report.balance = client.balance()
    except errors.SkinlabError as exc:  # the balance is informative only
        log.warning("could not fetch the unit balance: %s", exc)


def _creates_task(ledger, client, src, names, force, options) -> bool:
    """Whether the ledger look-up (the dry run's) says submitting ``src`` creates a task."""
    try:
        return ledger.lookup(client, src, names, force=force, **options).creates_task
    except errors.SkinlabError:  # pre-flight problems: the submit records them
        return False


def _run(report: BatchReport, sources, names, ledger, client, tags, force, options, *, max_workers, max_units,
         timeout, progress, on_update, stop) -> None:
    t0 = time.monotonic()
    started_at = time.time()  # the ledger's clock: rows created before it and finished after it
    log.info("skinlab batch: %d image(s) on the %s backend (%s), %d at a time%s", len(sources),
             client.backend.upper(), redact_url(client.base_url), max(1, max_workers),
             f", max_units={max_units}" if max_units is not None else "")
    bar = _progress(len(sources), progress, client.backend)
    budget_lock = threading.Lock()
    committed = [0]  # units reserved by images creating a task (kept when billed or maybe billed)
    halt = threading.Event()  # Ctrl-C: the images in flight stop at their next step too
    # With max_units, the units go to the images in input order, as the dry run lists them: an image
    # the ledger look-up says will create a task reserves only once every such image before it has
    # reserved (or been refused, or finished). Set: this image's reservation is decided.
    turns = [threading.Event() for _ in sources]

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
            turns[item.index].set()
            notify(item)  # in the worker, so a stop set by the callback is seen before the next image

    def wait_turn(item: BatchItem) -> bool:
        """Wait until the images before this one have had their units decided; False if stopped.
        Outside the ledger's transaction, so those images can reach theirs."""
        for before in turns[:item.index]:
            while not before.wait(0.05):
                if stop.is_set() or halt.is_set():
                    return False
        return True

    def row_of(exc: BaseException):
        """The ledger row an error of ``ledger.submit`` was recorded in, or None."""
        sid = getattr(exc, "submission_id", None)
        if sid is None:
            return None
        try:
            return ledger.get(sid)
        except errors.SkinlabError:  # pragma: no cover - the row was just written
            return None

    def attempt(item: BatchItem, src: Any) -> BatchItem:
        if stop.is_set() or halt.is_set():
            item.outcome = "interrupted"
            return item
        held = [0]  # units this image reserved (only when the ledger decides to create a task)

        def reserve(units: int) -> None:  # called by the ledger inside the transaction that claims the task
            try:
                with budget_lock:
                    if max_units is not None and committed[0] + units > max_units:
                        raise _OverBudget(units)
                    committed[0] += units
                    held[0] += units
            finally:
                turns[item.index].set()  # the next image in line may decide its own

        def release() -> None:  # nothing was billed: give the units back
            with budget_lock:
                committed[0] -= held[0]
                held[0] = 0

        if not turns[item.index].is_set() and not wait_turn(item):
            item.outcome = "interrupted"
            return item
        item.outcome = "running"
        notify(item)
        requeued = 0
        while True:
            try:
                sub = ledger.submit(client, src, names, tags=tags, force=force, wait=True, timeout=timeout,
                                    reserve=reserve, cancel=halt, **options)
                break
            except _OverBudget as over:
                item.outcome, item.reason = "skipped", "max_units"
                item.error = (f"not submitted: its {over.args[0]} units would take the run past "
                              f"max_units={max_units}")
                return item
            except errors.SkinlabError as exc:
                row = row_of(exc)
                if row is not None:
                    item.submission_id, item.status = row.id, row.status
                if row is None or row.units_charged == 0:
                    release()
                if isinstance(exc, FATAL):
                    raise
                nothing_created = row is None or (row.status == "error" and row.task_id is None)
                if isinstance(exc, errors.RateLimitError) and nothing_created and requeued < REQUEUES_AFTER_429:
                    # Refused before any task existed (upload slot or create answered 429 past the
                    # client's retries): wait for the window to move on, then try the image again.
                    policy = client.retry
                    pause = min(policy.cap, policy.base * policy.factor ** (policy.max_retries_429 + requeued))
                    pause *= 0.5 + random.random() / 2
                    requeued += 1
                    log.info("%s: still rate-limited (HTTP 429) with no task created; trying again in %.1f s "
                             "(%d of %d)", item.label, pause, requeued, REQUEUES_AFTER_429)
                    if stop.wait(pause) or halt.is_set():
                        item.outcome = "interrupted"
                        return item
                    continue
                item.outcome, item.error, item.reason = "failed", str(exc), exc.code or type(exc).__name__
                if requeued:
                    item.error = sentences(item.error, f"Tried {requeued + 1} times; nothing was billed, run the "
                                                        "batch again later")
                return item
            except BaseException as exc:   # not a skinlab error (a bug, a database failure): no units kept
                row = row_of(exc)
                if row is None or row.units_charged == 0:
                    release()
                raise
        item.submission_id, item.status = sub.id, sub.status
        if sub.reused or sub.units_charged == 0:
            release()  # this call created no task, or its task failed unbilled
        if sub.status == "success":
            item.outcome = "reused" if sub.reused else "done"
            item.units = 0 if sub.reused else (sub.units_charged or 0)
            item.note = None if sub.reused else sub.rerun
            if getattr(sub, "tag_conflicts", ()):
                item.tag_conflicts = tuple(sub.tag_conflicts)
            row = sub.row or {}
            if sub.reused and (row.get("created_at") or started_at) < started_at <= (row.get("completed_at") or 0):
                # a task created earlier (say, by a run stopped with Ctrl-C) that finished during this run
                item.collected_units = sub.units_charged or 0
        elif halt.is_set() and (sub.error_code == "interrupted" or (
                sub.reused and sub.status in ("running", "timeout", "queued", "uploading"))):
            # Ctrl-C before its task was created (nothing billed), or while waiting for another's
            item.outcome, item.error = "interrupted", sub.error_message or sub.note or None
        elif halt.is_set() and sub.status in ("running", "timeout"):
            item.outcome = "running"  # Ctrl-C while polling: the task exists, its id is kept
        else:
            item.outcome = "failed"
            item.reason = sub.error_code or sub.status
            if sub.status == "ambiguous":
                item.units = sub.units_estimated or 0  # the most it may have been billed
            if sub.reused and sub.status in ("running", "timeout", "queued", "uploading"):
                item.reason = "busy"  # waited for another process's submission until the timeout
            if sub.reused and sub.status in ("ambiguous", "running", "timeout", "queued", "uploading"):
                item.error = sub.note or sub.status  # what stopped this call (it names the next step)
            else:
                item.error = sentences(sub.error_message, sub.next_step) or sub.note or sub.status
        return item

    def collect(fut: Future, item: BatchItem) -> None:
        """Record a finished image: its failure if the worker raised, its id, the progress bar."""
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

    pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="skinlab-batch")
    pending: dict[Future, BatchItem] = {}
    try:
        for item, src in zip(report.items, sources):
            if max_units is None or not _creates_task(ledger, client, src, names, force, options):
                turns[item.index].set()  # no units to wait for (a reuse, a wait, or no cap)
        for item, src in zip(report.items, sources):
            pending[pool.submit(work, item, src)] = item
        while pending:
            done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                collect(fut, pending.pop(fut))
    except KeyboardInterrupt:
        halt.set()
        stop.set()
        report.stopped = ("interrupted (Ctrl-C): no new images were started and those in flight stopped at their "
                          "next step: an image whose task was not yet created is recorded as interrupted (not "
                          "billed) and the next run submits it; tasks already created are kept running, and "
                          "ledger.resume(client) or the next run collects them")
        for fut, item in list(pending.items()):
            if fut.cancel():
                item.outcome = "interrupted"
                pending.pop(fut)
        # The workers in flight were told to stop at their next step: wait for them, so that none
        # goes on behind the report (the process may be about to exit, taking an embedded local
        # emulator with it; a request sent then would fail and be recorded as a false error).
        try:
            wait(list(pending), timeout=STOP_GRACE_S)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            pass
        for fut, item in list(pending.items()):
            if fut.done():
                collect(fut, pending.pop(fut))
        if pending:
            log.warning("%d image(s) still in flight after Ctrl-C; they stop at their next step and the ledger "
                        "records where they stopped.", len(pending))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
        for item in report.items:
            # Not started: interrupted.
            if item.outcome == "pending" and stop.is_set():
                item.outcome = "interrupted"
        report.elapsed_s = time.monotonic() - t0
