"""The experiment ledger: every submission tracked, never billed twice, never lost.

A :class:`Ledger` is one SQLite file (``study/ledger.sqlite``) plus a folder beside it,
``study/results/``, that keeps each successful submission's ``scores.csv``, ``result.json``,
masks and working image. Paths inside the study folder are stored relative to it, so a study
can be moved or shared as one folder.

>>> import skinlab
>>> ledger = skinlab.Ledger("study/ledger.sqlite")                              # doctest: +SKIP
>>> client = skinlab.Client.local()                                             # doctest: +SKIP
>>> sub = ledger.submit(client, "photos/S01_T0.jpg", ["wrinkle", "pore"],
...                     tags=skinlab.tags.FilenamePattern("{subject}_{timepoint}.jpg"))   # doctest: +SKIP
>>> ledger.scores(backend="local")                                              # doctest: +SKIP

API
---
* :meth:`Ledger.submit` (one image), :meth:`Ledger.submit_many` (a list; per-image problems
  are recorded or warned about and the loop goes on) → :class:`Submission`;
* :meth:`Ledger.resume` (collect running tasks, refresh results, list ambiguous rows) and
  :meth:`Ledger.resolve` (settle an ambiguous row after checking the console);
* :meth:`Ledger.submissions`, :meth:`Ledger.scores`, :meth:`Ledger.wide`,
  :meth:`Ledger.summary`, :meth:`Ledger.table` and :meth:`Ledger.export` (CSV, Parquet,
  de-identified);
* :meth:`Ledger.get`, :meth:`Ledger.result` (the saved :class:`~skinlab.results.AnalysisResult`),
  :meth:`Ledger.tag`, :meth:`Ledger.apply_tags` (a :class:`~skinlab.tags.TagSheet` or
  :class:`~skinlab.tags.FilenamePattern`), :meth:`Ledger.record` / :meth:`Ledger.record_many`
  (results made elsewhere).

Guarantees
----------
* **Never billed twice.** A submission is identified by its source (the SHA-256 of the bytes
  sent, the URL, or the file id), its actions as a set, ``miniserver_args``, ``format``,
  ``pf_camera_kit`` and the backend (cloud: base URL; local: any loopback emulator) and API
  version. Submitting the same thing again returns the recorded success (``reused=True``, with
  a :class:`LedgerReuseWarning`) instead of creating a task; a submission of it that is still
  running is waited for instead; an *ambiguous* one (see below) is never re-sent. ``force=True``
  overrides this. The rule holds across processes and kernel restarts, because the check and
  the new row are one SQLite write transaction.
* **Never lost.** Each state change is committed before and after each network call. Before the
  create call the row is set to ``ambiguous`` (write-ahead): if the process dies, or the answer
  is lost (:class:`~skinlab.errors.TaskFateUnknownError`), the row stays ambiguous with a next
  step, and is never re-sent automatically. :meth:`Ledger.resume` polls tasks that were running
  or timed out, records their outcomes, downloads results again (polling gives fresh URLs when
  the 2 h ones have expired) and lists what needs a decision.
* **Concurrent use.** Several notebooks and batch processes may use one ledger at once (WAL
  mode, a busy timeout, short ``BEGIN IMMEDIATE`` transactions), and may create a new one at
  the same moment (switching to WAL and creating the schema are retried while another process
  holds the lock; :class:`LedgerLockedError` when it is held past ``timeout``). A row being
  uploaded by a live process is not touched by others; a row left by a dead process is marked
  ``interrupted`` (nothing was billed) and submitted afresh. A warning is given when the file
  is on a network file system or in a cloud-synced folder, where SQLite locking is unreliable.
  Opening a path where no ledger exists creates an empty one, logged at INFO and told by
  :attr:`Ledger.created` (a mistyped path otherwise just shows empty tables).
* **Local tasks live in one emulator.** Each process's embedded emulator has its own port and
  its own tasks, and the ``owner`` of a running row (host, pid, a per-process token) is the
  process whose emulator holds its task; while it polls the task it refreshes the row's
  heartbeat (``updated_at``, every :data:`HEARTBEAT_S`). A running local row whose base URL is
  not the client's is never polled through the client's emulator (which would not know it): if
  its owner is alive and its heartbeat fresh (:data:`HEARTBEAT_STALE_S`), the submit waits for
  it through the ledger (within its ``timeout``) and reuses the success; otherwise (crashed
  process, emulator gone) the row is closed as ``error``/``task_lost`` and the image is analysed
  again, since local tasks are free. An emulator that still accepts connections (``skinlab
  serve`` outlives the run that used it) may still hold the task: its row is left running for a
  client of that emulator to collect, and the image is analysed again all the same. A local task that its own emulator no longer knows
  (restarted) is analysed again the same way, once. Cloud tasks stay valid for 24 h after
  completion and are always resumed by polling; none of this applies to them.
* **One local engine version per reuse.** A recorded local success is reused only when its
  ``engine`` (version and face backend, as the emulator reports it; a client that has not
  talked to the emulator yet asks it, for free) is the current one; otherwise the image is
  analysed again (free) and :attr:`Submission.rerun` says why. Cloud reuse does not look at it.
* **The API key is never stored**, nor sent anywhere but the service.

Statuses
--------
``queued`` (recorded, nothing sent), ``uploading`` (image being uploaded; free),
``running`` (task created; ``task_id`` set), ``success`` (results saved, scores recorded),
``error`` (the task failed, or a step before creation failed; not billed), ``timeout`` (the
caller's deadline passed; the task id is kept and :meth:`Ledger.resume` continues),
``ambiguous`` (a create may or may not have reached the service; see ``next_step``).

Tables (column names are stable; pinned by the test suite)
----------------------------------------------------------
:meth:`Ledger.submissions` — one row per submission (:data:`SUBMISSION_COLUMNS`, then one
``tag_<key>`` column per free tag, sorted):

=================  ==========================================================================
submission_id      integer id (also the results folder name, ``results/<id:06d>``)
created_at         when the row was created (datetime, UTC); ``updated_at`` likewise
status             queued, uploading, running, success, error, timeout, ambiguous
image_name         the file's base name (URL: last path segment); None for in-memory images
image_path         relative to the study folder when inside it, else absolute; None if no file
image_sha256       SHA-256 of the bytes sent (None for URL and file-id sources)
image_size         bytes sent; ``image_width``/``image_height`` in pixels
source_kind        upload, url or file_id
source_key         the source identity: ``sha256:<hex>``, ``url:<url>`` or ``file_id:<id>``
preflight          what pre-flight changed, ``;``-separated ("" when the bytes are the original)
backend            cloud or local
base_url           the API host (user info stripped)
api_version        v2.0 or v2.1
engine             the instrument: ``youcam-skin-analysis v2.0``, or ``skinlab-local <ver>;
                   face=<face backend>`` for the local engine
actions            the action names, comma-separated, in request order
tier               sd or hd
miniserver_args    canonical JSON ("{}" when none)
format             zip or json
pf_camera_kit      True/False, or None when not sent
file_id            the upload's file id
task_id            the service's task id (kept after a timeout)
task_created_at    when the create call was sent
task_state         the service's last answer: running, success or error
completed_at       when the outcome was recorded
last_polled_at     the last poll
error_code         engine code (``error_no_face``), HTTP ``error_code``, or a ledger code
                   (``interrupted``: stopped before a task was created, nothing billed;
                   ``create_unconfirmed``, ``create_fate_unknown``, ``task_expired``;
                   ``task_lost``: a local task lost with its emulator, free, analysed again;
                   ``download_failed``, ``not_created``)
error_message      what happened (never contains the API key)
next_step          what to do about this row (None when nothing)
request_ids        x-request-id values seen, comma-separated
units_estimated    units the task costs on success (§8.2 tier table)
units_charged      units billed: the tier units on success, 0 when not billed, None unknown
result_dir         results folder relative to the study folder
overall            the ``all`` score; ``skin_age`` the estimated skin age
subject, timepoint, condition   the fixed tags
=================  ==========================================================================

:meth:`Ledger.scores` — tidy, one row per submission x action x region, successes only
(:data:`SCORE_COLUMNS`, then ``tag_<key>`` columns): ``submission_id, created_at,
completed_at, image_name, image_sha256, subject, timepoint, condition, backend, engine,
api_version, tier, format, task_id, action, concern, region, raw_score, ui_score,
skin_type``. ``raw_score`` is float, ``ui_score`` nullable ``Int64``; ``skin_type`` is set
(and the scores empty) for the skin-type action.

:meth:`Ledger.wide` — one row per submission: the index columns of :data:`WIDE_INDEX` (and the
tag columns), ``overall`` and ``skin_age``, then one column per action and region named
``<action>`` (region ``whole``) or ``<action>_<region>``, holding ``raw_score`` (or ``ui_score``);
skin-type columns hold the category.

``scores(actions=...)`` keeps only some actions (concern keys select both tiers);
``compact=True`` returns the text columns as categoricals (about 5x less memory for very large
studies).

In the SQLite file itself, ``submissions`` has one row per submission (as above, with the
actions as a JSON list, free tags as a JSON object and times as epoch seconds), ``scores`` holds
the scores with action and region as integer codes named by ``action_names`` and
``region_names``, and the view ``score_rows`` shows them with names. ``schema_migrations``
records the schema version (also in ``PRAGMA user_version``).

Local-engine and cloud scores measure different things: :meth:`Ledger.scores` and
:meth:`Ledger.wide` raise :class:`MixedBackendsError` when the selection holds both, unless
``backend=`` selects one or ``allow_mixed=True`` is passed (the ``backend`` column then tells
them apart).

De-identified exports (``deidentify=True``) drop the columns of :data:`DEIDENTIFIED_DROP`:
those that lead back to the photo (``image_name``, ``image_path``, ``image_sha256`` and
``image_size``: anyone holding the photos can hash them or compare their sizes, ``source_key``,
``file_id``, ``result_dir``), those that lead to the account's task history (``task_id``,
``request_ids``, ``base_url``) and free text that may quote either (``error_message``,
``next_step``, ``preflight``). With ``salt=``, ``image_sha256`` is kept as
HMAC-SHA256(salt, sha256), a pseudonym: rows of one photo still match each other, and only
someone with the salt can match them to the photos. Kept: the times (``created_at`` ...; with
console access they could be matched to the account's task history), the pixel size, the
backend, engine, scores and tags. Free tags are kept: do not put names in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import json
import logging
import os
import random
import re
import secrets
import socket
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from . import errors
from ._net import is_loopback_url
from .actions import CATALOGUE, estimate_units
from .errors import (
    InvalidTaskIdError, SkinlabConnectionError, SkinlabError, TaskError, TaskFateUnknownError,
)
from .tags import FIXED_TAGS, TagError, split_tags, tags_for

__all__ = [
    "Ledger", "Submission", "Lookup", "LedgerError", "LedgerLockedError", "MixedBackendsError", "LedgerReuseWarning",
    "LedgerLocationWarning",
    "SUBMISSION_COLUMNS", "SCORE_COLUMNS", "WIDE_INDEX", "DEIDENTIFIED_DROP", "STATUSES", "SCHEMA_VERSION",
    "location_warning", "load_result", "deidentify",
]

log = logging.getLogger("skinlab.ledger")

STATUSES = ("queued", "uploading", "running", "success", "error", "timeout", "ambiguous")
#: Filters whose values are a closed set: a typo is an error, not an empty table.
_FILTER_VALUES = {"status": STATUSES, "backend": ("cloud", "local"), "tier": ("sd", "hd"),
                  "format": ("zip", "json"), "api_version": ("v2.0", "v2.1")}
#: Statuses whose row stops a new task for the same submission (unless ``force=True``).
_BLOCKING = ("success", "running", "timeout", "ambiguous", "queued", "uploading")

SUBMISSION_COLUMNS = [
    "submission_id", "created_at", "updated_at", "status", "image_name", "image_path", "image_sha256",
    "image_size", "image_width", "image_height", "source_kind", "source_key", "preflight", "backend", "base_url",
    "api_version", "engine", "actions", "tier", "miniserver_args", "format", "pf_camera_kit", "file_id", "task_id",
    "task_created_at", "task_state", "completed_at", "last_polled_at", "error_code", "error_message", "next_step",
    "request_ids", "units_estimated", "units_charged", "result_dir", "overall", "skin_age",
    "subject", "timepoint", "condition",
]
SCORE_COLUMNS = [
    "submission_id", "created_at", "completed_at", "image_name", "image_sha256", "subject", "timepoint",
    "condition", "backend", "engine", "api_version", "tier", "format", "task_id",
    "action", "concern", "region", "raw_score", "ui_score", "skin_type",
]
WIDE_INDEX = ["submission_id", "created_at", "image_name", "image_sha256", "subject", "timepoint", "condition",
              "backend", "engine", "tier"]
DEIDENTIFIED_DROP = ("image_name", "image_path", "image_sha256", "image_size", "source_key", "file_id", "task_id",
                     "request_ids", "result_dir", "base_url", "error_message", "next_step", "preflight")
_TIME_COLUMNS = ("created_at", "updated_at", "task_created_at", "completed_at", "last_polled_at")

#: Task ids live 24 h after completion (§8.5).
TASK_TTL_S = 24 * 3600
_REGION_ORDER = ["whole", "forehead", "glabellar", "crowfeet", "periocular", "nasolabial", "marionette",
                 "nose", "cheek", "t_zone", "u_zone"]

#: The schema version this skinlab writes: the newest step of ``_MIGRATIONS`` (pinned by a test).
SCHEMA_VERSION = 1


def _seed_names(cur: sqlite3.Cursor) -> None:
    cur.executemany("INSERT INTO action_names (code, name) VALUES (?, ?)", list(enumerate(CATALOGUE)))
    cur.executemany("INSERT INTO region_names (code, name) VALUES (?, ?)", list(enumerate(_REGION_ORDER)))


#: (version, description, steps); a step is an SQL statement or a function of the cursor.
_MIGRATIONS: list[tuple[int, str, list[Any]]] = [
    (1, "initial schema: submissions, scores", [
        """CREATE TABLE submissions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('queued','uploading','running','success','error','timeout','ambiguous')),
            image_name TEXT,
            image_path TEXT,
            image_sha256 TEXT,
            image_size INTEGER,
            image_width INTEGER,
            image_height INTEGER,
            source_kind TEXT NOT NULL,
            source_key TEXT NOT NULL,
            preflight TEXT NOT NULL DEFAULT '',
            backend TEXT NOT NULL,
            backend_key TEXT NOT NULL,
            base_url TEXT NOT NULL,
            api_version TEXT NOT NULL,
            engine TEXT,
            actions TEXT NOT NULL,
            tier TEXT NOT NULL,
            miniserver_args TEXT NOT NULL DEFAULT '{}',
            format TEXT NOT NULL,
            pf_camera_kit INTEGER,
            dedup_key TEXT NOT NULL,
            file_id TEXT,
            task_id TEXT,
            task_created_at REAL,
            task_state TEXT,
            completed_at REAL,
            last_polled_at REAL,
            error_code TEXT,
            error_message TEXT,
            request_ids TEXT NOT NULL DEFAULT '[]',
            units_estimated INTEGER NOT NULL,
            units_charged INTEGER,
            result_dir TEXT,
            overall REAL,
            skin_age INTEGER,
            subject TEXT,
            timepoint TEXT,
            condition TEXT,
            tags TEXT NOT NULL DEFAULT '{}',
            owner TEXT
        )""",
        "CREATE INDEX submissions_dedup ON submissions (dedup_key, status)",
        "CREATE INDEX submissions_status ON submissions (status)",
        "CREATE INDEX submissions_task ON submissions (task_id)",
        "CREATE INDEX submissions_created ON submissions (created_at)",
        "CREATE INDEX submissions_subject ON submissions (subject, timepoint)",
        # Action and region names are stored as small integer codes (the tables below name them;
        # codes follow catalogue order, so the primary key sorts rows as the catalogue does).
        "CREATE TABLE action_names (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
        "CREATE TABLE region_names (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
        """CREATE TABLE scores (
            submission_id INTEGER NOT NULL REFERENCES submissions(id) ON DELETE CASCADE,
            action INTEGER NOT NULL REFERENCES action_names(code),
            region INTEGER NOT NULL REFERENCES region_names(code),
            raw_score REAL,
            ui_score INTEGER,
            skin_type TEXT,
            PRIMARY KEY (submission_id, action, region)
        ) WITHOUT ROWID""",
        """CREATE VIEW score_rows AS
            SELECT s.submission_id, a.name AS action, r.name AS region, s.raw_score, s.ui_score, s.skin_type
            FROM scores s JOIN action_names a ON a.code = s.action JOIN region_names r ON r.code = s.region""",
        _seed_names,
    ]),
]


class LedgerError(SkinlabError):
    """The ledger cannot do what was asked (unknown id, newer schema, bad filter ...)."""


class LedgerLockedError(LedgerError):
    """Another process held the ledger's write lock for longer than the ledger's ``timeout``."""


def _is_lock_error(exc: BaseException) -> bool:
    """SQLite refused or timed out waiting for a lock held by another connection."""
    if isinstance(exc, LedgerLockedError):
        return True
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


#: Raised when a table would pool local-engine and cloud scores (shared with :mod:`skinlab.plots`).
MixedBackendsError = errors.MixedBackendsError


class LedgerReuseWarning(UserWarning):
    """A submission was answered from the ledger instead of creating (and billing) a task."""


class LedgerLocationWarning(UserWarning):
    """The ledger file sits on a network file system or in a cloud-synced folder."""


# --------------------------------------------------------------------------- small helpers


def _now() -> float:
    return time.time()


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts).rstrip("/")


def _backend_key(base_url: str) -> str:
    """``local`` for any loopback emulator (its port changes between runs), else the base URL."""
    return "local" if is_loopback_url(base_url) else _strip_userinfo(base_url)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. Windows without the process
        return False
    return True


_PROCESS_TOKEN = secrets.token_hex(4)
_HOST = socket.gethostname()


def _owner() -> str:
    return f"{_HOST}:{os.getpid()}:{_PROCESS_TOKEN}"


def _parse_owner(owner: str | None) -> tuple[str, int, str] | None:
    try:
        host, pid_text, token = (owner or "").rsplit(":", 2)
        return host, int(pid_text), token
    except ValueError:
        return None


def _describe_owner(owner: str | None) -> str:
    parsed = _parse_owner(owner)
    if parsed is None:
        return "a process that recorded no owner (an older skinlab)"
    host, pid, _ = parsed
    return f"process {pid}" + ("" if host == _HOST else f" on {host}")


def _emulator_answers(base_url: str | None, timeout: float = 0.3) -> bool:
    """Whether something accepts connections at a loopback ``base_url`` (a local emulator that is
    still up). Only loopback addresses are tried; anything else counts as not answering."""
    from ._net import is_loopback_url

    if not base_url or not is_loopback_url(base_url):
        return False
    parts = urlsplit(base_url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _with_conflicts(sub: "Submission", conflicts: Sequence[str]) -> "Submission":
    from dataclasses import replace

    return replace(sub, tag_conflicts=tuple(conflicts)) if conflicts else sub


def _gone_with(row: Mapping[str, Any]) -> str:
    """How a local emulator that no longer answers went: with its process, or on its own."""
    parsed = _parse_owner(row.get("owner"))
    if parsed is not None and parsed[0] == _HOST and _pid_alive(parsed[1]):
        return f"which no longer answers (it was started by {_describe_owner(row.get('owner'))}, still running)"
    return f"gone with {_describe_owner(row.get('owner'))}"


#: How often a process polling a task refreshes its row's heartbeat (``updated_at``), seconds.
HEARTBEAT_S = 5.0
#: A ``running`` local row whose heartbeat is older than this is no longer being worked on,
#: even if its process is alive (it stopped polling: ``wait=False``, a timeout, Ctrl-C).
HEARTBEAT_STALE_S = 60.0

#: (ledger path, submission id) -> how many threads of this process poll that task now.
_DRIVEN: dict[tuple[str, int], int] = {}
_DRIVEN_LOCK = threading.Lock()


def _is_driven(path: Path, sid: int) -> bool:
    with _DRIVEN_LOCK:
        return _DRIVEN.get((str(path), int(sid)), 0) > 0


def _fmt_time(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def sentences(*parts: str | None) -> str:
    """Join message parts as sentences (a full stop added where missing); empty parts and
    sentences already said by an earlier part (an engine hint in both the error message and the
    next step) are left out."""
    out: list[str] = []
    for p in parts:
        if not p or not p.strip():
            continue
        text = p.strip()
        text = text if text[-1:] in ".!?" else text + "."
        said = " ".join(out)
        kept = [x for x in re.split(r"(?<=[.!?])\s+", text) if x and x not in said]
        if kept:
            out.append(" ".join(kept))
    return " ".join(out)


def _rerun_texts(old_id: int, phrase: str) -> tuple[str, str]:
    """(note, rerun) for an image analysed again instead of reusing submission ``old_id``.

    ``phrase`` continues "Submission N" ("was recorded with engine ..." or "'s task was ...");
    ``rerun`` says the same without the id, so that alike reasons can be counted.
    """
    tail = ": analysed again (local, free)"
    note = f"Submission {old_id}{'' if phrase.startswith(chr(39)) else ' '}{phrase}{tail}."
    rerun = (phrase[4:] if phrase.startswith("was ") else "its" + phrase[2:]) + tail
    return note, rerun


def _json_list(text: str | None) -> list:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- storage location

CLOUD_SYNC_FRAGMENTS = (
    "dropbox", "onedrive", "icloud", "mobile documents", "clouddocs", "cloudstorage", "google drive",
    "googledrive", "my drive", "box sync", "pcloud", "nextcloud", "owncloud", "megasync", "tresorit", "sync.com",
)
NETWORK_FS_TYPES = {
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "afs", "9p", "ncpfs", "glusterfs", "ceph", "lustre",
    "gpfs", "beegfs", "davfs", "webdav", "sshfs", "vboxsf", "prl_fs", "drvfs", "fuse.sshfs", "fuse.rclone",
    "fuse.s3fs", "fuse.gcsfuse", "fuse.davfs", "fuse.glusterfs", "fuse.cephfs", "fuse.juicefs", "fuse.goofys",
    "fuse.dropbox", "fuse.onedrive", "fuse.google-drive-ocamlfuse", "fuse.mergerfs",
}


def _mount_type(path: Path, mounts_file: str) -> tuple[str, str] | None:
    try:
        text = Path(mounts_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    best: tuple[str, str] | None = None
    target = str(path)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and (best is None or len(mnt) >= len(best[0])):
            best = (mnt, parts[2])
    return best


def location_warning(path: str | os.PathLike, *, mounts_file: str = "/proc/mounts") -> str | None:
    """Why ``path`` is a risky place for a ledger (network or cloud-synced), or None.

    Both the path as given and the path with its symbolic links resolved are checked, so a
    link from a local folder into a Dropbox folder or an NFS mount is caught too.
    """
    given = Path(path).expanduser().absolute()
    try:
        resolved = given.resolve()
    except (OSError, RuntimeError):  # a link loop or an unreadable component: check the given path only
        resolved = given
    for p in dict.fromkeys((given, resolved)):
        why = _location_problem(p, mounts_file)
        if why:
            if p != given:
                why = why.replace(f"The ledger {p} ", f"The ledger {given} (a link to {p}) ", 1)
            return why
    return None


def _location_problem(p: Path, mounts_file: str) -> str | None:
    text = str(p).replace("\\", "/").lower()
    for frag in CLOUD_SYNC_FRAGMENTS:
        if frag in text:
            return (f"The ledger {p} seems to be in a cloud-synced folder ({frag!r} in the path). Sync clients "
                    "copy SQLite files mid-write and break its locking: keep the ledger on a local disk and "
                    "export tables (ledger.export) to the shared folder instead.")
    if str(p).startswith("\\\\") or str(p).startswith("//"):
        return f"The ledger {p} is on a network share; SQLite locking is unreliable there. Use a local disk."
    found = _mount_type(p, mounts_file)
    if found is not None and found[1].lower() in NETWORK_FS_TYPES:
        return (f"The ledger {p} is on a {found[1]} network file system (mounted at {found[0]}); SQLite "
                "locking is unreliable there, so concurrent writers may corrupt it. Use a local disk.")
    if os.name == "nt":  # pragma: no cover - Windows only
        try:
            import ctypes

            drive = os.path.splitdrive(str(p))[0] + "\\"
            if ctypes.windll.kernel32.GetDriveTypeW(drive) == 4:  # DRIVE_REMOTE
                return f"The ledger {p} is on a network drive; SQLite locking is unreliable there."
        except Exception:
            pass
    return None


# --------------------------------------------------------------------------- results on disk


def load_result(folder: str | os.PathLike):
    """Rebuild an :class:`~skinlab.results.AnalysisResult` from a folder written by ``save``."""
    from .results import AnalysisResult, ScoreEntry

    folder = Path(folder)
    try:
        data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerError(f"Cannot read the saved result in {folder} ({exc}). Within 24 h of the task, "
                          "ledger.resume(client) downloads it again; the scores stay in the ledger.") from None
    entries = [ScoreEntry(action=s["action"], region=s.get("region") or "whole", raw_score=s.get("raw_score"),
                          ui_score=s.get("ui_score"), skin_type=s.get("skin_type"), mask=s.get("mask"))
               for s in data.get("scores") or []]
    extras: dict[str, Any] = {"all": data.get("overall"), "skin_age": data.get("skin_age")}
    files = {}
    for item in folder.iterdir():
        if item.is_file() and item.name not in ("result.json", "scores.csv"):
            files[item.name] = item.read_bytes()
    if "resize_image.jpg" in files:
        extras["resize_image"] = "resize_image.jpg"
    return AnalysisResult(entries, extras, format=data.get("format") or "zip", task_id=data.get("task_id"),
                          backend=data.get("backend") or "cloud", engine=data.get("engine"),
                          api_version=data.get("api_version"), files=files)


# --------------------------------------------------------------------------- de-identification


def deidentify(df, *, salt: str | bytes | None = None):
    """A copy of a ledger table without the columns of :data:`DEIDENTIFIED_DROP`: names, paths,
    the photo's SHA-256 and byte size (either finds the photo it came from), service ids and
    free text (see the module docstring). With ``salt``, ``image_sha256`` is kept as
    HMAC-SHA256(salt, sha256): rows of one photo still match, and only the salt links them back."""
    keep = {"image_sha256"} if salt is not None else set()
    out = df.drop(columns=[c for c in DEIDENTIFIED_DROP if c in df.columns and c not in keep])
    if salt is not None and "image_sha256" in out.columns:
        key = salt.encode() if isinstance(salt, str) else bytes(salt)
        cache: dict[str, str] = {}

        def rehash(v):
            if not isinstance(v, str):
                return v
            if v not in cache:
                cache[v] = hmac.new(key, v.encode(), hashlib.sha256).hexdigest()
            return cache[v]

        out["image_sha256"] = out["image_sha256"].map(rehash)
    return out


# --------------------------------------------------------------------------- records


def _next_step(row: Mapping[str, Any], *, live: bool | None = None) -> str | None:
    status, code = row["status"], row["error_code"]
    sid = row["id"]
    if status == "success":
        return None
    if status in ("queued", "uploading"):
        if live is False:
            return "Interrupted before a task was created (nothing billed): submit it again."
        return "Being submitted by another process; wait, or look again later."
    if status in ("running", "timeout"):
        if code == "download_failed":
            return ("The task succeeded (billed) but its results were not saved: ledger.resume(client) polls "
                    "again for fresh result URLs (task ids live 24 h).")
        if row.get("backend_key") == "local":
            return ("Its task lives in the local emulator at " + str(row.get("base_url")) + ": a client of that "
                    "emulator collects it (ledger.resume(client)). If that emulator is gone, the next submit of the "
                    "image analyses it again (local tasks are free).")
        return "ledger.resume(client) collects the outcome (task ids stay valid 24 h after completion)."
    if status == "ambiguous":
        if code == "create_unconfirmed" and live:
            return "A create request is being sent by another process right now; look again in a moment."
        if code in ("task_expired",):
            return ("The task's outcome was never recorded and its id has expired; if it succeeded it was billed "
                    "and its results are gone. To measure again: ledger.submit(..., force=True) (bills again).")
        when = _fmt_time(row["task_created_at"])
        return (f"A create request was sent at {when} but its answer was not recorded, so a task may exist and "
                f"be billed. Check the task history or units in the YouCam console around that time. If a task "
                f"exists: ledger.resolve({sid}, task_id='<id>') then ledger.resume(client). If none: "
                f"ledger.resolve({sid}, created=False) and submit again. (submit(..., force=True) skips this "
                f"check and may bill twice.)")
    if status == "error":
        if code in ("interrupted", "not_created"):
            return "Nothing was billed: submit it again."
        if code == "task_lost":
            if "analysed again as submission" in (row.get("error_message") or ""):
                return "Nothing to do: the image was analysed again (see error_message for the new submission)."
            return ("Local tasks are free: submit the image again (ledger.submit and analyze_many do so "
                    "by themselves).")
        if code == "lost_billed":
            return "Billed but unrecoverable: submit(..., force=True) to measure again."
        hint = errors.task_error_for(code).hint if row["task_id"] else ""
        return (hint + " " if hint else "") + "Not billed; fix the cause and submit again."
    return None  # pragma: no cover


@dataclass
class Submission:
    """One ledger row, as returned by :meth:`Ledger.submit` and :meth:`Ledger.get`.

    Attributes
    ----------
    id, status, task_id, image_name, image_sha256, backend, engine, actions, format, tags
        From the row (``tags`` holds the fixed and free tags together).
    error_code, error_message, next_step
        What went wrong and what to do (None when nothing).
    units_estimated, units_charged
    reused : bool
        True when this call created no task: a recorded success was returned, a running task
        was waited for, or an ambiguous/in-progress row stopped it.
    note : str
        What this call did, in words.
    rerun : str or None
        Why this call analysed again an image the ledger already had, when it did (local only:
        the recorded success came from another engine version, or the recorded task was lost
        with its local emulator); None otherwise.
    tag_conflicts : tuple of str
        On a reuse: the tags given that differ from the recorded ones, which were kept (also
        warned about).

    In a notebook it displays as HTML: the row (status, backend, engine, tags, units, next step)
    and, for a success, the saved score table; never an image or the file's name or path.
    """

    id: int
    status: str
    task_id: str | None
    image_name: str | None
    image_sha256: str | None
    backend: str
    engine: str | None
    actions: tuple[str, ...]
    format: str
    tags: dict[str, str]
    error_code: str | None
    error_message: str | None
    next_step: str | None
    units_estimated: int
    units_charged: int | None
    result_dir: Path | None
    row: dict[str, Any] = field(repr=False)
    reused: bool = False
    note: str = ""
    rerun: str | None = None
    _cached: Any = field(default=None, repr=False)
    tag_conflicts: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def result(self):
        """The :class:`~skinlab.results.AnalysisResult` (loaded from the results folder), or None."""
        if self.status != "success" or self.result_dir is None:
            return None
        if self._cached is None:
            self._cached = load_result(self.result_dir)
        return self._cached

    @property
    def scores(self):
        """The result's tidy scores (empty when there is no result)."""
        result = self.result
        if result is None:
            import pandas as pd

            from .results import SCORE_COLUMNS as RC

            return pd.DataFrame(columns=RC)
        return result.scores

    def __repr__(self) -> str:
        extra = ", reused" if self.reused else ""
        err = f", {self.error_code}" if self.error_code else ""
        return (f"<Submission {self.id} {self.status}{err}{extra}: {self.image_name or self.image_sha256 or '?'}, "
                f"{len(self.actions)} actions, {self.backend}>")

    def _repr_html_(self) -> str | None:
        """The notebook display: the row's status, backend, engine, tags, units and next step
        (:func:`skinlab.display.ledger_html`), then the saved result's score table
        (:func:`skinlab.display.result_html`). Never an image, nor the file name or path."""
        from .display import repr_html

        return repr_html(self, Submission._html)

    def _html(self) -> str:
        import pandas as pd

        from .display import ledger_html, result_html

        row = self.row
        counted = {"status": self.status, "backend": self.backend, "engine": self.engine or "not reported",
                   "units_estimated": self.units_estimated, "units_charged": self.units_charged}
        listed = {"submission_id": self.id, "created_at": row.get("created_at"), "status": self.status,
                  "backend": self.backend, "engine": counted["engine"], "tier": row.get("tier"),
                  "actions": ",".join(self.actions), "units_charged": self.units_charged,
                  "error_code": self.error_code, "next_step": self.next_step}
        listed.update({k: self.tags[k] for k in FIXED_TAGS if self.tags.get(k) is not None})
        listed.update({f"tag_{k}": v for k, v in sorted(self.tags.items()) if k not in FIXED_TAGS})
        listed = {k: v for k, v in listed.items() if v is not None}
        title = f"skinlab Submission {self.id}: {self.status}" + (" (reused, nothing billed)" if self.reused else "")
        # the facts come from the few counted columns, the one listed row holds the rest (no file names)
        page = ledger_html(_typed(pd.DataFrame([counted])), recent=_typed(pd.DataFrame([listed])), title=title)
        if self.note:
            page += f"<p style='color:#555;margin:0.3em 0'>{html.escape(self.note)}</p>"
        if self.status != "success":
            return page
        try:
            result = self.result
        except LedgerError as exc:
            result, missing = None, str(exc)
        else:
            missing = "Recorded without a results folder; its scores are in ledger.scores(ids=[...])."
        if result is None:
            return page + f"<p style='color:#555;margin:0.3em 0'>{html.escape(missing)}</p>"
        return page + result_html(result)


