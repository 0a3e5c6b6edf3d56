"""Per-image tags for the experiment ledger: from a CSV sheet or from a file-name pattern.

A *tagger* turns an image (a path, or a name) into a dict of tags. Three keys have a column of
their own in the ledger, ``subject``, ``timepoint`` and ``condition``; any other key is kept as
a free tag (a ``tag_<key>`` column in the ledger's tables). Values are kept as strings.

Two taggers are provided, and any callable ``f(source) -> dict`` works too:

>>> sheet = TagSheet.from_csv("study/tags.csv")          # doctest: +SKIP
>>> sheet("photos/S01_T0.jpg")                            # doctest: +SKIP
{'subject': 'S01', 'timepoint': 'T0', 'condition': 'placebo'}

>>> pattern = FilenamePattern("{subject}_{timepoint}.jpg")
>>> pattern("photos/S01_T0.jpg")
{'subject': 'S01', 'timepoint': 'T0'}

Both raise :class:`TagError`, naming the file, the sheet and the row, when a file has no row,
when two rows name the same file, or when a name does not fit the pattern. Check a whole
folder before submitting anything with :meth:`TagSheet.check` / :meth:`FilenamePattern.check`.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Mapping, Union

from .errors import SkinlabError

__all__ = ["TagError", "TagSheet", "FilenamePattern", "FIXED_TAGS", "split_tags", "tags_for", "Tagger"]

#: Tags with a column of their own in the ledger.
FIXED_TAGS = ("subject", "timepoint", "condition")

#: Column names recognised as the file-name column of a sheet (case-insensitive), in order.
FILENAME_COLUMNS = ("filename", "file_name", "file", "image", "image_name", "photo", "path")

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TagError(SkinlabError, ValueError):
    """A tag sheet or file-name pattern does not fit an image (or is itself malformed)."""


def _norm_key(key: Any) -> str:
    text = str(key).strip()
    if not _KEY.match(text):
        raise TagError(f"Tag name {key!r} is not usable: use letters, digits and underscores, "
                       "starting with a letter (e.g. 'visit', 'site_id').")
    return text.lower() if text.lower() in FIXED_TAGS else text


#: Short forms of the fixed tags; a column or field spelled so is probably meant as one. (Names
#: of other study facts, such as visit or group, are left alone: they are often wanted as well.)
_FIXED_ALIASES = {"subj": "subject", "subject_id": "subject", "subjectid": "subject", "tp": "timepoint",
                  "time_point": "timepoint", "cond": "condition"}


def _near_fixed(name: str) -> str | None:
    """The fixed tag a free tag name looks like a spelling of (``subj`` -> subject), or None."""
    import difflib

    low = name.lower()
    if low in FIXED_TAGS:
        return None
    if low in _FIXED_ALIASES:
        return _FIXED_ALIASES[low]
    # a misspelling, not another word: close and with the same first letter ("subjet", "timepiont";
    # not "object" or "edition")
    close = [c for c in difflib.get_close_matches(low, FIXED_TAGS, n=1, cutoff=0.85) if c[0] == low[:1]]
    return close[0] if close else None


def _warn_near_fixed(names: Iterable[str], where: str) -> None:
    import warnings

    names = list(names)
    present = {n.lower() for n in names}
    for name in names:
        fixed = _near_fixed(name)
        if fixed is not None and fixed not in present:
            warnings.warn(f"{where}: {name!r} is kept as a free tag, not as {fixed}; the fixed tags (subject, "
                          f"timepoint, condition) fill their own columns and group the plots. Rename it to "
                          f"{fixed!r} if that is what it holds.", UserWarning, stacklevel=3)


def split_tags(tags: Mapping[str, Any] | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """Split ``tags`` into the fixed ones (subject, timepoint, condition) and the free ones.

    Values become strings; ``None`` and empty strings are dropped from the free tags.
    """
    fixed: dict[str, str | None] = {k: None for k in FIXED_TAGS}
    free: dict[str, str] = {}
    for key, value in (tags or {}).items():
        name = _norm_key(key)
        text = None if value is None else str(value).strip()
        if text == "":
            text = None
        if name in FIXED_TAGS:
            fixed[name] = text
        elif text is not None:
            free[name] = text
    return fixed, free


def _source_path(source: Any) -> PurePath | None:
    if isinstance(source, PurePath):
        return source
    if isinstance(source, str):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
            from urllib.parse import unquote, urlsplit

            return PurePath(unquote(urlsplit(source).path) or "/")
        return PurePath(source)
    name = getattr(source, "name", None) or getattr(source, "filename", None)
    if isinstance(name, str) and name:
        return PurePath(name)
    return None


Tagger = Union[Mapping[str, Any], Callable[[Any], Mapping[str, Any]]]


def tags_for(tagger: Tagger | None, source: Any) -> dict[str, Any]:
    """The tags of ``source``: ``tagger`` itself if it is a dict, else ``tagger(source)``."""
    if tagger is None:
        return {}
    if isinstance(tagger, Mapping):
        return dict(tagger)
    if callable(tagger):
        return dict(tagger(source) or {})
    raise TagError(f"tags must be a dict, a TagSheet, a FilenamePattern or a function, not {type(tagger).__name__}")


class TagSheet:
    """Tags from a table with one row per image file.

    Parameters
    ----------
    rows : list of dict
        One dict per row; the file-name column is ``key``.
    key : str
        The column holding the file name. Values are matched against the image's base name,
        or, when they contain a ``/``, against the last components of its path.
    origin : str
        Where the rows came from (for messages).
    first_line : int
        The line number of the first row in ``origin`` (for messages; 2 for a CSV with a header).

    Use :meth:`from_csv` or :meth:`from_dataframe` to build one.
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]], *, key: str = "filename", origin: str = "the tag sheet",
                 first_line: int = 1) -> None:
        self.key = key
        self.origin = origin
        self._rows: dict[str, tuple[int, dict[str, Any]]] = {}
        self._folded: dict[str, list[str]] = {}
        problems: list[str] = []
        for i, row in enumerate(rows):
            line = first_line + i
            raw = row.get(key)
            name = "" if raw is None else str(raw).strip().replace("\\", "/")
            if not name:
                if any(str(v or "").strip() for v in row.values()):
                    problems.append(f"row {line} has no {key!r}")
                continue
            tags = {}
            for col, value in row.items():
                if col == key or col is None:
                    continue
                try:
                    tags[_norm_key(col)] = value
                except TagError as exc:
                    raise TagError(f"{origin}: column {col!r}: {exc.message}") from None
            if name in self._rows:
                problems.append(f"rows {self._rows[name][0]} and {line} both name {name!r}")
                continue
            self._rows[name] = (line, tags)
            self._folded.setdefault(name.casefold(), []).append(name)
        if problems:
            raise TagError(f"{origin}: " + "; ".join(problems) + ". Fix the sheet: one row per image file.")
        columns = {_norm_key(c) for _, t in self._rows.values() for c in t}
        _warn_near_fixed(sorted(columns), f"{origin}: column")

    @classmethod
    def from_csv(cls, path: str | os.PathLike, *, key: str | None = None, encoding: str = "utf-8-sig",
                 delimiter: str | None = None) -> "TagSheet":
        """Read a CSV sheet whose header names the columns (delimiter sniffed: , ; or tab).

        ``key`` defaults to the first column named one of :data:`FILENAME_COLUMNS`.
        """
        path = Path(path)
        text = _read_sheet(path, encoding)
        if delimiter is None:
            try:
                delimiter = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t").delimiter
            except csv.Error:
                delimiter = ","
        try:
            reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
            header = reader.fieldnames or []
            if not header:
                raise TagError(f"{path} is empty: a tag sheet needs a header row (e.g. filename,subject,timepoint) "
                               "and one row per image.")
            key = key or _find_key(header, str(path))
            if key not in header:
                raise TagError(f"{path}: no column {key!r}; the columns are {', '.join(header)}")
            rows = list(reader)
        except csv.Error as exc:
            raise TagError(f"{path} cannot be read as CSV ({exc}). Save it from the spreadsheet as CSV.") from None
        return cls(rows, key=key, origin=str(path), first_line=2)

    @classmethod
    def from_dataframe(cls, df, *, key: str | None = None) -> "TagSheet":
        """Use a pandas DataFrame (row numbers in messages are 1-based DataFrame positions)."""
        key = key or _find_key(list(df.columns), "the DataFrame")
        rows = [{str(k): (None if _isna(v) else v) for k, v in rec.items()} for rec in df.to_dict("records")]
        return cls(rows, key=str(key), origin="the DataFrame", first_line=1)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"<TagSheet {len(self)} rows from {self.origin}>"

    def _lookup(self, source: Any) -> tuple[int, dict[str, Any]] | None:
        path = _source_path(source)
        if path is None:
            return None
        parts = [p for p in path.as_posix().split("/") if p]
        for n in range(len(parts), 0, -1):
            cand = "/".join(parts[-n:])
            if cand in self._rows:
                return self._rows[cand]
        for n in range(1, len(parts) + 1):
            hits = self._folded.get("/".join(parts[-n:]).casefold(), [])
            if len(hits) == 1:
                return self._rows[hits[0]]
        return None

    def __call__(self, source: Any) -> dict[str, Any]:
        """The tags of ``source`` (a path or a name); raises :class:`TagError` if it has no row."""
        found = self._lookup(source)
        if found is None:
            path = _source_path(source)
            shown = path.name if path is not None else type(source).__name__
            raise TagError(f"{self.origin} has no row for {shown!r} (column {self.key!r}). Add a row, or pass "
                           "tags= explicitly for this image.")
        return dict(found[1])

    def row_of(self, source: Any) -> int | None:
        """The line number of the row that tags ``source`` (None if none)."""
        found = self._lookup(source)
        return None if found is None else found[0]

    def check(self, sources: Iterable[Any], *, unused: bool = False) -> None:
        """Raise one :class:`TagError` listing every source with no row (and, with ``unused``,
        every row that matches no source)."""
        missing, used = [], set()
        for src in sources:
            found = self._lookup(src)
            if found is None:
                path = _source_path(src)
                missing.append(path.name if path is not None else repr(src))
            else:
                used.add(found[0])
        problems = []
        if missing:
            problems.append(f"no row for {len(missing)} file(s): {', '.join(missing[:20])}"
                            + (" ..." if len(missing) > 20 else ""))
        if unused:
            spare = sorted((line, name) for name, (line, _) in self._rows.items() if line not in used)
            if spare:
                problems.append("rows with no matching file: " + ", ".join(f"row {ln} ({nm!r})" for ln, nm in spare[:20]))
        if problems:
            raise TagError(f"{self.origin}: " + "; ".join(problems))


