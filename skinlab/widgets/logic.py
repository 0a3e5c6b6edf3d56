"""What the notebook forms do, as plain functions (no widgets here).

The widgets in :mod:`skinlab.widgets` only read their controls, call these functions and show
what they return; the tests call these functions directly. Nothing here imports ipywidgets.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Iterable, Sequence

from .._net import redact_url
from ..actions import CATALOGUE, CONCERNS, colour_actions, estimate_units, resolve_actions, validate_actions
from ..errors import ImageError, InvalidParametersError, SkinlabError

__all__ = [
    "CONCERN_GROUPS", "DEFAULT_LEDGER", "IMAGE_SUFFIXES", "ImageItem", "Runner", "UploadEntry", "UPLOAD_LIMIT_MB",
    "action_name", "backend_summary", "check_item", "clear_upload", "concern_rows", "cost_summary",
    "filter_submissions", "item_from_path", "item_from_sample", "item_from_upload", "item_from_url",
    "items_from_path", "list_folder", "mask_options", "mask_png", "open_ledger", "outcome_text", "profile_png",
    "selected_actions", "submission_header_html", "submission_options", "submissions_table_html",
    "tags_from_fields", "thumbnail_png", "units_summary", "upload_entries", "upload_limit_text", "widget_state_text",
]

#: The concerns as the action picker groups them (every concern once).
CONCERN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Lines and texture", ("wrinkle", "pore", "texture", "firmness")),
    ("Tone and surface", ("acne", "age_spot", "redness", "radiance", "oiliness", "moisture")),
    ("Eyes", ("eye_bag", "dark_circle", "droopy_upper_eyelid", "droopy_lower_eyelid", "tear_trough")),
    ("Skin type", ("skin_type",)),
)

#: Tornado's default ``websocket_max_message_size`` (10 MiB), which Jupyter Server (JupyterLab,
#: Notebook 7) and Voilà keep: one upload message (all files picked at once) larger than this never
#: reaches the kernel.
UPLOAD_LIMIT_MB = 10

#: Where :func:`skinlab.app` keeps its ledger unless told otherwise.
DEFAULT_LEDGER = Path("skinlab-study") / "ledger.sqlite"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_THUMB = 96


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------- actions


def action_name(concern: str, tier: str) -> str:
    """The action name of ``concern`` in ``tier`` (``("dark_circle", "sd")`` -> ``"dark_circle_v2"``)."""
    for name, action in CATALOGUE.items():
        if action.concern == concern and action.tier == tier:
            return name
    raise InvalidParametersError(f"No {tier.upper()} action for concern {concern!r}")


def concern_rows(tier: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The picker's groups for ``tier``: ``[(group, [(concern, label, one-line description)])]``."""
    groups = []
    for group, concerns in CONCERN_GROUPS:
        rows = []
        for concern in concerns:
            action = CATALOGUE[action_name(concern, tier)]
            text = action.measures
            regional = [r for r in action.regions if r != "whole"]
            if regional and action.scored:
                text += f"; also by region ({', '.join(r.replace('_', ' ') for r in regional)})"
            elif regional:
                text += "; whole face, T-zone and U-zone"
            rows.append((concern, action.label, text))
        groups.append((group, rows))
    return groups


def selected_actions(concerns: Iterable[str], tier: str) -> list[str]:
    """Action names of the chosen concerns in ``tier``, in catalogue order.

    The picker stores concerns (tier-free), so its selection is always of one tier: mixing HD and
    SD cannot be expressed.
    """
    chosen = set(concerns)
    unknown = chosen - set(CONCERNS)
    if unknown:
        raise InvalidParametersError(f"Unknown concern(s): {', '.join(sorted(unknown))}")
    return [action_name(c, tier) for c in CONCERNS if c in chosen]


def units_summary(names: Sequence[str]) -> str:
    """One line: how many concerns and the units per photo (the service's tier table)."""
    if not names:
        return "No concern chosen yet: tick at least one."
    tier = CATALOGUE[names[0]].tier
    n = len(names)
    return (f"{n} concern{'s' if n != 1 else ''} ({tier.upper()}): {estimate_units(names)} units per photo "
            "when the task succeeds")


