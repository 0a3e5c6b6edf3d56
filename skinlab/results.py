"""Analysis results: the service's JSON or ZIP output as tidy scores and aligned masks.

:class:`AnalysisResult` reads either output format (contract §6 and §7) and tolerates every
quirk of §9.2: arbitrary order, repeated ``type`` keyed by ``(type, region)``, a missing
``region`` meaning ``whole``, integer or float scores, missing ``all``/``skin_age``/
``resize_image``, ``results`` as an object or a bare URL string, and the three shapes of
``score_info.json``.

ZIP archives are read in memory and never extracted by their own names: entries with absolute
paths, ``..`` components or backslashes are rejected, and sizes are capped.
"""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .actions import CATALOGUE
from .errors import ResultFormatError

__all__ = ["AnalysisResult", "ScoreEntry", "SCORE_COLUMNS", "read_zip", "parse_json_output", "parse_score_info"]

#: Columns of :attr:`AnalysisResult.scores`, in order.
SCORE_COLUMNS = ["action", "concern", "region", "raw_score", "ui_score", "skin_type", "backend", "engine"]

MAX_ZIP_BYTES = 200 * 1024 * 1024
MAX_ZIP_ENTRIES = 200
MAX_ENTRY_BYTES = 64 * 1024 * 1024
MAX_JSON_BYTES = 8 * 1024 * 1024


@dataclass
class ScoreEntry:
    """One (action, region) score; ``skin_type`` set instead of scores for skin type."""

    action: str
    region: str = "whole"
    raw_score: float | None = None
    ui_score: int | None = None
    skin_type: str | None = None
    mask: str | None = None  # a mask URL (json) or a ZIP entry name (zip)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    n = _num(value)
    return None if n is None else int(round(n))


def parse_json_output(output: Any) -> tuple[list[ScoreEntry], dict[str, Any]]:
    """Parse ``results.output`` of a ``format=json`` result.

    Returns the score entries and the extras: ``all`` (float), ``skin_age`` (int) and
    ``resize_image`` (URL), each only if present.
    """
    if not isinstance(output, list):
        raise ResultFormatError("results.output is not a list")
    entries: list[ScoreEntry] = []
    extras: dict[str, Any] = {}
    for item in output:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            continue
        kind = item["type"]
        urls = item.get("mask_urls") or []
        url = urls[0] if isinstance(urls, list) and urls else None
        if kind == "all":
            extras["all"] = _num(item.get("score"))
        elif kind == "skin_age":
            extras["skin_age"] = _int(item.get("score"))
        elif kind == "resize_image":
            extras["resize_image"] = url
        else:
            region = item.get("region") or "whole"
            entries.append(ScoreEntry(action=kind, region=str(region), raw_score=_num(item.get("raw_score")),
                                      ui_score=_int(item.get("ui_score")),
                                      skin_type=item.get("skin_type") if isinstance(item.get("skin_type"), str) else None,
                                      mask=url))
    return entries, extras


def parse_score_info(info: Any) -> tuple[list[ScoreEntry], dict[str, Any]]:
    """Parse ``score_info.json`` in its flat, nested-by-region and categorical shapes (§7.3)."""
    if not isinstance(info, dict):
        raise ResultFormatError("score_info.json is not a JSON object")
    entries: list[ScoreEntry] = []
    extras: dict[str, Any] = {}
    for key, value in info.items():
        if key == "all":
            extras["all"] = _num(value.get("score") if isinstance(value, dict) else value)
        elif key == "skin_age":
            extras["skin_age"] = _int(value.get("score") if isinstance(value, dict) else value)
        elif key == "resize_image":
            extras["resize_image"] = value.get("image_name") if isinstance(value, dict) else value
        elif isinstance(value, dict):
            if any(k in value for k in ("raw_score", "ui_score", "skin_type", "output_mask_name")):
                regions = {"whole": value}
            else:
                regions = {r: v for r, v in value.items() if isinstance(v, dict)}
            for region, v in regions.items():
                entries.append(ScoreEntry(action=key, region=str(region), raw_score=_num(v.get("raw_score")),
                                          ui_score=_int(v.get("ui_score")),
                                          skin_type=v.get("skin_type") if isinstance(v.get("skin_type"), str) else None,
                                          mask=v.get("output_mask_name")))
    return entries, extras