def _read_sheet(path: Path, encoding: str) -> str:
    """The text of a CSV sheet, or a :class:`TagError` saying why it cannot be one."""
    save_as = "Save it from the spreadsheet as 'CSV UTF-8 (comma delimited)'"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TagError(f"No tag sheet at {str(path)!r}: there is no such file (relative paths start at "
                       f"{os.getcwd()!r}). Check the path.") from None
    except IsADirectoryError:
        raise TagError(f"{str(path)!r} is a folder, not a tag sheet; give the CSV file inside it.") from None
    except OSError as exc:
        raise TagError(f"Cannot read the tag sheet {str(path)!r}: {exc.strerror or exc}.") from None
    if data.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise TagError(f"{str(path)!r} is a spreadsheet workbook (Excel or similar), not a CSV file. {save_as}, "
                       "or in Python pass pandas.read_excel(...) to TagSheet.from_dataframe().")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) and encoding.lower().replace("_", "-") in ("utf-8-sig", "utf-8"):
        encoding = "utf-16"  # Excel's "Unicode text": a byte-order mark says so
    elif b"\x00" in data[:65536]:
        raise TagError(f"{str(path)!r} is a binary file, not a CSV text file. {save_as}.")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TagError(f"{str(path)!r} is not {encoding.upper().replace('-SIG', '')} text (byte "
                       f"0x{data[exc.start]:02x} on line {line} is not valid). {save_as}, or in Python "
                       "pass encoding= (e.g. 'cp1252').") from None
    except LookupError:
        raise TagError(f"Unknown text encoding {encoding!r}; use e.g. 'utf-8-sig' or 'cp1252'.") from None