def cost_summary(names: Sequence[str], n_images: int, backend: str) -> str:
    """The cost of submitting ``n_images`` photos with ``names`` on ``backend``, in words."""
    if not names:
        return "Cost: choose concerns first."
    each = estimate_units(names)
    total = each * n_images
    photos = f"{n_images} photo{'s' if n_images != 1 else ''}"
    if backend == "local":
        return (f"Cost: nothing is billed on the local backend (it counts {each} units per photo, as the "
                f"service would: {photos} = {total} units).")
    return (f"Cost: {each} units per successful photo; {photos} = up to {total} units from your YouCam balance "
            "(photos already in the ledger are reused, not billed again).")


def backend_summary(client) -> str:
    """Which instrument the form uses, in words (plain text)."""
    if getattr(client, "backend", None) == "local":
        from ..client import has_api_key

        why = "chosen for this form; your API key is not used" if has_api_key() else "no API key set"
        return (f"Backend: LOCAL, skinlab's embedded engine at {redact_url(client.base_url)} ({why}). Its scores are "
                "measurements of the pixels, not YouCam scores, and not clinically validated.")
    return (f"Backend: YouCam CLOUD at {redact_url(client.base_url)} ({getattr(client, 'api_version', '')}). Successful "
            "tasks are billed in units.")


# --------------------------------------------------------------------------- images


@dataclass
class UploadEntry:
    """One uploaded file, whatever the ipywidgets version delivered."""

    name: str
    data: bytes


def _as_bytes(content: Any) -> bytes:
    if isinstance(content, memoryview):
        return content.tobytes()
    if isinstance(content, (bytes, bytearray)):
        return bytes(content)
    if hasattr(content, "tobytes"):
        return content.tobytes()
    raise InvalidParametersError(f"Cannot read uploaded content of type {type(content).__name__}")


def upload_entries(value: Any) -> list[UploadEntry]:
    """The files in a ``FileUpload.value``, in the format of ipywidgets 8 or 7.

    * ipywidgets 8: a tuple (or list) of dicts with ``name``, ``type``, ``size``, ``content``
      (a memoryview) and ``last_modified``;
    * ipywidgets 7: a dict ``{file name: {"metadata": {...}, "content": bytes}}``.

    An empty value gives ``[]`` (the widget was just cleared).
    """
    if not value:
        return []
    entries = []
    if isinstance(value, dict):  # ipywidgets 7
        for name, item in value.items():
            if not isinstance(item, dict) or "content" not in item:
                raise InvalidParametersError(f"Unexpected upload value for {name!r}: no 'content'")
            meta = item.get("metadata") or {}
            entries.append(UploadEntry(str(meta.get("name") or name), _as_bytes(item["content"])))
        return entries
    for item in value:  # ipywidgets 8
        if not hasattr(item, "get") or "content" not in item:
            raise InvalidParametersError("Unexpected upload value: an entry has no 'content'")
        entries.append(UploadEntry(str(item.get("name") or "upload"), _as_bytes(item["content"])))
    return entries


def clear_upload(widget) -> None:
    """Drop the uploaded bytes from a FileUpload widget (ipywidgets 8 or 7) so they are not kept
    in the widget state (and so not saved inside the notebook)."""
    empty = {} if isinstance(widget.value, dict) else ()
    for name in ("data", "metadata"):  # ipywidgets 7 keeps the bytes here too
        if widget.has_trait(name):
            setattr(widget, name, [])
    widget.set_trait("value", empty)  # set_trait: ipywidgets 7's value is read-only
    if widget.has_trait("_counter"):
        widget._counter = 0