@dataclass(frozen=True)
class Lookup:
    """The answer of :meth:`Ledger.lookup`: what a submit would do, without doing it."""

    decision: str  # new | reuse | attach | wait | ambiguous | busy
    submission_id: int | None
    status: str | None
    units: int  # the task's cost (billed on success if a task is created)
    source_key: str
    note: str
    rerun: str | None = None  # why a recorded image would be analysed again (local), as Submission.rerun

    @property
    def reusable(self) -> bool:
        """A recorded success answers this submission (nothing would be billed)."""
        return self.decision == "reuse"

    @property
    def creates_task(self) -> bool:
        return self.decision == "new"


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """A persistent record of every submission of a study (see the module docstring).

    Parameters
    ----------
    path : str or path
        The SQLite file; its folder is the *study folder*. Created if missing.
    results_dir : str
        Folder (relative to the study folder) for the saved results.
    timeout : float
        Seconds to wait for another process's write lock before failing.
    lease_s : float
        A ``queued``/``uploading`` row not updated for this long is taken as abandoned even if
        its process seems alive (or runs on another machine).
    warn_location : bool
        Warn when the file is on a network file system or in a cloud-synced folder.

    Attributes
    ----------
    created : bool
        True when this call created the ledger (no file, or one without a schema, was there):
        also logged at INFO, since a mistyped path silently starts an empty study.
    """

    def __init__(self, path: str | os.PathLike = "ledger.sqlite", *, results_dir: str = "results",
                 timeout: float = 30.0, lease_s: float = 1800.0, warn_location: bool = True) -> None:
        self.path = Path(path).expanduser().absolute()
        self.root = self.path.parent
        self.results_dirname = results_dir.strip("/") or "results"
        self.lease_s = lease_s
        self.created = False
        self._lock = threading.RLock()
        self._driven: dict[int, int] = {}  # submission id -> threads of this Ledger polling it
        self._heartbeat: threading.Thread | None = None
        self._closed = threading.Event()
        self._code_cache: dict[str, dict[str, int]] = {}
        if warn_location:
            why = location_warning(self.path)
            if why:
                warnings.warn(why, LedgerLocationWarning, stacklevel=2)
        fix = ("Give a new path (e.g. study/ledger.sqlite) to start a ledger there, or the path of an existing "
               "skinlab ledger")
        if self.path.is_dir():
            raise LedgerError(f"{str(self.path)!r} is a folder, not a ledger file. {fix}.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"Cannot open the ledger {str(self.path)!r} ({exc}). Check that its folder is writable, "
                              "or give another path.") from exc
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            # Several processes may open a brand-new file at once: switching it to WAL and creating
            # the schema need the write lock, which SQLite may refuse at once ("database is
            # locked") rather than wait for. Both are retried with backoff until ``timeout``.
            deadline = time.monotonic() + max(float(timeout), 1.0)
            # another program's database: refused before WAL mode or the schema would change it
            tables = self._when_unlocked(self._tables, deadline, "read its tables")
            if tables and "schema_migrations" not in tables:
                shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
                raise LedgerError(f"{str(self.path)!r} is not a skinlab ledger: it is another program's SQLite "
                                  f"database (tables: {shown}). {fix}; that file is left untouched.")
            mode = self._when_unlocked(self._use_wal, deadline, "switch it to WAL mode")
            if str(mode).lower() != "wal":  # pragma: no cover - file systems without shared memory
                warnings.warn(f"SQLite could not use WAL mode here (got {mode}); concurrent readers may wait.",
                              LedgerLocationWarning, stacklevel=2)
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            before = self._when_unlocked(self._migrate, deadline, "create or migrate its schema")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise LedgerError(f"Cannot open the ledger {str(self.path)!r} ({exc}). Check that its folder is "
                                  "writable, or give another path.") from exc
            raise LedgerError(f"{str(self.path)!r} is not a skinlab ledger: it is not an SQLite database (SQLite "
                              f"says: {exc}). {fix}; that file is left untouched.") from exc
        except BaseException:
            self._conn.close()
            raise
        self.created = before == 0
        if self.created:
            log.info("Created a new, empty ledger at %s (there was no ledger there). If you meant an existing study, "
                     "check the path: this one holds no submissions.", self.path)

    # ---- plumbing

    def close(self) -> None:
        """Close the database connection (also ``with Ledger(...) as ledger:``), first copying the
        write-ahead log into the file, so that no ``-wal`` / ``-shm`` files are left when no other
        process has it open. Closing twice is harmless."""
        self._closed.set()
        thread = self._heartbeat
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * HEARTBEAT_S)
        with self._lock:
            with contextlib.suppress(sqlite3.Error):  # another process may be reading: then it stays
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    # ---- heartbeat: which running tasks this process is polling right now

    @contextlib.contextmanager
    def _driving(self, sids: Iterable[int], *, claim: bool = True) -> Iterator[None]:
        """Mark ``sids`` as polled by this process (heartbeat refreshed) while inside; ``claim``
        first makes this process their owner."""
        sids = [int(s) for s in sids]
        if claim:
            owner = _owner()
            with self._tx() as cur:
                for sid in sids:
                    self._set(cur, sid, guard_status=("running", "timeout"), owner=owner)
        with _DRIVEN_LOCK:
            for sid in sids:
                self._driven[sid] = self._driven.get(sid, 0) + 1
                key = (str(self.path), sid)
                _DRIVEN[key] = _DRIVEN.get(key, 0) + 1
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="skinlab-ledger-heartbeat", daemon=True)
                self._heartbeat.start()
        try:
            yield
        finally:
            with _DRIVEN_LOCK:
                for sid in sids:
                    for table, key in ((self._driven, sid), (_DRIVEN, (str(self.path), sid))):
                        table[key] -= 1
                        if table[key] <= 0:
                            del table[key]

    def _beat(self) -> None:
        """Refresh ``updated_at`` of the rows this Ledger polls, every :data:`HEARTBEAT_S`."""
        while not self._closed.wait(HEARTBEAT_S):
            with _DRIVEN_LOCK:
                sids = sorted(self._driven)
                if not sids:  # nothing polled: stop (the next _driving starts another)
                    self._heartbeat = None
                    return
            try:
                with self._tx() as cur:
                    cur.execute(f"UPDATE submissions SET updated_at = ? WHERE id IN ({','.join('?' * len(sids))}) "
                                "AND status IN ('running', 'timeout')", [_now(), *sids])
            except Exception as exc:  # a missed beat only makes others wait less
                log.debug("ledger heartbeat failed: %s", exc)

    def _working_elsewhere(self, row: Mapping[str, Any]) -> bool:
        """Whether the process that owns this running local task is polling it now.

        Its own emulator holds the task, so no other emulator can poll it. Alive means: this
        process polls it (in any thread); or another process on this machine whose pid is alive
        refreshed the row's heartbeat within :data:`HEARTBEAT_STALE_S`; or (another machine) the
        heartbeat is that fresh.
        """
        parsed = _parse_owner(row.get("owner"))
        if parsed is None:
            return False
        host, pid, token = parsed
        if host == _HOST and pid == os.getpid():
            return token == _PROCESS_TOKEN and _is_driven(self.path, row["id"])
        fresh = _now() - float(row.get("updated_at") or 0) <= HEARTBEAT_STALE_S
        return fresh and (host != _HOST or _pid_alive(pid))

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """A short write transaction (BEGIN IMMEDIATE: the write lock is taken at once)."""
        with self._lock:
            cur = self._conn.cursor()
            for attempt in range(5):
                try:
                    cur.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_lock_error(exc) or attempt == 4:
                        cur.close()
                        if not _is_lock_error(exc):
                            raise LedgerError(f"The ledger {self.path} cannot be written ({exc}). Check the disk "
                                              "(space, permissions) and try again.") from None
                        raise LedgerLockedError(
                            f"The ledger {self.path} is locked by another process ({exc}). Try again; if it "
                            "persists, close other notebooks or batch runs using it, or open it with a longer "
                            "timeout (skinlab.Ledger(path, timeout=120)).") from None
                    time.sleep(0.05 * (attempt + 1))
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also after a failed COMMIT, so the next BEGIN works
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def _use_wal(self) -> str:
        """Switch the file to WAL mode (a no-op, with no lock taken, when it already is)."""
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() == "wal":
            return mode
        return self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]

    def _when_unlocked(self, step: Callable[[], Any], deadline: float, what: str) -> Any:
        """Run ``step``, again with backoff while another process holds the lock, until ``deadline``."""
        delay = 0.01
        while True:
            try:
                return step()
            except (sqlite3.OperationalError, LedgerLockedError) as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise LedgerLockedError(
                        f"Cannot open the ledger {self.path}: another process kept it locked while trying to {what} "
                        f"({exc}). Close other notebooks or batch runs using it, or open it with a longer "
                        "timeout (skinlab.Ledger(path, timeout=120)); if no process uses it, a crashed one may have "
                        "left a stale lock on a network file system: copy the study to a local disk.") from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _tables(self) -> list[str]:
        return sorted(r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))

    def _migrate(self) -> int:
        """Bring the file to the newest schema version of :data:`_MIGRATIONS`, in one transaction.

        Each step whose version is above the file's runs in order and is recorded in
        ``schema_migrations`` and ``PRAGMA user_version``; if any step fails, nothing is changed.
        Returns the version the file had (0: it was new).
        """
        latest = max(version for version, _, _ in _MIGRATIONS)
        with self._tx() as cur:
            cur.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL,
                skinlab_version TEXT)""")
            current = cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
            if current > latest:
                raise LedgerError(f"The ledger {self.path} has schema version {current}, newer than this skinlab "
                                  f"understands ({latest}). Upgrade skinlab; the file was not changed.")
            from . import __version__

            for version, description, statements in sorted(_MIGRATIONS, key=lambda m: m[0]):
                if version <= current:
                    continue
                try:
                    for step in statements:
                        step(cur) if callable(step) else cur.execute(step)
                except sqlite3.Error as exc:
                    if _is_lock_error(exc):
                        raise  # another process holds the lock: the caller retries
                    kept = (f" (still version {current}; the skinlab version that wrote it still opens it)"
                            if current else "")
                    raise LedgerError(
                        f"Upgrading the ledger {self.path} to schema version {version} ({description}) failed: "
                        f"{exc}. The file was not changed{kept}. Report this, with the error, to the skinlab "
                        "maintainers.") from None
                cur.execute("INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                            (version, description, _now(), __version__))
                cur.execute(f"PRAGMA user_version = {int(version)}")
        return current

    def _codes(self, cur: sqlite3.Cursor, table: str, names: Iterable[str]) -> dict[str, int]:
        """Codes of ``names`` in ``action_names``/``region_names``, adding new names (inside a write tx)."""
        cache = self._code_cache.setdefault(table, {})
        missing = {n for n in names if n not in cache}
        if missing:
            cache.update({name: code for code, name in cur.execute(f"SELECT code, name FROM {table}")})
            for name in sorted(missing - set(cache)):
                cur.execute(f"INSERT INTO {table} (code, name) VALUES ((SELECT COALESCE(MAX(code), -1) + 1 "
                            f"FROM {table}), ?)", (name,))
                cache[name] = cur.execute(f"SELECT code FROM {table} WHERE name = ?", (name,)).fetchone()[0]
        return cache

    def _insert_scores(self, cur: sqlite3.Cursor, sid: int, entries: Sequence[tuple]) -> None:
        """Insert (action, region, raw_score, ui_score, skin_type) rows of one submission."""
        actions = self._codes(cur, "action_names", (e[0] for e in entries))
        regions = self._codes(cur, "region_names", (e[1] for e in entries))
        cur.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                        [(sid, actions[a], regions[r], raw, ui, st) for a, r, raw, ui, st in entries])

    def _names(self, table: str) -> list[str | None]:
        rows = self._read(f"SELECT code, name FROM {table}")
        out: list[str | None] = [None] * (max((c for c, _ in rows), default=-1) + 1)
        for code, name in rows:
            out[code] = name
        return out

    @property
    def schema_version(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])

    def _checkpoint(self, point: str, submission_id: int) -> None:
        """Test hook: called right after each committed state change (and right after the create
        call returns, before its task id is committed: ``point="created"``). Does nothing."""

    def _set(self, cur: sqlite3.Cursor, sid: int, *, guard_status: Sequence[str] | None = None,
             guard_owner: str | None = None, request_ids: Iterable[str | None] = (), **fields: Any) -> int:
        """UPDATE one row (inside a transaction); returns the rows changed (0 when a guard fails)."""
        fields["updated_at"] = _now()
        ids = [r for r in request_ids if r]
        if ids:
            row = cur.execute("SELECT request_ids FROM submissions WHERE id=?", (sid,)).fetchone()
            have = _json_list(row[0] if row else "[]")
            for rid in ids:
                if rid not in have:
                    have.append(rid)
            fields["request_ids"] = json.dumps(have[:5] + have[-15:] if len(have) > 20 else have)
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE submissions SET {sets} WHERE id = ?"
        params: list[Any] = list(fields.values()) + [sid]
        if guard_status is not None:
            sql += f" AND status IN ({','.join('?' * len(guard_status))})"
            params += list(guard_status)
        if guard_owner is not None:
            sql += " AND owner = ?"
            params.append(guard_owner)
        return cur.execute(sql, params).rowcount

    def _update(self, sid: int, **kw: Any) -> int:
        with self._tx() as cur:
            return self._set(cur, sid, **kw)

    def _row(self, sid: int) -> dict[str, Any]:
        rows = self._read("SELECT * FROM submissions WHERE id = ?", (sid,))
        if not rows:
            raise LedgerError(f"No submission {sid} in {self.path}.")
        return dict(rows[0])

    def _live(self, row: Mapping[str, Any]) -> bool:
        """Whether a queued/uploading row is still being worked on by a live process."""
        owner = row.get("owner") or ""
        if _now() - float(row.get("updated_at") or 0) > self.lease_s:
            return False
        try:
            host, pid_text, token = owner.rsplit(":", 2)
            pid = int(pid_text)
        except ValueError:
            return False
        if host != _HOST:
            return True
        if pid == os.getpid():
            return token == _PROCESS_TOKEN
        return _pid_alive(pid)

    def _in_progress(self, row: Mapping[str, Any]) -> bool:
        """A live process is uploading this row, or sending its create request right now."""
        if row["status"] in ("queued", "uploading") or (row["status"] == "ambiguous"
                                                         and row["error_code"] == "create_unconfirmed"):
            return self._live(row)
        return False

    def _step(self, row: Mapping[str, Any]) -> str | None:
        return _next_step(row, live=self._in_progress(row))

    def _submission(self, row: Mapping[str, Any], *, reused: bool = False, note: str = "") -> Submission:
        row = dict(row)
        tags = {k: row[k] for k in FIXED_TAGS if row.get(k) is not None}
        tags.update(_json_dict(row.get("tags")))
        return Submission(
            id=row["id"], status=row["status"], task_id=row["task_id"], image_name=row["image_name"],
            image_sha256=row["image_sha256"], backend=row["backend"], engine=row["engine"],
            actions=tuple(_json_list(row["actions"])), format=row["format"], tags=tags,
            error_code=row["error_code"], error_message=row["error_message"], next_step=self._step(row),
            units_estimated=row["units_estimated"], units_charged=row["units_charged"],
            result_dir=(self.root / row["result_dir"]) if row["result_dir"] else None,
            row=row, reused=reused, note=note)

    def get(self, submission_id: int) -> Submission:
        """The :class:`Submission` with this id."""
        return self._submission(self._row(int(submission_id)))

    def result(self, submission_id: int):
        """The saved :class:`~skinlab.results.AnalysisResult` of a successful submission."""
        sub = self.get(submission_id)
        if sub.result is None:
            raise LedgerError(f"Submission {sub.id} is {sub.status}; it has no saved result. {sub.next_step or ''}")
        return sub.result

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM submissions")[0][0])

    def __repr__(self) -> str:
        counts = self._read("SELECT status, COUNT(*) FROM submissions GROUP BY status ORDER BY status")
        text = ", ".join(f"{n} {s}" for s, n in counts) or "empty"
        return f"<Ledger {self.path} ({text})>"

    def _repr_html_(self, max_rows: int = 20) -> str | None:
        """The notebook display (:func:`skinlab.display.ledger_html`): counts by status, backend,
        engine and tags over every submission, a warning when local-engine and cloud rows are both
        present, and the ``max_rows`` most recent rows. The counts read a few columns only (about
        0.5 s for 100,000 submissions on a 2-core machine). No images, no file names."""
        from .display import repr_html

        return repr_html(self, lambda ledger: ledger._html(max_rows))

    def _html(self, max_rows: int) -> str:
        import pandas as pd

        from .display import ledger_html

        cols = ["id", "created_at", "status", "backend", "engine", "subject", "timepoint", "condition",
                "units_charged"]
        rows = [tuple(r) for r in self._read(f"SELECT {', '.join(cols)} FROM submissions ORDER BY id")]
        overview = _typed(pd.DataFrame.from_records(rows, columns=cols).rename(columns={"id": "submission_id"}))
        recent = overview.sort_values(["created_at", "submission_id"], kind="stable").tail(max_rows)
        listed = self.submissions(ids=recent["submission_id"].tolist()) if len(recent) else None
        return ledger_html(overview, recent=listed, max_rows=max_rows, title=f"skinlab ledger {self.path.name}")

    # ---- identity

    def _relpath(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())

    def _source_meta(self, source: Any, plan) -> dict[str, Any]:
        meta: dict[str, Any] = {"image_name": None, "image_path": None, "image_sha256": None, "image_size": None,
                                "image_width": None, "image_height": None, "preflight": ""}
        if isinstance(source, (str, os.PathLike)) and plan.kind == "upload":
            p = Path(source)
            meta["image_name"] = p.name
            meta["image_path"] = self._relpath(p)
        elif plan.kind == "url":
            meta["image_name"] = urlsplit(plan.url).path.rsplit("/", 1)[-1] or None
        prep = plan.prepared
        if prep is not None:
            meta.update(image_sha256=prep.sha256, image_size=prep.size, image_width=prep.width,
                        image_height=prep.height, preflight="; ".join(prep.changes))
            if meta["image_name"] is None and prep.source_name:
                meta["image_name"] = Path(str(prep.source_name)).name
        return meta

    @staticmethod
    def _dedup_key(source_key: str, actions: Iterable[str], margs: Mapping[str, Any], fmt: str,
                   pf_camera_kit: bool | None, backend_key: str, api_version: str) -> str:
        ident = [source_key, sorted(set(actions)), dict(margs), fmt, pf_camera_kit, backend_key, api_version]
        return hashlib.sha256(_canon(ident).encode()).hexdigest()

    # ---- submitting

    def submit(self, client, source, actions, *, tags=None, force: bool = False, wait: bool = True,
               timeout: float | None = 300.0, raise_on_error: bool = False,
               reserve: Callable[[int], Any] | None = None, cancel: threading.Event | None = None,
               **options) -> Submission:
        """Submit one image through the ledger and return its :class:`Submission`.

        Steps: plan and pre-flight (no network) → look up the same submission → record
        ``queued`` → upload (``uploading``, then the file id) → record ``ambiguous`` (write-ahead)
        → create → record ``running`` and the task id → poll → save the results in
        ``results/<id>`` and record the scores (``success``), or record the error, or
        ``timeout`` at the deadline (the task id is kept; :meth:`resume` continues).

        Local backend only: a recorded success is reused only when its engine version is the
        current one, and a recorded task that its local emulator lost (restarted, or gone with
        the process that ran it) is closed as ``task_lost``; in both cases the image is analysed
        again (local tasks are free) and :attr:`Submission.rerun` says why. A task running in
        another live process's emulator is waited for through the ledger, never polled here.
        Cloud tasks stay valid for 24 h and are always resumed by polling.

        Parameters
        ----------
        client : skinlab.Client
            The service or local emulator to use. Its API key is never stored.
        source, actions, **options
            As for :meth:`skinlab.Client.submit` (``format``, ``mask_overlay``,
            ``miniserver_args``, ``downscale``, ``file_name``, ``pf_camera_kit``).
        tags : dict, TagSheet, FilenamePattern or callable, optional
            ``subject``, ``timepoint``, ``condition`` and any free key/values; a tagger is called
            with ``source``.
        force : bool
            Create a new task even when the ledger holds a success, a running task or an
            ambiguous create for the same submission (this can bill twice).
        wait : bool
            Wait for the outcome (default); False returns once the task is created.
        timeout : float or None
            Seconds to wait for the outcome before recording ``timeout`` (also bounds waiting
            for another process's submission of the same image).
        raise_on_error : bool
            Raise the :class:`~skinlab.errors.TaskError` when the task fails (it is recorded
            either way). Errors before a task exists (upload, authentication, units) and
            account problems are always raised, after being recorded; an error raised after the
            row was recorded carries its id as ``exc.submission_id``.
        reserve : callable, optional
            Called with the task's units only when a new task is to be created, inside the write
            transaction that decides so and before anything is recorded or sent (so a recorded
            success, a running task or an ambiguous row never reaches it). Raise from it to stop:
            the exception propagates and nothing is recorded. :func:`skinlab.analyze_many` uses
            it for ``max_units``.
        cancel : threading.Event, optional
            Once set, stop at the next step: before the create call the row becomes
            ``error``/``interrupted`` (nothing sent, nothing billed); after it the task is left
            ``running`` (its id is kept: :meth:`resume` or the next submit collects it).
            :func:`skinlab.analyze_many` sets it on Ctrl-C.

        Returns
        -------
        Submission
            ``reused=True`` when no task was created by this call (a recorded success was
            returned, a running task was waited for, or an ambiguous/in-progress row stopped it;
            a :class:`LedgerReuseWarning` says which).
        """
        plan = client.plan(source, actions, **options)
        meta = self._source_meta(source, plan)
        fixed, free = split_tags(tags_for(tags, source))
        base_url, backend_key, dedup = self._identity(client, plan)
        deadline = None if timeout is None else time.monotonic() + timeout
        lost: list[int] = []  # local tasks this call lost (emulator restarted): analysed again once
        while True:
            self._learn_engine(client, backend_key, dedup)
            decision, row, why = self._claim(client, plan, meta, fixed, free, base_url, backend_key, dedup, force,
                                             reserve, lost)
            if decision == "new":
                self._warn_if_replaced(row)
                try:
                    sub = self._run_new(client, plan, row["id"], deadline, raise_on_error, wait, cancel=cancel,
                                        rerun=why, may_rerun=not lost)
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        exc.submission_id = row["id"]  # type: ignore[attr-defined]
                    raise
                if sub is None:  # its local task was lost: analyse it again, once
                    lost.append(row["id"])
                    continue
                return sub
            note = self._explain(decision, row)
            if decision == "reuse":
                warnings.warn(note, LedgerReuseWarning, stacklevel=2)
                conflicts = self._merge_tags(row, fixed, free)
                return _with_conflicts(self._submission(self._row(row["id"]), reused=True, note=note), conflicts)
            if decision == "attach":
                warnings.warn(note, LedgerReuseWarning, stacklevel=2)
                if wait:
                    handle = client.task(row["task_id"], api_version=row["api_version"],
                                         actions=_json_list(row["actions"]), format=row["format"])
                    self._drive(client, {row["id"]: handle}, deadline, immediate=True, cancel=cancel)
                    if not lost and self._lost_local(row["id"]):
                        lost.append(row["id"])
                        continue
                # the same bytes submitted while its twin was in flight (two copies of one photo in a
                # batch): its tags are merged, or a conflict warned about, as on a plain reuse
                conflicts = self._merge_tags(self._row(row["id"]), fixed, free)
                return _with_conflicts(self._finish_call(row["id"], raise_on_error, reused=True, note=note), conflicts)
            if decision == "ambiguous":
                warnings.warn(note, LedgerReuseWarning, stacklevel=2)
                return self._submission(self._row(row["id"]), reused=True, note=note)
            # "busy" (another live process is uploading or creating it) or "wait" (its task runs in
            # another live process's local emulator): wait for that row to move on, then decide again.
            if not wait or (deadline is not None and time.monotonic() >= deadline) or (cancel and cancel.is_set()):
                warnings.warn(note, LedgerReuseWarning, stacklevel=2)
                return self._submission(self._row(row["id"]), reused=True, note=note)
            now = self._await_change(row, deadline, cancel)
            if now is not None and now["status"] == "error" and now["task_id"] and \
                    now["error_code"] not in ("task_lost", "interrupted", "not_created"):
                # the other process's task ended in an error: that is this image's verdict too
                note = (f"Submission {now['id']} of this image, analysed by another process, failed "
                        f"({now['error_code']}); no second task was created.")
                warnings.warn(note, LedgerReuseWarning, stacklevel=2)
                return self._finish_call(now["id"], raise_on_error, reused=True, note=note)

    def _await_change(self, row: Mapping[str, Any], deadline: float | None,
                      cancel: threading.Event | None) -> dict[str, Any] | None:
        """Sleep until ``row`` changes status (read-only), for at most about 2 s; the row then."""
        until = time.monotonic() + 2.0
        if deadline is not None:
            until = min(until, deadline)
        while True:
            if cancel is not None:
                if cancel.wait(0.2):
                    return None
            else:
                time.sleep(0.2)
            now = self._row(row["id"])
            if now["status"] != row["status"] or now["error_code"] != row["error_code"] or time.monotonic() >= until:
                return now

    def _learn_engine(self, client, backend_key: str, dedup: str) -> None:
        """Local backend: make sure ``client.engine`` is known before a recorded success is reused.

        The emulator names its engine (version and face backend) in a header of every answer; a
        client that has not talked to it yet asks for the unit balance (free) to learn it.
        """
        if backend_key != "local" or getattr(client, "engine", None) is not None:
            return
        if not self._read("SELECT 1 FROM submissions WHERE dedup_key = ? AND status = 'success' LIMIT 1", (dedup,)):
            return
        try:
            client.credits()
        except Exception as exc:  # informative only: without it, the recorded success is reused as before
            log.debug("could not ask the local emulator for its engine version: %s", exc)

    def _lost_local(self, sid: int) -> bool:
        row = self._row(sid)
        return row["status"] == "error" and row["error_code"] == "task_lost" and row["backend_key"] == "local"

    def _explain(self, decision: str, row: Mapping[str, Any]) -> str:
        sid, when = row["id"], _fmt_time(row["created_at"])
        if decision == "reuse":
            return (f"Submission {sid} (recorded {when}, task {str(row['task_id'])[:12]}...) already holds this "
                    f"result: it was reused and nothing was billed. Pass force=True to analyse it again.")
        if decision == "attach":
            return (f"Submission {sid} already has task {str(row['task_id'])[:12]}... for this; waiting for it "
                    f"instead of creating another (no second bill).")
        if decision == "wait":
            return (f"Submission {sid} of this image is being analysed by another process "
                    f"({_describe_owner(row.get('owner'))}) in its own local emulator ({row['base_url']}); "
                    f"waiting for it through the ledger (this client's emulator cannot poll that task).")
        if decision == "ambiguous":
            return f"Submission {sid} is ambiguous, so nothing was sent. {_next_step(row)}"
        return (f"Submission {sid} of this image is being submitted by another process ({row['owner']}); "
                f"no second task was created.")

    _MATCH_SQL = ("SELECT * FROM submissions WHERE dedup_key = ? AND status IN (%s) ORDER BY id DESC"
                  % ",".join("?" * len(_BLOCKING)))

    def _decide(self, rows: list[dict[str, Any]], engine: str | None, backend_key: str, force: bool,
                base_url: str | None = None):
        """What a submit of these matching rows' submission does: new, reuse, attach, wait, ambiguous
        or busy; with, for ``new``, the local running rows to close as lost and why the image is
        analysed again (``(submission id, phrase)`` for :func:`_rerun_texts`, or None)."""
        if force:
            return "new", None, [], None
        local = backend_key == "local"
        why = None
        for r in rows:
            if r["status"] != "success":
                continue
            if not local or not engine or r["engine"] == engine:
                return "reuse", r, [], None
            if why is None:  # local, another engine version: its scores are not this engine's
                why = (r["id"], f"was recorded with engine {r['engine'] or 'unknown'}, current is {engine}")
        stale, elsewhere = [], []
        for r in rows:
            if r["status"] in ("running", "timeout") and r["task_id"]:
                if local and base_url is not None and r["base_url"] != base_url:
                    # the task lives in another local emulator, which this client cannot poll
                    if self._working_elsewhere(r):
                        return "wait", r, [], None
                    # nobody polls it: an emulator that still answers (``skinlab serve``, or a live
                    # process's own) keeps the task, so the row is left for a client of it
                    (elsewhere if _emulator_answers(r["base_url"]) else stale).append(r)
                    continue
                return "attach", r, [], None
        for r in rows:
            if r["status"] == "ambiguous":
                return ("busy" if self._in_progress(r) else "ambiguous"), r, [], None
        for r in rows:
            if r["status"] in ("queued", "uploading") and self._live(r):
                return "busy", r, [], None
        if stale and why is None:
            why = (stale[0]["id"], f"'s task was in another local emulator ({stale[0]['base_url']}), "
                                   f"{_gone_with(stale[0])}")
        if elsewhere and why is None:
            why = (elsewhere[0]["id"], f"'s task is in another local emulator ({elsewhere[0]['base_url']}), which "
                                       f"this client cannot poll and no process has polled for over "
                                       f"{HEARTBEAT_STALE_S:g} s; that submission is left as it is")
        return "new", None, stale, why

    def _identity(self, client, plan) -> tuple[str, str, str]:
        base_url = _strip_userinfo(client.base_url)
        backend_key = _backend_key(base_url)
        dedup = self._dedup_key(plan.source_key, plan.actions, plan.miniserver_args, plan.format, plan.pf_camera_kit,
                                backend_key, client.api_version)
        return base_url, backend_key, dedup

    def lookup(self, client, source, actions, *, force: bool = False, tags=None, **options) -> "Lookup":
        """What :meth:`submit` would do with these arguments, without recording or sending anything.

        Runs pre-flight (no network) and the ledger look-up. Returns a :class:`Lookup`:
        ``decision`` is ``"new"`` (a task would be created and billed ``units`` on success),
        ``"reuse"`` (a recorded success answers it; ``reusable`` is True), ``"attach"`` (its task
        is running; it would be waited for), ``"wait"`` (its task runs in another live process's
        local emulator; it would be waited for through the ledger), ``"ambiguous"`` (blocked
        until resolved) or ``"busy"`` (another process is submitting it). The local backend may
        ask the emulator for its engine version (free), to tell whether a success is reusable.
        """
        plan = client.plan(source, actions, **options)
        base_url, backend_key, dedup = self._identity(client, plan)
        self._learn_engine(client, backend_key, dedup)
        rows = [dict(r) for r in self._read(self._MATCH_SQL, (dedup, *_BLOCKING))]
        decision, row, _, why = self._decide(rows, client.engine, backend_key, force, base_url)
        rerun = None
        if row:
            note = self._explain(decision, row)
        elif why:
            note, rerun = _rerun_texts(*why)
            note = "A new task would be created. " + note.replace("analysed again", "it would be analysed again")
            rerun = rerun.replace("analysed again", "would be analysed again")
        else:
            note = "A new task would be created."
        return Lookup(decision=decision, submission_id=row["id"] if row else None,
                      status=row["status"] if row else None, units=plan.units, source_key=plan.source_key,
                      note=note, rerun=rerun)

    def _claim(self, client, plan, meta, fixed, free, base_url, backend_key, dedup, force, reserve=None,
               lost: Sequence[int] = ()):
        """Look up the submission and, if a new task is needed, insert its ``queued`` row — in one
        write transaction, so two processes cannot both decide to create. ``reserve(units)`` is
        called just before the insert; if it raises, the transaction is rolled back. Returns
        (decision, row, why the image is analysed again or None)."""
        now = _now()
        with self._tx() as cur:
            rows = [dict(r) for r in cur.execute(self._MATCH_SQL, (dedup, *_BLOCKING)).fetchall()]
            decision, row, stale, why = self._decide(rows, client.engine, backend_key, force, base_url)
            if decision != "new":
                return decision, row, None
            if lost and why is None:
                why = (lost[-1], "'s task was lost by its local emulator (restarted, or the task expired)")
            if reserve is not None:
                reserve(plan.units)
            for r in rows:  # rows left by dead processes before any task existed
                if r["status"] in ("queued", "uploading") and not self._live(r):
                    self._set(cur, r["id"], guard_status=("queued", "uploading"), status="error",
                              error_code="interrupted", units_charged=0, owner=None,
                              error_message="The submitting process stopped before a task was created; "
                                            "nothing was billed.")
            values = dict(
                created_at=now, updated_at=now, status="queued", source_kind=plan.kind, source_key=plan.source_key,
                backend=client.backend, backend_key=backend_key, base_url=base_url, api_version=client.api_version,
                engine=client.engine, actions=json.dumps(list(plan.actions)), tier=plan.tier,
                miniserver_args=_canon(plan.miniserver_args), format=plan.format,
                pf_camera_kit=None if plan.pf_camera_kit is None else int(bool(plan.pf_camera_kit)),
                dedup_key=dedup, file_id=plan.file_id if plan.kind == "file_id" else None,
                units_estimated=plan.units, tags=_canon(free), owner=_owner(), **meta, **fixed)
            cols = ", ".join(values)
            cur.execute(f"INSERT INTO submissions ({cols}) VALUES ({', '.join('?' * len(values))})",
                        list(values.values()))
            values["id"] = new_id = cur.lastrowid
            for r in stale:  # local tasks whose emulator went with their process: lost, and free to redo
                self._set(cur, r["id"], guard_status=("running", "timeout"), status="error", error_code="task_lost",
                          units_charged=0, completed_at=now, owner=None,
                          error_message=f"Its task ran in the local emulator at {r['base_url']}, "
                                        f"{_gone_with(r)}, and the task went with it. "
                                        f"Local tasks are free: analysed again as submission {new_id}.")
            for sid in lost:
                old = cur.execute("SELECT error_message FROM submissions WHERE id = ?", (sid,)).fetchone()
                self._set(cur, sid, guard_status=("error",),
                          error_message=sentences(old[0] if old else None,
                                                   f"Local tasks are free: analysed again as submission {new_id}"))
        self._checkpoint("queued", values["id"])
        if why:
            log.info("submission %s: %s", values["id"], _rerun_texts(*why)[0])
        return "new", values, why

    def _warn_if_replaced(self, row: Mapping[str, Any]) -> None:
        """A photo file analysed before with other bytes (replaced by a re-crop, say): both
        submissions stay, with their tags, and tables would average them; say so once, here."""
        if not row.get("image_path") or not row.get("image_sha256"):
            return
        old = self._read("SELECT id FROM submissions WHERE image_path = ? AND image_sha256 != ? AND status = 'success' "
                         "AND backend_key = ? AND id != ? ORDER BY id DESC LIMIT 1",
                         (row["image_path"], row["image_sha256"], row["backend_key"], row["id"]))
        if old:
            sid = old[0][0]
            warnings.warn(f"{row.get('image_name') or row['image_path']} was analysed before with other bytes "
                          f"(submission {sid}): the file has changed since. Both submissions are kept, with their "
                          f"tags, so tables and plots of those tags would average them: filter by submission_id, or "
                          f"retag the old one with ledger.tag({sid}, ...).", UserWarning, stacklevel=4)

    def _merge_tags(self, row: Mapping[str, Any], fixed: Mapping[str, str | None],
                    free: Mapping[str, str]) -> list[str]:
        """Fill tags missing on a reused row; warn (and keep the old ones) on a conflict, and return
        the conflicts ("timepoint: 'T0' recorded, 'T1' given")."""
        updates, conflicts = {}, []
        for k, v in fixed.items():
            if v is None:
                continue
            if row.get(k) is None:
                updates[k] = v
            elif row[k] != v:
                conflicts.append(f"{k}: {row[k]!r} recorded, {v!r} given")
        old_free = _json_dict(row.get("tags"))
        merged = dict(old_free)
        for k, v in free.items():
            if k not in old_free:
                merged[k] = v
            elif old_free[k] != v:
                conflicts.append(f"{k}: {old_free[k]!r} recorded, {v!r} given")
        if merged != old_free:
            updates["tags"] = _canon(merged)
        if updates:
            self._update(row["id"], **updates)
        if conflicts:
            warnings.warn(f"Submission {row['id']} was reused but its tags differ ({'; '.join(conflicts)}); the "
                          f"recorded tags were kept. Change them with ledger.tag({row['id']}, ...).", UserWarning,
                          stacklevel=3)
        return conflicts

    def _interrupt(self, sid: int) -> Submission:
        """Cancelled before the create call: nothing was sent to create a task, nothing billed."""
        self._update(sid, guard_status=("queued", "uploading"), status="error", error_code="interrupted",
                     units_charged=0, owner=None,
                     error_message="Stopped (interrupted) before a task was created; nothing was billed.")
        self._checkpoint("interrupted", sid)
        return self.get(sid)

    def _run_new(self, client, plan, sid: int, deadline, raise_on_error: bool, wait: bool, *,
                 cancel: threading.Event | None = None, rerun: tuple[int, str] | None = None,
                 may_rerun: bool = False) -> Submission | None:
        """Upload, create and (``wait``) poll the new row ``sid``. None when ``may_rerun`` and its
        local task was lost while polling (the caller analyses the image again)."""
        owner = _owner()
        note, rerun = _rerun_texts(*rerun) if rerun else ("", None)
        # 1. upload (free; safe to repeat)
        try:
            if cancel is not None and cancel.is_set():
                return self._interrupt(sid)
            if plan.kind == "upload":
                self._update(sid, status="uploading", guard_status=("queued",))
                self._checkpoint("uploading", sid)
                file_id = client.upload_plan(plan)
                self._update(sid, file_id=file_id)
                self._checkpoint("uploaded", sid)
            if cancel is not None and cancel.is_set():
                return self._interrupt(sid)
            # 2. write-ahead: from here on, a crash leaves the row ambiguous, never re-sent.
            changed = self._update(
                sid, guard_status=("queued", "uploading"), guard_owner=owner, status="ambiguous",
                error_code="create_unconfirmed", task_created_at=_now(),
                error_message="The create request was being sent; its answer was not recorded.")
        except BaseException as exc:
            self._update(sid, guard_status=("queued", "uploading"), status="error", units_charged=0,
                         error_code=_code_of(exc), error_message=_message_of(exc) + " No task was created.",
                         request_ids=[getattr(exc, "request_id", None)], owner=None)
            raise
        if not changed:
            row = self._row(sid)
            note = (f"Submission {sid} was taken over by another process while uploading "
                    f"(now {row['status']}); this call created no task.")
            warnings.warn(note, LedgerReuseWarning, stacklevel=3)
            return self._submission(row, reused=True, note=note)
        self._checkpoint("creating", sid)
        # 3. create (billed on success; never retried when its fate is unknown)
        try:
            task = client.create(plan)
        except BaseException as exc:
            if _definitely_not_created(exc):
                self._update(sid, guard_status=("ambiguous",), status="error", units_charged=0,
                             error_code=_code_of(exc), error_message=_message_of(exc) + " No task was created.",
                             request_ids=[getattr(exc, "request_id", None)], owner=None)
                raise
            self._update(sid, guard_status=("ambiguous",), error_code="create_fate_unknown", owner=None,
                         error_message=_message_of(exc), request_ids=[getattr(exc, "request_id", None)])
            if isinstance(exc, TaskFateUnknownError):
                row = self._row(sid)
                note = f"Submission {sid}: the create answer was lost. {_next_step(row)}"
                warnings.warn(note, LedgerReuseWarning, stacklevel=3)
                return self._submission(row, note=note)
            raise
        self._checkpoint("created", sid)
        # The owner stays set: a local task lives in this process's emulator (see _working_elsewhere).
        # When waiting, the row counts as polled from before it shows as running.
        with self._driving([sid], claim=False) if wait else contextlib.nullcontext():
            self._update(sid, guard_status=("ambiguous",), status="running", task_id=task.task_id,
                         task_state="running", error_code=None, error_message=None, engine=client.engine,
                         backend=client.backend, owner=owner, request_ids=[getattr(task, "request_id", None)])
            self._checkpoint("running", sid)
            if not wait:
                sub = self.get(sid)
                sub.note, sub.rerun = note, rerun
                return sub
            self._drive(client, {sid: task}, deadline, immediate=False, cancel=cancel)
        if may_rerun and self._lost_local(sid):
            return None
        return self._finish_call(sid, raise_on_error, note=note, rerun=rerun)

    def _finish_call(self, sid: int, raise_on_error: bool, *, reused: bool = False, note: str = "",
                     rerun: str | None = None) -> Submission:
        row = self._row(sid)
        sub = self._submission(row, reused=reused, note=note)
        sub.rerun = rerun
        if row["status"] == "error" and row["task_id"] and raise_on_error:
            raise errors.task_error_for(row["error_code"], row["error_message"], task_id=row["task_id"])
        if row["status"] in ("timeout", "ambiguous") or (row["status"] == "running" and row["error_code"]):
            warnings.warn(f"Submission {sid} is {row['status']}: {row['error_message'] or ''} {sub.next_step}",
                          UserWarning, stacklevel=3)
        return sub

    # ---- polling and recording outcomes

    def _drive(self, client, handles: dict[int, Any], deadline: float | None, *, immediate: bool,
               cancel: threading.Event | None = None) -> None:
        """Poll ``handles`` (submission id -> Task) until each ends or the deadline passes.

        While polling, this process owns the rows and refreshes their heartbeat. When ``cancel``
        is set, polling stops and the rows stay ``running`` (their task ids are kept).
        """
        with self._driving(handles):
            self._poll_until(client, handles, deadline, immediate=immediate, cancel=cancel)

    def _poll_until(self, client, handles: dict[int, Any], deadline: float | None, *, immediate: bool,
                    cancel: threading.Event | None) -> None:
        pending = dict(handles)
        delays = iter(client.poll_schedule.delays())
        first = immediate
        while pending:
            if not first:
                delay = next(delays)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0.01:
                        break
                    delay = min(delay, remaining - 0.01)
                if cancel is not None:
                    if cancel.wait(max(0.0, delay)):
                        return  # stopped: the tasks stay running, their ids kept
                else:
                    time.sleep(max(0.0, delay))
            elif cancel is not None and cancel.is_set():
                return
            first = False
            for sid, handle in list(pending.items()):
                try:
                    status = handle.status()
                except InvalidTaskIdError as exc:
                    self._task_lost(sid, exc)
                    pending.pop(sid)
                    continue
                except SkinlabError as exc:  # transient (network, 5xx after retries): keep it running
                    self._update(sid, guard_status=("running", "timeout"), error_code=_code_of(exc),
                                 error_message=_message_of(exc) + " The task is kept; ledger.resume(client) "
                                 "polls it again.", request_ids=[exc.request_id])
                    pending.pop(sid)
                    continue
                self._update(sid, guard_status=("running", "timeout"), last_polled_at=_now(),
                             task_state=status.state, request_ids=[status.request_id])
                if status.done:
                    self._record_outcome(sid, handle)
                    pending.pop(sid)
        for sid in pending:
            self._update(sid, guard_status=("running", "timeout"), status="timeout",
                         error_message="The deadline passed while the task was running; its id is kept.")
            self._checkpoint("timeout", sid)

    def _task_lost(self, sid: int, exc: SkinlabError) -> None:
        row = self._row(sid)
        if row["backend_key"] == "local":
            self._update(sid, guard_status=("running", "timeout"), status="error", error_code="task_lost",
                         units_charged=0, completed_at=_now(), request_ids=[exc.request_id],
                         error_message="The local emulator no longer knows this task (it was restarted, or the "
                                       "task expired).")
        else:
            self._update(sid, guard_status=("running", "timeout"), status="ambiguous", error_code="task_expired",
                         request_ids=[exc.request_id],
                         error_message="The service no longer knows this task id (expired after 24 h or deleted) "
                                       "and its outcome was never recorded.")

    def _record_outcome(self, sid: int, handle) -> None:
        """The task ended (``handle.last_status`` is terminal): save its results or its error."""
        status = handle.last_status
        try:
            result = handle.wait(timeout=None)  # no poll: builds the result (downloads it) from last_status
        except TaskError as exc:
            self._update(sid, guard_status=("running", "timeout"), status="error", task_state="error",
                         error_code=exc.code or "task_error", error_message=status.message or exc.message,
                         units_charged=0, completed_at=_now(), request_ids=[exc.request_id])
            self._checkpoint("error", sid)
            return
        except SkinlabError as exc:
            row = self._row(sid)
            self._update(sid, guard_status=("running", "timeout"), task_state="success", error_code="download_failed",
                         units_charged=row["units_estimated"], request_ids=[exc.request_id],
                         error_message=f"The task succeeded but its results could not be downloaded ({_message_of(exc)}).")
            return
        self._save_success(sid, result)

    def _save_success(self, sid: int, result) -> None:
        rel = f"{self.results_dirname}/{sid:06d}"
        try:
            result.save(self.root / rel)
        except SkinlabError as exc:  # masks of a JSON result are downloaded here
            row = self._row(sid)
            self._update(sid, guard_status=("running", "timeout"), task_state="success", error_code="download_failed",
                         units_charged=row["units_estimated"],
                         error_message=f"The task succeeded but its masks could not be downloaded ({_message_of(exc)}).")
            return
        self._checkpoint("saved", sid)
        scores = [(e.action, e.region, e.raw_score, e.ui_score, e.skin_type) for e in result.entries]
        with self._tx() as cur:
            row = cur.execute("SELECT units_estimated FROM submissions WHERE id=?", (sid,)).fetchone()
            changed = self._set(cur, sid, guard_status=("running", "timeout"), status="success", task_state="success",
                                units_charged=row[0], completed_at=_now(), result_dir=rel, overall=result.overall,
                                skin_age=result.skin_age, engine=result.engine, backend=result.backend,
                                error_code=None, error_message=None)
            if changed:
                cur.execute("DELETE FROM scores WHERE submission_id = ?", (sid,))
                self._insert_scores(cur, sid, scores)
        self._checkpoint("success", sid)

    def resume(self, client, *, timeout: float | None = 60.0, refetch: bool = True):
        """Bring the ledger up to date after a crash, a timeout or a closed notebook.

        * ``queued``/``uploading`` rows whose process is gone are marked ``error``/``interrupted``
          (no task was created, nothing billed; submitting again is safe);
        * local ``running`` rows whose task is in another local emulator are not polled here:
          left alone while their process polls them, else closed as ``error``/``task_lost``
          (local tasks are free; the next submit analyses the image again);
        * ``running`` and ``timeout`` rows of this client's backend are polled (immediately, then
          on the client's schedule until ``timeout``) and their outcomes recorded; results are
          downloaded with fresh URLs (each poll signs new ones, §8.5). An id the service no longer
          knows becomes ``ambiguous`` (cloud; it may have been billed) or ``error`` (local);
        * with ``refetch``, successes whose results folder is missing are polled again while the
          task id is valid (24 h), and re-saved;
        * ``ambiguous`` rows are listed with their next step (and a warning), never re-sent.

        Returns a DataFrame, one row per submission looked at: ``submission_id``, ``image_name``,
        ``before``, ``status``, ``task_id``, ``error_code``, ``next_step``.
        """
        import pandas as pd

        backend_key = _backend_key(_strip_userinfo(client.base_url))
        report: list[dict[str, Any]] = []
        before: dict[int, str] = {}
        with self._tx() as cur:
            for r in cur.execute("SELECT * FROM submissions WHERE status IN ('queued','uploading')").fetchall():
                r = dict(r)
                if not self._live(r):
                    self._set(cur, r["id"], guard_status=("queued", "uploading"), status="error", owner=None,
                              error_code="interrupted", units_charged=0,
                              error_message="The submitting process stopped before a task was created; nothing "
                                            "was billed.")
                    before[r["id"]] = r["status"]
        handles: dict[int, Any] = {}
        rows = self._read("SELECT * FROM submissions WHERE status IN ('running','timeout') AND task_id IS NOT NULL "
                          "ORDER BY id")
        skipped = elsewhere = 0
        others: set[str] = set()
        base_url = _strip_userinfo(client.base_url)
        for r in rows:
            if r["backend_key"] != backend_key:
                skipped += 1
                continue
            if backend_key == "local" and r["base_url"] != base_url:
                # its task lives in another local emulator, which this client cannot poll
                if self._working_elsewhere(dict(r)):
                    elsewhere += 1
                    continue
                if _emulator_answers(r["base_url"]):  # still up (skinlab serve): its task may be there
                    others.add(r["base_url"])
                    continue
                self._update(r["id"], guard_status=("running", "timeout"), status="error", error_code="task_lost",
                             units_charged=0, completed_at=_now(), owner=None,
                             error_message=f"Its task ran in the local emulator at {r['base_url']}, "
                                           f"{_gone_with(dict(r))}, and the task went with it.")
                before[r["id"]] = r["status"]
                continue
            before[r["id"]] = r["status"]
            handles[r["id"]] = client.task(r["task_id"], api_version=r["api_version"], actions=_json_list(r["actions"]),
                                           format=r["format"])
        deadline = None if timeout is None else time.monotonic() + timeout
        if handles:
            self._drive(client, handles, deadline, immediate=True)
        if refetch:
            horizon = _now() - TASK_TTL_S
            for r in self._read("SELECT * FROM submissions WHERE status='success' AND task_id IS NOT NULL AND "
                                "backend_key=? AND completed_at > ?", (backend_key, horizon)):
                if r["result_dir"] and (self.root / r["result_dir"] / "result.json").exists():
                    continue
                self._refetch(client, dict(r))
                before[r["id"]] = "success"
        for sid, was in before.items():
            row = self._row(sid)
            report.append(self._report_row(row, was))
        ambiguous = [dict(r) for r in self._read("SELECT * FROM submissions WHERE status='ambiguous' ORDER BY id")]
        ambiguous = [r for r in ambiguous if not self._in_progress(r)]
        for r in ambiguous:
            if r["id"] not in before:
                report.append(self._report_row(r, "ambiguous"))
        if ambiguous:
            warnings.warn(f"{len(ambiguous)} submission(s) are ambiguous (a task may exist and be billed, or not): "
                          f"ids {', '.join(str(r['id']) for r in ambiguous[:20])}. See the next_step column; they are "
                          "never re-sent automatically.", UserWarning, stacklevel=2)
        if skipped:
            log.warning("resume: %d running task(s) belong to another backend and were not polled; resume with a "
                        "client for that backend.", skipped)
        if elsewhere:
            log.info("resume: %d running local task(s) are being polled by another live process in its own "
                     "emulator; that process records them.", elsewhere)
        if others:
            log.warning("resume: running local task(s) are in another local emulator that still answers (%s) and "
                        "were not polled; resume with a client of it (Client(base_url=...)).",
                        ", ".join(sorted(others)))
        cols = ["submission_id", "image_name", "before", "status", "task_id", "error_code", "next_step"]
        return pd.DataFrame(report, columns=cols)

    def _refetch(self, client, row: Mapping[str, Any]) -> bool:
        """Download and save again the results of a recorded success whose folder is missing."""
        handle = client.task(row["task_id"], api_version=row["api_version"], actions=_json_list(row["actions"]),
                             format=row["format"])
        rel = row["result_dir"] or f"{self.results_dirname}/{row['id']:06d}"
        try:
            status = handle.status()
            if status.state != "success":
                raise LedgerError(f"the task answers {status.state}")
            handle.wait(timeout=None).save(self.root / rel)
        except SkinlabError as exc:
            log.warning("submission %s: cannot download its results again (%s); its scores stay recorded.",
                        row["id"], _message_of(exc))
            return False
        self._update(row["id"], result_dir=rel, last_polled_at=_now(), request_ids=[status.request_id])
        return True

    def _report_row(self, row: Mapping[str, Any], was: str) -> dict[str, Any]:
        return {"submission_id": row["id"], "image_name": row["image_name"], "before": was, "status": row["status"],
                "task_id": row["task_id"], "error_code": row["error_code"], "next_step": self._step(row)}

    def resolve(self, submission_id: int, *, task_id: str | None = None, created: bool | None = None) -> Submission:
        """Settle an ``ambiguous`` submission after checking the console.

        ``task_id="..."``: the task exists; the row becomes ``running`` with that id and
        :meth:`resume` collects it. ``created=False``: no task was created; the row becomes
        ``error``/``not_created`` and the next submit creates one. ``created=True`` (no id): a
        task was billed but cannot be found; the row becomes ``error``/``lost_billed``.
        """
        row = self._row(int(submission_id))
        if row["status"] != "ambiguous":
            raise LedgerError(f"Submission {row['id']} is {row['status']}, not ambiguous; nothing to resolve.")
        if task_id:
            self._update(row["id"], guard_status=("ambiguous",), status="running", task_id=str(task_id),
                         error_code=None, error_message="Task id attached by hand (ledger.resolve).")
        elif created is False:
            self._update(row["id"], guard_status=("ambiguous",), status="error", error_code="not_created",
                         units_charged=0, error_message="Confirmed by hand: no task was created (ledger.resolve).")
        elif created is True:
            self._update(row["id"], guard_status=("ambiguous",), status="error", error_code="lost_billed",
                         units_charged=row["units_estimated"],
                         error_message="Confirmed by hand: a task was created and billed; its id is unknown.")
        else:
            raise LedgerError("Pass task_id='...' (the task exists) or created=False (it does not).")
        return self.get(row["id"])

    def submit_many(self, client, sources: Iterable[Any], actions, *, tags=None, progress: bool = False,
                    **kw) -> "Any":
        """:meth:`submit` each source; image problems and failed tasks are recorded (or warned
        about) and the loop goes on; account problems (authentication, units) stop it.

        Returns :meth:`submissions` for the ids touched.
        """
        ids: list[int] = []
        items = list(sources)
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="ledger")
        for src in items:
            try:
                ids.append(self.submit(client, src, actions, tags=tags, **kw).id)
            except (errors.ImageError, TagError, errors.UploadError, errors.InvalidParametersError) as exc:
                warnings.warn(f"skipped {getattr(src, 'name', None) or Path(str(src)).name}: {exc}", UserWarning,
                              stacklevel=2)
        return self.submissions(ids=ids)

    # ---- recording results made elsewhere (imports, benchmarks)

    def record(self, result, *, image=None, image_name: str | None = None, image_sha256: str | None = None,
               image_size: int | None = None, base_url: str | None = None, tags=None, save: bool = True) -> Submission:
        """Record a finished result (an :class:`~skinlab.results.AnalysisResult`, or its
        ``to_dict()``) as a ``success`` row, e.g. a result analysed before the ledger existed.

        ``image`` (a path) fills the name, path, SHA-256 and size; when the SHA-256 is known the row
        takes part in reuse like any other. ``save`` writes the result folder (AnalysisResult only).
        """
        return self.get(self.record_many([dict(result=result, image=image, image_name=image_name,
                                               image_sha256=image_sha256, image_size=image_size, base_url=base_url,
                                               tags=tags, save=save)])[0])

    def record_many(self, items: Iterable[Mapping[str, Any]], *, batch_size: int = 1000) -> list[int]:
        """:meth:`record` many results, ``batch_size`` per transaction; returns the new ids."""
        ids: list[int] = []
        batch: list[Mapping[str, Any]] = []
        for item in items:
            batch.append(item)
            if len(batch) >= batch_size:
                ids += self._record_batch(batch)
                batch = []
        if batch:
            ids += self._record_batch(batch)
        return ids

    def _record_batch(self, batch: list[Mapping[str, Any]]) -> list[int]:
        from .client import DEFAULT_BASE_URL

        prepared = []
        for item in batch:
            result = item["result"]
            data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
            scores = data.get("scores") or []
            actions = list(dict.fromkeys(s["action"] for s in scores))
            tier = data.get("tier") or (CATALOGUE[actions[0]].tier if actions and actions[0] in CATALOGUE else "sd")
            backend = data.get("backend") or "cloud"
            api_version = data.get("api_version") or "v2.0"
            meta = {"image_name": item.get("image_name"), "image_path": None, "image_sha256": item.get("image_sha256"),
                    "image_size": item.get("image_size")}
            image = item.get("image")
            if image is not None:
                p = Path(image)
                blob = p.read_bytes()
                meta.update(image_name=meta["image_name"] or p.name, image_path=self._relpath(p),
                            image_sha256=meta["image_sha256"] or hashlib.sha256(blob).hexdigest(),
                            image_size=meta["image_size"] or len(blob))
            base = _strip_userinfo(item.get("base_url") or ("http://127.0.0.1" if backend == "local"
                                                             else DEFAULT_BASE_URL))
            backend_key = _backend_key(base)
            source_key = f"sha256:{meta['image_sha256']}" if meta["image_sha256"] else f"import:{secrets.token_hex(8)}"
            fmt = data.get("format") or "zip"
            try:
                units = estimate_units(actions) if actions else 0
            except SkinlabError:
                units = 0
            fixed, free = split_tags(tags_for(item.get("tags"), image or meta["image_name"]))
            now = _now()
            row = dict(created_at=now, updated_at=now, status="success", source_kind="upload", source_key=source_key,
                       backend=backend, backend_key=backend_key, base_url=base, api_version=api_version,
                       engine=data.get("engine"), actions=json.dumps(actions), tier=tier, miniserver_args="{}",
                       format=fmt, dedup_key=self._dedup_key(source_key, actions, {}, fmt, None, backend_key,
                                                             api_version),
                       task_id=data.get("task_id"), task_state="success", completed_at=now, units_estimated=units,
                       units_charged=units, overall=data.get("overall"), skin_age=data.get("skin_age"),
                       tags=_canon(free), **meta, **fixed)
            score_rows = [(s["action"], s.get("region") or "whole", s.get("raw_score"), s.get("ui_score"),
                           s.get("skin_type")) for s in scores]
            prepared.append((row, score_rows, result if item.get("save", True) and hasattr(result, "save") else None))
        ids = []
        with self._tx() as cur:
            for row, score_rows, _ in prepared:
                cols = ", ".join(row)
                cur.execute(f"INSERT INTO submissions ({cols}) VALUES ({', '.join('?' * len(row))})",
                            list(row.values()))
                sid = cur.lastrowid
                ids.append(sid)
                self._insert_scores(cur, sid, score_rows)
        for sid, (_, _, result) in zip(ids, prepared):
            if result is not None:
                rel = f"{self.results_dirname}/{sid:06d}"
                result.save(self.root / rel)
                self._update(sid, result_dir=rel)
        return ids

    # ---- tags

    def tag(self, submission_id: int, **tags: Any) -> Submission:
        """Set tags of one submission (``None`` removes a free tag)."""
        row = self._row(int(submission_id))
        fixed = {k: (None if tags[k] is None else str(tags[k])) for k in FIXED_TAGS if k in tags}
        _, free = split_tags({k: v for k, v in tags.items() if k not in FIXED_TAGS})
        merged = _json_dict(row["tags"])
        merged.update(free)
        for k, v in tags.items():
            if v is None and k not in FIXED_TAGS:
                merged.pop(k, None)
        self._update(row["id"], tags=_canon(merged), **fixed)
        return self.get(row["id"])

    def apply_tags(self, tagger, *, overwrite: bool = False, missing: str = "raise") -> int:
        """Tag recorded submissions from a TagSheet, FilenamePattern or function of the image path.

        Rows with no image name are skipped. ``missing="skip"`` ignores images the tagger does not
        know; ``"raise"`` (default) raises one :class:`~skinlab.tags.TagError` listing them all and
        changes nothing. Returns the number of rows changed.
        """
        rows = self._read("SELECT * FROM submissions WHERE image_name IS NOT NULL ORDER BY id")
        plan: list[tuple[int, dict[str, Any]]] = []
        problems: list[str] = []
        for r in rows:
            key = r["image_path"] or r["image_name"]
            try:
                fixed, free = split_tags(tags_for(tagger, key))
            except TagError as exc:
                problems.append(f"submission {r['id']}: {exc.message}")
                continue
            updates: dict[str, Any] = {}
            for k, v in fixed.items():
                if v is not None and (overwrite or r[k] is None) and r[k] != v:
                    updates[k] = v
            old = _json_dict(r["tags"])
            new = {**old, **free} if overwrite else {**free, **old}
            if new != old:
                updates["tags"] = _canon(new)
            if updates:
                plan.append((r["id"], updates))
        if problems and missing != "skip":
            raise TagError(f"{len(problems)} submission(s) could not be tagged, so none was changed: "
                           + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
        with self._tx() as cur:
            for sid, updates in plan:
                self._set(cur, sid, **updates)
        return len(plan)

    # ---- tables

    def _where(self, filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        clauses, params = [], []
        filters = dict(filters)

        def many(col: str, value: Any) -> None:
            vals = [value] if isinstance(value, (str, int, float)) or value is None else list(value)
            if any(v is None for v in vals):
                rest = [v for v in vals if v is not None]
                part = f"{col} IS NULL"
                if rest:
                    part = f"({part} OR {col} IN ({','.join('?' * len(rest))}))"
                    params.extend(rest)
                clauses.append(part)
            else:
                clauses.append(f"{col} IN ({','.join('?' * len(vals))})")
                params.extend(vals)

        for key in ("status", "backend", "engine", "subject", "timepoint", "condition", "image_name", "task_id",
                    "tier", "format", "api_version", "image_sha256"):
            if filters.get(key) is not None:
                value = filters.pop(key)
                if key in _FILTER_VALUES:
                    known = _FILTER_VALUES[key]
                    bad = {v for v in ([value] if isinstance(value, str) else value)
                           if v is not None and v not in known}  # None: rows without a value
                    if bad:
                        raise LedgerError(f"Unknown {key} {sorted(map(str, bad))}; the {key} values are "
                                          f"{', '.join(known)}.")
                many(key, value)
            else:
                filters.pop(key, None)
        ids = filters.pop("ids", None)
        if ids is not None:
            ids = [int(i) for i in ids]
            clauses.append(f"id IN ({','.join('?' * len(ids))})" if ids else "0")
            params.extend(ids)
        for key, op in (("since", ">="), ("until", "<")):
            value = filters.pop(key, None)
            if value is not None:
                clauses.append(f"created_at {op} ?")
                params.append(_epoch(value))
        free = filters.pop("tags", None) or {}
        for k, v in dict(free).items():
            if k in FIXED_TAGS:
                many(k, v)
                continue
            vals = [v] if isinstance(v, str) or v is None else list(v)
            clauses.append(f"json_extract(tags, ?) IN ({','.join('?' * len(vals))})")
            params.append(f'$."{k}"')
            params.extend(str(x) for x in vals)
        if filters:
            raise LedgerError(f"Unknown filter(s) {', '.join(sorted(filters))}; use status, backend, engine, subject, "
                              "timepoint, condition, tags={...}, since, until, ids, image_name, task_id, tier, format, "
                              "api_version.")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _submission_frame(self, where: str, params: list[Any]):
        import pandas as pd

        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = None
            rows = cur.execute(f"SELECT * FROM submissions{where} ORDER BY id", params).fetchall()
            names = [d[0] for d in cur.description]
            cur.close()
        df = pd.DataFrame.from_records(rows, columns=names)
        del rows
        df = df.rename(columns={"id": "submission_id"})

        def memo(series, fn):
            return series.map({v: fn(v) for v in series.unique()}) if len(series) else series

        df["actions"] = memo(df["actions"], lambda v: ",".join(_json_list(v)))
        df["request_ids"] = memo(df["request_ids"], lambda v: ",".join(_json_list(v)))
        df["pf_camera_kit"] = pd.Series([None if v is None or v != v else bool(v) for v in df["pf_camera_kit"]],
                                        index=df.index, dtype=object)
        df["next_step"] = None
        pending = df.index[df["status"] != "success"]
        if len(pending):
            sub = df.loc[pending].rename(columns={"submission_id": "id"}).to_dict("records")
            df.loc[pending, "next_step"] = [self._step(r) for r in sub]
        tags = _tag_columns(df.pop("tags"))
        df = pd.concat([df, tags], axis=1)
        df = df[SUBMISSION_COLUMNS + sorted(tags.columns)]
        return _typed(df)

    def submissions(self, **filters):
        """One row per submission (columns: :data:`SUBMISSION_COLUMNS` + ``tag_<key>``).

        Filters: ``status``, ``backend``, ``engine``, ``subject``, ``timepoint``, ``condition``,
        ``tier``, ``format``, ``api_version``, ``image_name``, ``image_sha256``, ``task_id`` (a
        value or a list), ``tags={"site": "A"}`` (free tags), ``since``/``until`` (datetime,
        ISO string or epoch seconds, on ``created_at``), ``ids``.
        """
        where, params = self._where(filters)
        return self._submission_frame(where, params)

    def scores(self, *, actions=None, allow_mixed: bool = False, compact: bool = False, **filters):
        """Tidy scores: one row per submission x action x region (columns: :data:`SCORE_COLUMNS`
        + ``tag_<key>``), successes only. Filters as for :meth:`submissions`, plus ``actions``
        (action names or concern keys such as ``"wrinkle"``, which select both tiers).

        ``compact=True`` returns the text columns as pandas categoricals: several times less memory
        and faster for very large studies (100,000 submissions), at the price of categorical
        semantics (pass ``observed=True`` to ``groupby`` on pandas 2).

        Raises :class:`MixedBackendsError` when local and cloud scores would be pooled, unless
        ``backend=`` is given or ``allow_mixed=True``.
        """
        import numpy as np
        import pandas as pd

        filters.setdefault("status", "success")
        where, params = self._where(filters)
        mcols = ["submission_id", "created_at", "completed_at", "image_name", "image_sha256", "subject", "timepoint",
                 "condition", "backend", "engine", "api_version", "tier", "format", "task_id", "tags"]
        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = None  # plain tuples: several times faster than sqlite3.Row for bulk reads
            meta = cur.execute(f"SELECT {', '.join(['id'] + mcols[1:])} FROM submissions{where} ORDER BY id",
                               params).fetchall()
            action_filter, action_params = "", []
            if actions is not None:
                codes = self._action_codes(actions)
                action_filter = f" AND action IN ({','.join('?' * len(codes))})"
                action_params = codes
            sc = cur.execute(
                "SELECT submission_id, action, region, raw_score, ui_score, skin_type FROM scores WHERE submission_id "
                f"IN (SELECT id FROM submissions{where}){action_filter} ORDER BY submission_id, action, region",
                list(params) + action_params).fetchall()
            cur.close()
        if not meta and len(self) == 0:
            log.warning("The ledger %s holds no submissions at all%s. If you meant an existing study, check the "
                        "path (skinlab.Ledger creates a new, empty ledger where there is none).", self.path,
                        " (it was created when opened)" if self.created else "")
        action_names = np.array(self._names("action_names"), dtype=object)
        region_names = np.array(self._names("region_names"), dtype=object)
        m = pd.DataFrame.from_records(meta, columns=mcols)
        self._check_mixed(m, filters.get("backend"), allow_mixed)
        tag_frame = _tag_columns(m.pop("tags"))
        m = pd.concat([m, tag_frame], axis=1)
        table = np.array(sc, dtype=object).reshape(len(sc), 6)
        del sc
        sid = table[:, 0].astype(np.int64)
        act = table[:, 1].astype(np.int64)
        reg = table[:, 2].astype(np.int64)
        concerns = list(dict.fromkeys(CATALOGUE[n].concern if n in CATALOGUE else str(n) for n in action_names))
        concern_code = np.array([concerns.index(CATALOGUE[n].concern if n in CATALOGUE else str(n))
                                 for n in action_names], dtype=np.int64)
        m = _typed(m)
        if compact:
            for col in m.columns:
                if col != "submission_id" and col not in _TIME_COLUMNS:
                    m[col] = m[col].astype("category")
        pos = np.searchsorted(m["submission_id"].to_numpy(dtype=np.int64), sid)
        df = m.take(pos).reset_index(drop=True)
        if compact:
            df["action"] = pd.Categorical.from_codes(act, categories=_unique_names(action_names))
            df["concern"] = pd.Categorical.from_codes(concern_code[act], categories=concerns)
            df["region"] = pd.Categorical.from_codes(reg, categories=_unique_names(region_names))
            df["skin_type"] = pd.Categorical(table[:, 5])
        else:
            df["action"] = action_names[act]
            df["concern"] = np.array(concerns, dtype=object)[concern_code[act]]
            df["region"] = region_names[reg]
            df["skin_type"] = table[:, 5]
        df["raw_score"] = table[:, 3].astype(np.float64)
        df["ui_score"] = pd.array(table[:, 4].astype(np.float64), dtype="Int64")
        del table
        cols = SCORE_COLUMNS + sorted(tag_frame.columns)
        df = _typed(df[cols])
        df.attrs["backends"] = sorted(m["backend"].dropna().unique().tolist())
        return df

    def _action_codes(self, actions) -> list[int]:
        items = [a.strip() for a in actions.split(",")] if isinstance(actions, str) else list(actions)
        known = {name: code for code, name in enumerate(self._names("action_names")) if name is not None}
        codes: list[int] = []
        for item in items:
            names = [item] if item in known else [n for n in known if n in CATALOGUE and CATALOGUE[n].concern == item]
            if not names:
                raise LedgerError(f"Unknown action or concern {item!r} in actions=.")
            codes += [known[n] for n in names]
        return sorted(set(codes))

    def _check_mixed(self, meta, backend_filter, allow_mixed: bool) -> None:
        backends = meta["backend"].dropna().unique().tolist()
        if len(backends) > 1 and backend_filter is None and not allow_mixed:
            counts = meta["backend"].value_counts().to_dict()
            raise MixedBackendsError(
                "These scores come from different instruments, which are not comparable: "
                + ", ".join(f"{n} submissions from {b}" for b, n in sorted(counts.items()))
                + ". Pick one with backend='cloud' or backend='local', or pass allow_mixed=True to get both "
                  "(the backend and engine columns tell them apart).")
        if len(backends) >= 1 and not allow_mixed:
            for b in backends:
                engines = meta.loc[meta["backend"] == b, "engine"].dropna().unique().tolist()
                if len(engines) > 1:
                    warnings.warn(f"The {b} scores come from {len(engines)} engine versions ({', '.join(engines)}); "
                                  "filter with engine= to compare like with like.", UserWarning, stacklevel=3)

    def wide(self, *, value: str = "raw_score", actions=None, allow_mixed: bool = False, **filters):
        """One row per submission, one column per action and region (see the module docstring).

        ``value`` is ``"raw_score"`` or ``"ui_score"``; skin-type columns hold the category.
        ``overall`` is the service's ``all`` score, the mean of the ui scores, whatever ``value``
        is (the service gives no raw overall), and ``skin_age`` is in years.
        """
        import pandas as pd

        if value not in ("raw_score", "ui_score"):
            raise LedgerError("value must be 'raw_score' or 'ui_score'")
        tidy = self.scores(actions=actions, allow_mixed=allow_mixed, **filters)
        tag_cols = [c for c in tidy.columns if c.startswith("tag_")]
        index = WIDE_INDEX + tag_cols
        if tidy.empty:
            return pd.DataFrame(columns=index + ["overall", "skin_age"])
        tidy = tidy.copy()
        tidy["column"] = tidy["action"].where(tidy["region"] == "whole", tidy["action"] + "_" + tidy["region"])
        is_type = tidy["skin_type"].notna() & tidy[value].isna()
        tidy["value"] = tidy[value].astype("object").where(~is_type, tidy["skin_type"])
        col_order = list(dict.fromkeys(tidy["column"]))
        keyed = tidy.set_index(["submission_id", "column"])["value"]
        table = keyed.unstack("column")
        table = table[[c for c in col_order if c in table.columns]]
        for c in table.columns:
            if not tidy.loc[tidy["column"] == c, "skin_type"].notna().any():
                table[c] = pd.to_numeric(table[c]).astype("Int64" if value == "ui_score" else "float64")
        info = tidy.drop_duplicates("submission_id").set_index("submission_id")
        extra = self._read(f"SELECT id, overall, skin_age FROM submissions WHERE id IN "
                           f"({','.join(str(int(i)) for i in table.index)})")
        extras = pd.DataFrame.from_records(extra, columns=["submission_id", "overall", "skin_age"]).set_index(
            "submission_id")
        out = info[[c for c in index if c != "submission_id"]].join(extras).join(table)
        out = out.reset_index()
        out["skin_age"] = out["skin_age"].astype("Int64")
        table.columns.name = None
        out.columns.name = None
        return out

    def summary(self):
        """Counts and units per backend and status."""
        import pandas as pd

        rows = self._read("SELECT backend, status, COUNT(*) AS submissions, SUM(COALESCE(units_charged, 0)) AS "
                          "units_charged FROM submissions GROUP BY backend, status ORDER BY backend, status")
        return pd.DataFrame([dict(r) for r in rows], columns=["backend", "status", "submissions", "units_charged"])

    def table(self, name: str = "scores", *, deidentify: bool = False, salt: str | bytes | None = None, **filters):
        """``submissions``, ``scores`` or ``wide`` as a DataFrame, optionally de-identified."""
        if name not in ("submissions", "scores", "wide"):
            raise LedgerError("table must be 'submissions', 'scores' or 'wide'")
        df = getattr(self, name)(**filters)
        return _deidentify(df, salt=salt) if deidentify else df

    def export(self, path: str | os.PathLike, table: str = "scores", *, deidentify: bool = False,
               salt: str | bytes | None = None, **filters) -> Path:
        """Write a table to ``.csv`` or ``.parquet`` (by the suffix) and return the path.

        ``deidentify=True`` drops names, paths and service ids (see the module docstring); with
        ``salt`` the SHA-256 is re-hashed. Parquet needs pyarrow (``pip install 'skinlab[parquet]'``).
        Times are written as ISO 8601 UTC in CSV.
        """
        path = Path(path)
        df = self.table(table, deidentify=deidentify, salt=salt, **filters)
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            df.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ")
        elif suffix in (".parquet", ".pq"):
            import importlib.util

            if importlib.util.find_spec("pyarrow") is None:
                raise LedgerError("Parquet export needs pyarrow: pip install 'skinlab[parquet]' (or export to .csv).")
            df.to_parquet(path, index=False)
        else:
            raise LedgerError(f"Export to .csv or .parquet, not {suffix or 'a file without suffix'}.")
        return path


_deidentify = deidentify


def _epoch(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    import pandas as pd

    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.timestamp()


def _tag_columns(series):
    import pandas as pd

    cache: dict[str, dict] = {}
    parsed = [cache[t] if t in cache else cache.setdefault(t, _json_dict(t)) for t in series]
    keys = sorted({k for d in parsed for k in d})
    return pd.DataFrame({f"tag_{k}": [d.get(k) for d in parsed] for k in keys}, index=series.index)


def _unique_names(names) -> list[str]:
    return [str(n) if n is not None else f"?{i}" for i, n in enumerate(names)]


def _typed(df):
    import pandas as pd

    for col in _TIME_COLUMNS:
        if col in df.columns and not isinstance(df[col].dtype, pd.DatetimeTZDtype):
            micros = (pd.to_numeric(df[col]).astype("float64") * 1e6).round()
            df[col] = pd.to_datetime(micros, unit="us", utc=True)
    for col in ("ui_score", "skin_age", "image_size", "image_width", "image_height", "units_estimated",
                "units_charged"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("raw_score", "overall"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col]).astype("float64")
    if "submission_id" in df.columns:
        df["submission_id"] = df["submission_id"].astype("int64")
    return df


def _code_of(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    return type(exc).__name__


def _message_of(exc: BaseException) -> str:
    if isinstance(exc, SkinlabError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted (KeyboardInterrupt)."
    return errors.redact(f"{type(exc).__name__}: {exc}")


def _definitely_not_created(exc: BaseException) -> bool:
    """True when a failed create call certainly made no task (so it is an error, not ambiguous)."""
    if isinstance(exc, TaskFateUnknownError):
        return False
    if isinstance(exc, SkinlabConnectionError):  # create raises it only when no byte was sent
        return True
    status = getattr(exc, "status", None)
    return isinstance(exc, SkinlabError) and status is not None and 400 <= status < 500