def _find_key(header: list, origin: str) -> str:
    lowered = {str(h).strip().lower(): h for h in header}
    for cand in FILENAME_COLUMNS:
        if cand in lowered:
            return lowered[cand]
    raise TagError(f"{origin}: no file-name column; name one of {', '.join(FILENAME_COLUMNS)} "
                   f"or pass key=. The columns are {', '.join(map(str, header))}.")


def _isna(value: Any) -> bool:
    try:
        return value != value  # NaN
    except Exception:  # pragma: no cover
        return False


class FilenamePattern:
    """Tags parsed from the file name, e.g. ``FilenamePattern("{subject}_{timepoint}.jpg")``.

    Each ``{name}`` matches one or more characters other than ``/`` (as few as possible, so
    ``{subject}_{timepoint}`` splits at the first ``_`` that lets the rest match); ``{name:regex}``
    gives the field its own regular expression, and ``*`` matches anything. The pattern is matched
    against the base name, or, when it contains a ``/``, against the last components of the path.
    A pattern that does not end in an extension (``{subject}_{timepoint}``) is matched against the
    name without its extension (the stem), so ``S01_T0.jpg`` gives timepoint ``T0``. Matching is
    case-sensitive except for the extension.

    Two fields side by side with nothing between them (``{subject}{timepoint}.jpg``) are refused:
    nothing says where one ends. Put the separator the names use between them, or give the first
    one its own regular expression (``{subject:S[0-9]+}{timepoint}.jpg``).
    """

    _FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::((?:[^{}]|\{[^{}]*\})+))?\}")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.depth = pattern.count("/") + 1
        # the pattern as a sequence of (kind, regex, shown, own regex): kind is "field", "text" or "ext"
        parts: list[tuple[str, str, str, str | None]] = []
        pos, names = 0, []
        for m in self._FIELD.finditer(pattern):
            text = pattern[pos:m.start()]
            if text:
                parts.append(("text", self._literal(text), text, None))
            name = _norm_key(m.group(1))
            if name in names:
                raise TagError(f"pattern {pattern!r} names {{{name}}} twice")
            own = m.group(2)
            # what comes just before this field when nothing but '*' separates them (None otherwise)
            if not text:
                touching = parts[-1] if parts else None
            elif not text.strip("*"):
                touching = parts[-2] if len(parts) > 1 else None
            else:
                touching = None
            if own is None and touching is not None and touching[0] == "field" and touching[3] is None:
                first = touching[2]
                fixed = pattern[:m.start() - len(text)] + "_" + pattern[m.start():]
                raise TagError(
                    f"pattern {pattern!r} puts {first} and {{{name}}} side by side with no separator, so nothing "
                    f"says where one ends: {first} would get a single character and {{{name}}} the rest (e.g. S01_T0 "
                    f"would split into 'S' and '01_T0'). Put the separator the file names use between them, e.g. "
                    f"{fixed!r}, or give {first} its own regular expression, e.g. "
                    f"'{{{first[1:-1]}:S[0-9]+}}'.")
            names.append(name)
            parts.append(("field", f"(?P<{name}>{own or '[^/]+?'})", m.group(0) if own else f"{{{name}}}", own))
            pos = m.end()
        tail = pattern[pos:]
        ext = re.search(r"(\.[A-Za-z0-9]+)$", tail)
        if ext:
            if tail[:ext.start()]:
                parts.append(("text", self._literal(tail[:ext.start()]), tail[:ext.start()], None))
            parts.append(("ext", "(?i:" + re.escape(ext.group(1)) + ")", ext.group(1), None))
        elif tail:
            parts.append(("text", self._literal(tail), tail, None))
        if not names:
            raise TagError(f"pattern {pattern!r} has no {{field}}; write e.g. '{{subject}}_{{timepoint}}.jpg'")
        self.fields = tuple(names)
        _warn_near_fixed(names, f"pattern {pattern!r}: field")
        self.has_extension = bool(ext)
        self._parts = parts
        self._regex = re.compile("".join(p[1] for p in parts) + r"\Z")

    @staticmethod
    def _literal(text: str) -> str:
        if "{" in text or "}" in text:
            raise TagError(f"unbalanced brace in pattern text {text!r}")
        return ".*?".join(re.escape(part) for part in text.split("*"))

    def __repr__(self) -> str:
        return f"FilenamePattern({self.pattern!r})"

    def _targets(self, source: Any) -> list[str]:
        """What the pattern is matched against: the last components of the path, without the
        extension first when the pattern has none (then with it, as before)."""
        path = _source_path(source)
        if path is None:
            return []
        parts = [p for p in path.as_posix().split("/") if p][-self.depth:]
        if not parts:
            return []
        full = "/".join(parts)
        if self.has_extension:
            return [full]
        stem = "/".join(parts[:-1] + [PurePath(parts[-1]).stem])
        return [stem, full] if stem != full else [full]

    def match(self, source: Any) -> dict[str, str] | None:
        """The fields of ``source``, or None when it does not fit."""
        for target in self._targets(source):
            m = self._regex.match(target)
            if m:
                return dict(m.groupdict())
        return None

    def why_not(self, source: Any) -> str | None:
        """Why ``source`` does not fit, in words (None when it fits): the first thing the pattern
        needs that the name lacks."""
        if self.match(source) is not None:
            return None
        targets = self._targets(source)
        if not targets:
            return f"{type(source).__name__} has no file name to match"
        name, regex = targets[0], ""
        for i, (kind, part, shown, own) in enumerate(self._parts):
            regex += part
            if re.match(regex, name) is None:
                prev = self._parts[i - 1] if i else None
                where = ("at the start" if prev is None else
                         f"right after {prev[2]}" if prev[0] == "field" and prev[3] is not None else
                         f"after {prev[2]}" if prev[0] == "field" else f"after {prev[2]!r}")
                if kind == "ext" and not name.lower().endswith(shown.lower()):
                    return f"the pattern needs the name to end in {shown!r} (any case), and {name!r} does not"
                if kind in ("text", "ext"):
                    return f"the pattern needs {shown!r} {where}, and {name!r} has none there"
                if own is not None:
                    return f"the pattern needs text matching {shown} {where}, and {name!r} has none"
                return f"{name!r} ends before {shown}"
        kind, _, shown, own = self._parts[-1]
        if kind == "ext":
            return f"the pattern needs the name to end in {shown!r} (any case), and {name!r} does not"
        if kind == "text":
            return f"the pattern needs the name to end with {shown!r}, and {name!r} does not"
        if own is not None:
            return f"the end of {name!r} does not match {shown}"
        return f"{name!r} goes on past what the pattern describes"

    def __call__(self, source: Any) -> dict[str, str]:
        found = self.match(source)
        if found is None:
            path = _source_path(source)
            shown = path.name if path is not None else type(source).__name__
            raise TagError(f"{shown!r} does not fit the file-name pattern {self.pattern!r}: {self.why_not(source)}. "
                           "Rename the file, fix the pattern, or pass tags= explicitly for this image.")
        return found

    def check(self, sources: Iterable[Any]) -> None:
        """Raise one :class:`TagError` listing every source that does not fit, and saying why the
        first one does not."""
        bad, first = [], None
        for src in sources:
            if self.match(src) is None:
                path = _source_path(src)
                bad.append(path.name if path is not None else repr(src))
                first = src if first is None else first
        if bad:
            raise TagError(f"{len(bad)} file(s) do not fit {self.pattern!r}: {', '.join(bad[:20])}"
                           + (" ..." if len(bad) > 20 else "")
                           + f". For example, {self.why_not(first)}. Rename the files or change the pattern.")