def upload_limit_text(limit_mb: float = UPLOAD_LIMIT_MB) -> str:
    """What the form says about the upload size limit (plain text).

    ``limit_mb`` is the limit of the server the form runs in; 10 MiB is the default of Jupyter
    Server and Voilà (Tornado's ``websocket_max_message_size``), which the text says together with
    how to raise it.
    """
    return (f"Uploads reach Python through the notebook server's websocket, which accepts at most {limit_mb:g} MiB "
            "per upload (all files picked at once count together; a larger upload is silently dropped). "
            f"{UPLOAD_LIMIT_MB:g} MiB is the default of Jupyter Server (JupyterLab, Notebook 7) and Voilà: Tornado's "
            "websocket_max_message_size setting. To raise it, start the server with, e.g., "
            "--ServerApp.tornado_settings=\"{'websocket_max_message_size': 104857600}\" (100 MiB; "
            "--Voila.tornado_settings for Voilà), and tell the form with upload_limit_mb=100. For larger or many "
            "photos use the path chooser. The service itself accepts photos up to 10 MB, JPEG or PNG.")


def widget_state_text() -> str:
    """What the form says about where the photos go (plain text); the tests hold the form to it."""
    return ("Uploaded photos are read into Python, then their bytes are removed from the upload widget. The "
            "thumbnails below and the result viewer's images (a mask over the photo, the profile plot) are "
            "widget state: Jupyter writes widget state into the notebook file only when \"Save Widget State "
            "Automatically\" (Settings menu) is on. It is off by default; leave it off. clear_images() or "
            "closing the form (close()) empties them.")


@dataclass
class ImageItem:
    """One photo chosen in the form, with its pre-flight verdict."""

    label: str
    kind: str  # upload, path, url, sample
    key: str  # identity within the list (hash of the bytes, the path or the URL)
    data: bytes | None = None
    path: str | None = None
    url: str | None = None
    sample: str | None = None
    thumbnail: bytes | None = None
    ok: bool | None = None  # None: cannot be checked before submission (URL)
    message: str = ""
    changes: list[str] = field(default_factory=list)
    greyscale: bool = False  # no colour: the colour concerns cannot be measured on it

    def source(self):
        """What :func:`skinlab.batch.analyze_many` is given: a path, a URL, or a named file object."""
        if self.kind == "path":
            return self.path
        if self.kind == "url":
            return self.url
        buf = io.BytesIO(self.data or b"")
        buf.name = self.label  # the ledger records it as image_name; it is not sent to the service
        return buf

    @property
    def status(self) -> str:
        return {True: "ready", False: "rejected", None: "unchecked"}[self.ok]


def thumbnail_png(data: bytes, size: int = _THUMB) -> bytes | None:
    """A small PNG preview, upright (EXIF orientation applied); None if the bytes are not an image."""
    from PIL import Image, ImageOps

    from ..images import MAX_PIXELS

    try:
        with warnings.catch_warnings():  # a bomb is judged below, and pre-flight says why it is refused
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        if img.width * img.height > MAX_PIXELS:  # a decompression bomb: never decoded (pre-flight says why)
            return None
        img.draft("RGB", (size * 2, size * 2))  # fast JPEG decoding at reduced size
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        img.thumbnail((size, size))
    except Exception:  # not an image the thumbnailer can read: pre-flight says why
        return None
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def check_item(item: ImageItem, tier: str) -> ImageItem:
    """Run pre-flight on ``item`` for ``tier`` and store the verdict on it (returned)."""
    from ..images import prepare_image

    item.changes = []
    if item.kind == "url":
        item.ok, item.message = None, ("a URL is fetched by the service itself, so it cannot be checked here; "
                                       "it must be a JPEG or PNG face photo")
        return item
    try:
        prep = prepare_image(item.path if item.kind == "path" else item.data, tier=tier)
    except ImageError as exc:
        item.ok, item.message = False, f"the service would reject it: {exc}"
        return item
    item.ok = True
    item.greyscale = prep.greyscale
    item.changes = list(prep.changes)
    fmt = "PNG" if prep.content_type == "image/png" else "JPEG"
    item.message = f"ready: {prep.width}x{prep.height} {fmt}, {prep.size / 1e6:.1f} MB"
    return item