def _safe_entry_name(name: str) -> str:
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        raise ResultFormatError(f"Unsafe path in the result ZIP: {name!r}; the archive was rejected.")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ResultFormatError(f"Path traversal in the result ZIP: {name!r}; the archive was rejected.")
    return "/".join(parts)


def read_zip(data: bytes) -> dict[str, bytes]:
    """Read a result ZIP safely into ``{basename: bytes}``.

    Raises
    ------
    ResultFormatError
        When the body is not a ZIP (an HTML error page, say), is truncated, or has unsafe,
        duplicate, too many or too large entries.
    """
    if not data.startswith(b"PK"):
        head = data[:80].decode("utf-8", "replace").strip()
        raise ResultFormatError(f"Expected a ZIP archive but got {len(data)} bytes starting {head!r}. "
                                "The result URL may have expired (poll the task again for a fresh one).")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise ResultFormatError(f"The result ZIP is damaged or truncated ({exc}); download it again.") from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise ResultFormatError(f"The result ZIP has {len(infos)} entries (limit {MAX_ZIP_ENTRIES}).")
    total = 0
    files: dict[str, bytes] = {}
    for info in infos:
        name = _safe_entry_name(info.filename)
        if info.is_dir() or not name:
            continue
        if info.file_size > MAX_ENTRY_BYTES:
            raise ResultFormatError(f"ZIP entry {name!r} declares {info.file_size} bytes (limit {MAX_ENTRY_BYTES}).")
        total += info.file_size
        if total > MAX_ZIP_BYTES:
            raise ResultFormatError(f"The result ZIP expands beyond {MAX_ZIP_BYTES} bytes; rejected as a ZIP bomb.")
        try:
            with zf.open(info) as fh:
                content = fh.read(MAX_ENTRY_BYTES + 1)
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as exc:
            raise ResultFormatError(f"Cannot read ZIP entry {name!r} ({exc}); the archive is damaged.") from None
        if len(content) > MAX_ENTRY_BYTES or len(content) != info.file_size:
            raise ResultFormatError(f"ZIP entry {name!r} does not match its declared size; rejected.")
        base = posixpath.basename(name)
        if base in files:
            raise ResultFormatError(f"Duplicate entry {base!r} in the result ZIP.")
        files[base] = content
    return files