def _key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def item_from_upload(name: str, data: bytes, tier: str) -> ImageItem:
    # the browser may send a Windows path as the name: keep the file name only (both separators)
    item = ImageItem(label=PureWindowsPath(name).name or "upload", kind="upload", key=_key(data), data=data,
                     thumbnail=thumbnail_png(data))
    return check_item(item, tier)


def item_from_path(path: str | os.PathLike, tier: str) -> ImageItem:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageError(f"No such file: {str(p)!r}.")
    resolved = str(p.resolve())
    item = ImageItem(label=p.name, kind="path", key="path:" + resolved, path=resolved)
    try:
        item.thumbnail = thumbnail_png(p.read_bytes())
    except OSError as exc:
        raise ImageError(f"Cannot read {str(p)!r}: {exc.strerror or exc}") from None
    return check_item(item, tier)


def items_from_path(path: str, tier: str, *, limit: int = 500) -> list[ImageItem]:
    """A photo, or every JPEG/PNG in a folder (not recursive), as checked items."""
    text = (path or "").strip()
    if not text:
        raise InvalidParametersError("Type or choose a path first.")
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidParametersError(f"No .jpg, .jpeg or .png files in {str(p)!r}.")
        if len(files) > limit:
            raise InvalidParametersError(f"{str(p)!r} holds {len(files)} photos; the form takes at most {limit} at "
                                         "once. Use skinlab.batch.analyze_many() for large folders.")
        return [item_from_path(f, tier) for f in files]
    if not p.exists():
        raise ImageError(f"No such file or folder: {str(p)!r} (relative paths start at {os.getcwd()!r}).")
    return [item_from_path(p, tier)]


def item_from_url(url: str) -> ImageItem:
    text = (url or "").strip()
    if not text.lower().startswith(("http://", "https://")) or len(text) < 12:
        raise InvalidParametersError(f"Give an http(s) URL of a JPEG or PNG photo, got {text!r}.")
    name = text.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or text
    return check_item(ImageItem(label=name, kind="url", key="url:" + text, url=text), "sd")


@lru_cache(maxsize=8)
def _sample_bytes(name: str, tier: str) -> bytes:
    from ..samples import sample_portrait

    out = io.BytesIO()
    sample_portrait(name, tier).save(out, format="JPEG", quality=95)
    return out.getvalue()


def item_from_sample(name: str, tier: str) -> ImageItem:
    """A bundled public-domain portrait, cropped and sized for ``tier``."""
    data = _sample_bytes(name, tier)
    item = ImageItem(label=f"{name}_{tier}.jpg", kind="sample", key=f"sample:{name}", data=data, sample=name,
                     thumbnail=thumbnail_png(data))
    return check_item(item, tier)


def retier_item(item: ImageItem, tier: str) -> ImageItem:
    """Check ``item`` again for ``tier`` (a sample portrait is regenerated at the tier's size)."""
    if item.kind == "sample":
        fresh = item_from_sample(item.sample, tier)
        item.data, item.label, item.thumbnail = fresh.data, fresh.label, fresh.thumbnail
    return check_item(item, tier)


def list_folder(path: str | os.PathLike | None) -> tuple[Path, list[tuple[str, str]]]:
    """The folder to browse for ``path`` and its entries ``[(label, path)]``: the parent (``..``),
    sub-folders (``name/``) and photos, sorted; hidden entries left out."""
    p = Path(path or os.getcwd()).expanduser()
    if p.is_file():
        p = p.parent
    while not p.is_dir() and p != p.parent:
        p = p.parent
    p = p.resolve()
    entries: list[tuple[str, str]] = []
    if p != p.parent:
        entries.append(("../", str(p.parent)))
    try:
        children = sorted(p.iterdir(), key=lambda c: c.name.lower())
    except OSError:
        children = []
    folders = [c for c in children if not c.name.startswith(".") and c.is_dir()]
    photos = [c for c in children if not c.name.startswith(".") and c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES]
    entries += [(c.name + "/", str(c)) for c in folders[:300]]
    entries += [(c.name, str(c)) for c in photos[:300]]
    return p, entries


# --------------------------------------------------------------------------- submitting


def open_ledger(ledger=None):
    """A :class:`~skinlab.ledger.Ledger` from a Ledger, a path, or None (``skinlab-study/ledger.sqlite``)."""
    from ..ledger import Ledger

    if isinstance(ledger, Ledger):
        return ledger
    return Ledger(DEFAULT_LEDGER if ledger is None else ledger)


def tags_from_fields(subject: str = "", timepoint: str = "", condition: str = "", notes: str = "") -> dict[str, str]:
    """The tags typed in the form (blank fields left out; ``notes`` is a free tag)."""
    fields = {"subject": subject, "timepoint": timepoint, "condition": condition, "notes": notes}
    return {k: v.strip() for k, v in fields.items() if v and v.strip()}


def resolve_action_input(actions) -> list[str]:
    """Action names from a picker (``.selected``), a list of names/concerns or a comma-separated string."""
    if hasattr(actions, "selected"):
        names = list(actions.selected)
    else:
        names = resolve_actions(actions or [])
    return list(validate_actions(names).names) if names else []


def colour_conflict(item: ImageItem, names: Iterable[str]) -> ImageItem | None:
    """``item`` as a rejected copy when it is greyscale and ``names`` hold colour concerns (the
    submission would refuse it), else None."""
    colour = [CATALOGUE[n].label for n in colour_actions(names)]
    if not (item.greyscale and item.ok and colour):
        return None
    return replace(item, ok=False, message=(
        f"a greyscale photo: the colour concerns ticked ({', '.join(colour)}) cannot be measured on it. Untick "
        "them to analyse this photo, or use a colour photo"))


def resolve_image_input(images, names: Iterable[str] = ()) -> tuple[list[Any], list[ImageItem]]:
    """``(sources to submit, items left out)`` from a picker or a list of sources: left out are the
    photos pre-flight rejects, and greyscale photos while colour concerns are among ``names``."""
    if hasattr(images, "items"):
        names = list(names)
        sources, out = [], []
        for item in images.items:
            conflict = colour_conflict(item, names)
            if item.ok is False or conflict is not None:
                out.append(conflict or item)
            else:
                sources.append(item.source())
        return sources, out
    if images is None:
        return [], []
    if isinstance(images, (str, os.PathLike, bytes)):
        return [images], []
    return list(images), []


_OUTCOMES = {
    "pending": "waiting",
    "running": "running: uploading, then analysing",
    "done": "done",
    "reused": "already analysed with these actions: the recorded result is reused, no new task",
    "failed": "failed",
    "skipped": "skipped",
    "interrupted": "not started (stopped)",
    "planned": "planned",
}


def outcome_text(item) -> str:
    """One line for a :class:`~skinlab.batch.BatchItem`."""
    text = _OUTCOMES.get(item.outcome, item.outcome)
    if item.submission_id is not None:
        text += f" (submission #{item.submission_id})"
    if item.outcome in ("failed", "skipped") and item.error:
        text += f": {item.error}"
    return text