class AnalysisResult:
    """The outcome of one successful task.

    Attributes
    ----------
    task_id : str or None
    format : {"zip", "json"}
    tier : {"hd", "sd"} or None
    backend : {"cloud", "local"}
        Which instrument measured: the YouCam service, or skinlab's local engine. Scores from the
        two are not comparable.
    engine : str or None
        The engine version string (the local engine's version and face backend, or the cloud
        API version).
    entries : list of ScoreEntry
    overall : float or None
        The ``all`` score (mean of the ui scores), when present.
    skin_age : int or None
    """

    def __init__(self, entries: list[ScoreEntry], extras: Mapping[str, Any], *, format: str,
                 task_id: str | None = None, backend: str = "cloud", engine: str | None = None,
                 api_version: str | None = None, files: Mapping[str, bytes] | None = None,
                 fetch: Callable[[str], bytes] | None = None, source: Mapping[str, Any] | None = None) -> None:
        self.entries = entries
        self.overall = extras.get("all")
        self.skin_age = extras.get("skin_age")
        self._resize_ref = extras.get("resize_image")
        self.format = format
        self.task_id = task_id
        self.backend = backend
        self.engine = engine
        self.api_version = api_version
        self.source = dict(source or {})
        self._files = dict(files or {})
        self._fetch = fetch
        tiers = {CATALOGUE[e.action].tier for e in entries if e.action in CATALOGUE}
        self.tier = tiers.pop() if len(tiers) == 1 else None

    # ---- construction

    @classmethod
    def from_status(cls, status, *, task=None) -> "AnalysisResult":
        """Build from a successful poll (:class:`~skinlab.client.TaskStatus`)."""
        results = status.results
        meta = dict(task_id=getattr(task, "task_id", None), backend=status.backend, engine=status.engine,
                    api_version=getattr(task, "api_version", None), source=getattr(task, "source", None))
        client = getattr(task, "client", None)
        fetch = client.refreshing_download(task) if client is not None else None
        if isinstance(results, dict) and "output" in results:
            entries, extras = parse_json_output(results["output"])
            return cls(entries, extras, format="json", fetch=fetch, **meta)
        url = results.get("url") if isinstance(results, dict) else results
        if not isinstance(url, str) or not url:
            raise ResultFormatError(f"The success answer has neither results.output nor a ZIP URL: {results!r:.200}")
        if fetch is None:
            raise ResultFormatError("A ZIP result needs a client to download it.")
        return cls.from_zip(fetch(url), **meta)

    @classmethod
    def from_zip(cls, data: bytes, **meta) -> "AnalysisResult":
        """Build from the bytes of a result ZIP (§7)."""
        files = read_zip(data)
        if "score_info.json" not in files:
            raise ResultFormatError("The result ZIP has no score_info.json.")
        if len(files["score_info.json"]) > MAX_JSON_BYTES:
            raise ResultFormatError("score_info.json is larger than 8 MB; rejected.")
        try:
            info = json.loads(files["score_info.json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ResultFormatError(f"score_info.json is not valid JSON ({exc}).") from None
        entries, extras = parse_score_info(info)
        if "resize_image" not in extras and "resize_image.jpg" in files:
            extras["resize_image"] = "resize_image.jpg"
        return cls(entries, extras, format="zip", files=files, **meta)

    @classmethod
    def from_json(cls, body: Any, **meta) -> "AnalysisResult":
        """Build from a poll body (or its ``data``, or ``results``) of a ``format=json`` task."""
        if isinstance(body, dict) and "data" in body:
            body = body["data"]
        if isinstance(body, dict) and "results" in body:
            body = body["results"]
        if not isinstance(body, dict) or "output" not in body:
            raise ResultFormatError("No results.output in this JSON result.")
        entries, extras = parse_json_output(body["output"])
        return cls(entries, extras, format="json", **meta)

    # ---- tables

    @property
    def scores(self):
        """One tidy DataFrame: a row per action x region, in catalogue order.

        Columns (see :data:`SCORE_COLUMNS`): action, concern, region, raw_score, ui_score,
        skin_type, and backend and engine on every row, so local-engine and cloud scores are never
        pooled unnoticed.
        """
        import pandas as pd

        order = {name: i for i, name in enumerate(CATALOGUE)}

        def key(e: ScoreEntry):
            action = CATALOGUE.get(e.action)
            region_i = action.regions.index(e.region) if action and e.region in action.regions else 99
            return (order.get(e.action, 999), region_i, e.region)

        rows = [{"action": e.action, "concern": CATALOGUE[e.action].concern if e.action in CATALOGUE else e.action,
                 "region": e.region, "raw_score": e.raw_score, "ui_score": e.ui_score, "skin_type": e.skin_type,
                 "backend": self.backend, "engine": self.engine}
                for e in sorted(self.entries, key=key)]
        df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
        df["raw_score"] = df["raw_score"].astype("float64")
        df["ui_score"] = df["ui_score"].astype("Int64")
        df["skin_type"] = df["skin_type"].astype("object")
        df.attrs.update(backend=self.backend, engine=self.engine, task_id=self.task_id)
        return df

    @property
    def skin_types(self) -> dict[str, str]:
        """Skin type per region (``whole``, ``t_zone``, ``u_zone``), if requested."""
        return {e.region: e.skin_type for e in self.entries if e.skin_type}

    def score(self, action: str, region: str = "whole") -> float | None:
        """The raw score of one action and region (concern keys such as ``"wrinkle"`` work too)."""
        for e in self.entries:
            if (e.action == action or CATALOGUE.get(e.action) and CATALOGUE[e.action].concern == action) \
                    and e.region == region:
                return e.raw_score
        raise KeyError(f"No score for {action!r} / {region!r}; available: "
                       f"{sorted({(e.action, e.region) for e in self.entries})}")

    # ---- images

    def _bytes(self, ref: str | None) -> bytes | None:
        if not ref:
            return None
        if ref in self._files:
            return self._files[ref]
        base = posixpath.basename(ref.split("?")[0])
        if base in self._files:
            return self._files[base]
        if self._fetch is None or not ref.startswith(("http://", "https://")):
            return None
        data = self._fetch(ref)
        self._files[base] = data
        return data

    @property
    def mask_names(self) -> dict[tuple[str, str], str]:
        """``{(action, region): file name}`` for every mask."""
        return {(e.action, e.region): posixpath.basename(e.mask.split("?")[0]) for e in self.entries if e.mask}

    def mask(self, action: str, region: str = "whole"):
        """The mask of ``action``/``region`` as a PIL image (RGBA, or RGB with the overlay),
        aligned with :meth:`resize_image`."""
        for e in self.entries:
            if e.action == action and e.region == region:
                data = self._bytes(e.mask)
                if data is None:
                    raise ResultFormatError(f"The mask of {action}/{region} ({e.mask}) is not in the result.")
                return _open_image(_checked_image(data, f"the mask of {action}/{region}"))
        raise KeyError(f"No mask for {action!r} / {region!r}")

    @property
    def masks(self) -> dict[tuple[str, str], Any]:
        """All masks as ``{(action, region): PIL image}`` (downloads them for JSON results)."""
        return {k: self.mask(*k) for k in self.mask_names}

    def resize_image(self):
        """The service's working copy of the photo; every mask is aligned with it. None if absent.

        Deliberately a method, not shown in reprs, so a notebook never fills with faces by accident.
        """
        data = self._bytes(self._resize_ref)
        if data is None:
            return None
        return _open_image(_checked_image(data, "resize_image"))

    # ---- output

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "format": self.format, "tier": self.tier, "backend": self.backend,
                "engine": self.engine, "api_version": self.api_version, "overall": self.overall,
                "skin_age": self.skin_age,
                "scores": [{"action": e.action, "region": e.region, "raw_score": e.raw_score,
                            "ui_score": e.ui_score, "skin_type": e.skin_type,
                            "mask": self.mask_names.get((e.action, e.region))} for e in self.entries]}

    def save(self, folder: str | Path, *, masks: bool = True, image: bool = True) -> Path:
        """Write ``scores.csv``, ``result.json`` and (optionally) the masks and resize_image.

        File names inside ``folder`` come from the catalogue's sanitised base names, never from
        paths inside a downloaded archive. Returns the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.scores.to_csv(folder / "scores.csv", index=False)
        (folder / "result.json").write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        if masks:
            for (action, region), name in self.mask_names.items():
                data = self._bytes(next(e.mask for e in self.entries if e.action == action and e.region == region))
                if data is not None:
                    (folder / _safe_local_name(name)).write_bytes(_checked_image(data, f"mask {name}"))
        if image:
            data = self._bytes(self._resize_ref)
            if data is not None:
                (folder / "resize_image.jpg").write_bytes(_checked_image(data, "resize_image"))
        return folder

    def __repr__(self) -> str:
        n = len({e.action for e in self.entries})
        overall = f", overall {self.overall:.1f}" if self.overall is not None else ""
        return (f"<AnalysisResult {self.tier or '?'} {n} concerns{overall}, backend={self.backend}, "
                f"engine={self.engine}>")

    def _repr_html_(self) -> str | None:
        from .display import repr_html  # status, backend, engine, score table; never an image

        return repr_html(self)


def _checked_image(data: bytes, what: str) -> bytes:
    """``data`` if it is a PNG or JPEG, else a ResultFormatError saying what arrived instead."""
    from .images import sniff_format

    fmt = sniff_format(data)
    if fmt not in ("png", "jpeg"):
        head = bytes(data[:60]).decode("utf-8", "replace").strip()
        raise ResultFormatError(f"{what} should be a PNG or JPEG image but is {len(data)} bytes starting {head!r} "
                                "(an error page?). The result URL may have expired: poll the task again.")
    return data


def _open_image(data: bytes):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise ResultFormatError(f"A result image cannot be decoded ({type(exc).__name__}: {exc}); it is damaged or "
                                "truncated. Poll the task again to download it afresh.") from None
    return img


def _safe_local_name(name: str) -> str:
    base = posixpath.basename(name.replace("\\", "/"))
    cleaned = "".join(c for c in base if c.isalnum() or c in "._-")
    if not cleaned or cleaned.startswith("."):
        raise ResultFormatError(f"Unsafe mask file name {name!r}")
    return cleaned