class _WarningRouter:
    """Send warnings raised while runs are active (by any thread) to the runs' feedback.

    Reference-counted, so overlapping runs of several forms restore ``warnings.showwarning``
    correctly; outside runs warnings go where they always go.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: list[Callable[[str], None]] = []
        self._saved = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            sink(f"{category.__name__}: {message}")

    def add(self, sink: Callable[[str], None]) -> None:
        with self._lock:
            if not self._sinks:
                self._saved = warnings.showwarning
                warnings.showwarning = self._show
            self._sinks.append(sink)

    def remove(self, sink: Callable[[str], None]) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)
            if not self._sinks and self._saved is not None:
                warnings.showwarning = self._saved
                self._saved = None


_router = _WarningRouter()


class _LogRouter(logging.Handler):
    """Send records of the ``skinlab`` loggers (WARNING and above) emitted while runs are active,
    by any thread, to the runs' sinks, as :class:`_WarningRouter` does for warnings.

    Attached to the ``skinlab`` logger only while a run is active. In a notebook nothing else
    handles these records, so they would go to stderr (logging's last resort). Records of
    ``skinlab.widgets`` are left alone: they concern errors the form shows already.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self._sinks_lock = threading.Lock()
        self._sinks: list[Callable[[int, str], None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "skinlab.widgets" or record.name.startswith("skinlab.widgets."):
            return
        try:
            text = record.getMessage()
        except Exception:  # a bad format string: say what we have
            text = str(record.msg)
        with self._sinks_lock:
            sinks = list(self._sinks)
        for sink in sinks:
            sink(record.levelno, text)

    def add(self, sink: Callable[[int, str], None]) -> None:
        with self._sinks_lock:
            if not self._sinks:
                logging.getLogger("skinlab").addHandler(self)
            self._sinks.append(sink)

    def remove(self, sink: Callable[[int, str], None]) -> None:
        with self._sinks_lock:
            if sink in self._sinks:
                self._sinks.remove(sink)
            if not self._sinks:
                logging.getLogger("skinlab").removeHandler(self)


_log_router = _LogRouter()


class Runner:
    """Runs :func:`skinlab.batch.analyze_many` in one worker thread at a time.

    :meth:`start` returns False (and starts nothing) while a run is going on, so a double click
    never makes two runs. Callbacks are called from the worker thread: ``on_update`` with each
    :class:`~skinlab.batch.BatchItem` as it changes, ``on_warning`` with each warning's text,
    ``on_log`` with ``(level, text)`` of each record of the ``skinlab`` loggers at WARNING or
    above (default: its text to ``on_warning``), then ``on_done`` with the
    :class:`~skinlab.batch.BatchReport`, or ``on_error`` with the exception that stopped the run;
    ``on_finally`` last, always. Warnings and log records are routed only while the run is active.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.report = None
        self.error: BaseException | None = None
        self.runs = 0

    @property
    def running(self) -> bool:
        return self._busy

    def start(self, images, actions, *, ledger, client, tags=None, max_workers: int = 2,
              on_update=None, on_done=None, on_error=None, on_warning=None, on_log=None, on_finally=None,
              **options) -> bool:
        with self._lock:
            if self._busy:
                return False
            self._busy = True
        self.stop_event = threading.Event()
        self.report, self.error = None, None
        self.runs += 1
        self.thread = threading.Thread(
            target=self._work, name=f"skinlab-form-{self.runs}", daemon=True,
            args=(list(images), list(actions)),
            kwargs=dict(ledger=ledger, client=client, tags=tags, max_workers=max_workers, on_update=on_update,
                        on_done=on_done, on_error=on_error, on_warning=on_warning, on_log=on_log,
                        on_finally=on_finally, options=options))
        try:
            self.thread.start()
        except BaseException:
            self._busy = False
            raise
        return True

    def _work(self, images, actions, *, ledger, client, tags, max_workers, on_update, on_done, on_error,
              on_warning, on_log, on_finally, options) -> None:
        from ..batch import analyze_many

        sink = on_warning or (lambda text: None)
        log_sink = on_log or (lambda level, text: sink(text))
        _router.add(sink)
        _log_router.add(log_sink)
        try:
            self.report = analyze_many(images, actions, ledger=ledger, client=client, tags=tags,
                                       max_workers=max_workers, progress=False, on_update=on_update,
                                       stop=self.stop_event, **options)
        except BaseException as exc:  # shown in the form by on_error; the thread must not die silently
            self.error = exc
            _router.remove(sink)
            _log_router.remove(log_sink)
            self._busy = False
            if on_error is not None:
                on_error(exc)
            if on_finally is not None:
                on_finally()
            return
        _router.remove(sink)
        _log_router.remove(log_sink)
        self._busy = False
        if on_done is not None:
            on_done(self.report)
        if on_finally is not None:
            on_finally()

    def stop(self) -> None:
        """Start no new images (tasks already created finish and are recorded)."""
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run; True when no run is going on."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running


# --------------------------------------------------------------------------- submissions


_TABLE_COLUMNS = [("submission_id", "#"), ("created_at", "created (UTC)"), ("status", "status"),
                  ("image_name", "image"), ("subject", "subject"), ("timepoint", "timepoint"),
                  ("condition", "condition"), ("tag_notes", "notes"), ("backend", "backend"), ("tier", "tier"),
                  ("n_actions", "concerns"), ("overall", "overall"), ("units_charged", "units"),
                  ("error_code", "error")]
_TAG_COLUMNS = ("subject", "timepoint", "condition")


def parse_tag_filter(text: str) -> tuple[str | None, str] | None:
    """``"subject=S01"`` -> ``("subject", "S01")``; ``"S01"`` -> ``(None, "S01")``; blank -> None."""
    text = (text or "").strip()
    if not text:
        return None
    if "=" in text:
        key, value = (s.strip() for s in text.split("=", 1))
        if key:
            return key, value
    return None, text


def filter_submissions(ledger, status: str | None = None, tag: str = ""):
    """The ledger's submissions, filtered by status and a tag filter.

    ``tag`` is ``key=value`` (an exact tag value, fixed or free) or a word matched, case-insensitively,
    inside any tag. Newest first.
    """
    frame = ledger.submissions(**({"status": status} if status else {}))
    parsed = parse_tag_filter(tag)
    if parsed is not None and len(frame):
        key, value = parsed
        tag_cols = [c for c in frame.columns if c in _TAG_COLUMNS or str(c).startswith("tag_")]
        if key is not None:
            col = key if key in _TAG_COLUMNS else f"tag_{key}"
            if col not in frame.columns:
                frame = frame.iloc[0:0]
            else:
                frame = frame[frame[col].astype("string").fillna("").str.lower() == value.lower()]
        else:
            needle = value.lower()
            mask = None
            for col in tag_cols:
                hit = frame[col].astype("string").fillna("").str.lower().str.contains(needle, regex=False)
                mask = hit if mask is None else (mask | hit)
            frame = frame[mask] if mask is not None else frame.iloc[0:0]
    return frame.sort_values("submission_id", ascending=False)


def _cell(value: Any, column: str) -> str:
    try:
        import pandas as pd

        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return ""
    except (TypeError, ValueError):
        pass
    if column == "created_at" and hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if column == "overall":
        return f"{float(value):.1f}"
    return str(value)


_STATUS_COLOUR = {"success": "#009E73", "error": "#D55E00", "ambiguous": "#D55E00", "timeout": "#E69F00",
                  "running": "#0072B2", "uploading": "#0072B2", "queued": "#0072B2"}


def submissions_table_html(frame, *, max_rows: int = 50, selected: int | None = None) -> str:
    """The submissions as a compact HTML table (text escaped; newest first)."""
    if not len(frame):
        return "<p class='skinlab-table-empty'><em>No submissions match.</em></p>"
    df = frame.head(max_rows).copy()
    df["n_actions"] = df["actions"].fillna("").map(lambda s: len([a for a in str(s).split(",") if a]))
    cols = [(c, h) for c, h in _TABLE_COLUMNS if c in df.columns]
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{_e(h)}</th>" for _, h in cols)
    rows = []
    for rec in df.to_dict("records"):
        sid = rec.get("submission_id")
        style = "background:#eef5fb;" if selected is not None and sid == selected else ""
        cells = []
        for c, _ in cols:
            text = _e(_cell(rec.get(c), c))
            if c == "status":
                text = f"<span style='color:{_STATUS_COLOUR.get(rec.get(c), '#333')}'>{text}</span>"
            cells.append(f"<td style='padding:2px 8px'>{text}</td>")
        rows.append(f"<tr class='skinlab-row' data-id='{_e(sid)}' style='{style}'>{''.join(cells)}</tr>")
    more = (f"<p style='color:#555;margin:2px 0'>The {max_rows} most recent of {len(frame)} shown.</p>"
            if len(frame) > max_rows else "")
    return (f"<table class='skinlab-table' style='border-collapse:collapse;font-size:12px'><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>{more}")


def submission_options(frame) -> list[tuple[str, int]]:
    """Dropdown options ``(label, submission_id)`` for the rows of ``frame`` (as ordered)."""
    options = []
    for rec in frame.to_dict("records"):
        tags = " ".join(str(rec[c]) for c in _TAG_COLUMNS if c in rec and isinstance(rec[c], str) and rec[c])
        label = f"#{rec['submission_id']} {rec['status']}: {rec.get('image_name') or 'image'}"
        if tags:
            label += f" [{tags}]"
        options.append((label, int(rec["submission_id"])))
    return options


def submission_header_html(sub) -> str:
    """What the result viewer says above the scores of a submission."""
    tags = ", ".join(f"{k}={v}" for k, v in sub.tags.items()) or "none"
    parts = [f"<b>Submission #{sub.id}</b>: {_e(sub.image_name or sub.image_sha256 or 'image')}",
             f"status <b>{_e(sub.status)}</b>, backend {_e(sub.backend)}, tags: {_e(tags)}"]
    if sub.status != "success":
        if sub.error_code or sub.error_message:
            parts.append(f"<span style='color:#D55E00'>{_e(sub.error_code or 'error')}: "
                         f"{_e(sub.error_message or '')}</span>")
        if sub.next_step:
            parts.append(f"Next step: {_e(sub.next_step)}")
        if sub.status in ("queued", "uploading", "running"):
            parts.append("Still in progress; the table refreshes when it finishes.")
    return "<div class='skinlab-viewer-head'>" + "<br>".join(parts) + "</div>"


def mask_options(result) -> list[tuple[str, tuple[str, str] | None]]:
    """Dropdown options for the masks of ``result``: ``(label, (action, region))``, "no mask" first."""
    from ..plots import concern_label, region_label

    order = {name: i for i, name in enumerate(CATALOGUE)}
    keys = sorted(result.mask_names, key=lambda k: (order.get(k[0], 999), k[1] != "whole", k[1]))
    options: list[tuple[str, tuple[str, str] | None]] = [("(no mask: the photo is shown only when asked)", None)]
    for action, region in keys:
        label = concern_label(action) + ("" if region == "whole" else f" ({region_label(region)})")
        options.append((label, (action, region)))
    return options


def _png(img, max_side: int) -> bytes:
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    img = img.copy()
    img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def mask_png(result, action: str, region: str = "whole", *, max_side: int = 420) -> bytes:
    """The mask of ``action``/``region`` drawn over the result's working photo, as a PNG."""
    from ..plots import overlay_mask

    photo = result.resize_image()
    mask = result.mask(action, region)
    if photo is None:
        return _png(mask.convert("RGBA"), max_side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a mask of another size is resized to fit; fine here
        return _png(overlay_mask(photo, mask), max_side)


def profile_png(result, *, dpi: int = 80) -> bytes:
    """The score profile of ``result`` (:func:`skinlab.plots.score_profile`) as a PNG, drawn
    without pyplot so it is safe from any thread and leaves no open figure."""
    from matplotlib.figure import Figure

    from ..plots import score_profile

    n = max(1, len({a for a in result.scores["action"]}))
    fig = Figure(figsize=(6.5, 1.2 + 0.28 * n), layout="constrained")
    ax = fig.add_subplot()
    score_profile(result, ax=ax)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    return out.getvalue()


def is_user_error(exc: BaseException) -> bool:
    """True for errors the form explains to the user (bad input, service answers, environment);
    anything else is a bug in skinlab."""
    return isinstance(exc, (SkinlabError, ImportError, OSError))
