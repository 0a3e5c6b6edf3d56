"""Figures of skin-analysis results: look instead of read.

Every function returns a :class:`matplotlib.figure.Figure` (never calls ``plt.show()``),
labels concerns as people say them ("Dark circles", not ``dark_circle_v2``), uses the
Okabe-Ito colour-blind-safe palette, and notes the backend and engine on the figure, because
scores of skinlab's local engine and of the YouCam cloud are different instruments.

========================  ==========================================================  =========
function                  shows                                                       input
========================  ==========================================================  =========
:func:`score_profile`     one bar per concern (ui or raw score), regions optional      one result
:func:`mask_overlay`      each concern's mask over the photo, one panel per concern    one result
:func:`before_after`      two results side by side and the change per concern          two results
:func:`cohort`            score distributions per concern, grouped by a tag            tidy table
:func:`time_course`       one line per subject over time, and the mean per group       tidy table
:func:`save_figure`       PNG / SVG / PDF at a chosen dpi, fonts kept as text
========================  ==========================================================  =========

"One result" is an :class:`~skinlab.results.AnalysisResult` or its ``scores`` table (a tidy
DataFrame with the rows of one submission). The cohort and time-course plots take a tidy
DataFrame with one row per submission x action x region, such as ``ledger.scores()``; the
columns each one needs are listed in its docstring and a missing one is named in the error.
Extra columns are ignored.

Local-engine and cloud scores are never drawn in one series: a table or pair of results with
more than one ``backend`` raises :class:`MixedBackendsError` unless ``allow_mixed=True``.
:func:`score_profile` also refuses a table that holds a concern (action and region) twice
without a ``submission_id`` to tell the submissions apart.

Faces appear only here, when a plot is asked for: :func:`mask_overlay` draws the photo;
no other function does, and no repr shows an image.

matplotlib is imported inside the functions, so ``import skinlab`` stays fast. Figures are
built with :class:`matplotlib.figure.Figure`, not pyplot: they are not kept in pyplot's list of
open figures (nothing to close, safe from any thread), and in Jupyter a figure is shown once, as
the value of the cell. So do not end the line with ``;`` (that hides it); assign the figure and
``display(fig)`` it later, or pass ``ax=`` from ``plt.subplots()`` to draw into pyplot figures
(needed for interactive backends such as ipympl).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .actions import CATALOGUE, CONCERNS

__all__ = [
    "OKABE_ITO",
    "MixedBackendsError",
    "before_after",
    "cohort",
    "mask_overlay",
    "overlay_mask",
    "save_figure",
    "score_profile",
    "time_course",
]

#: The Okabe-Ito palette (Okabe & Ito 2008), safe for the common colour-vision deficiencies.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

#: Colours for groups and series, in order (black last: it is kept for means and references).
SERIES_COLORS: tuple[str, ...] = tuple(OKABE_ITO[k] for k in (
    "blue", "orange", "bluish_green", "reddish_purple", "sky_blue", "vermillion", "yellow", "black"))

#: Colours for masks, in order: those that stand out on skin first.
MASK_COLORS: tuple[str, ...] = tuple(OKABE_ITO[k] for k in (
    "blue", "bluish_green", "reddish_purple", "sky_blue", "vermillion", "orange", "yellow", "black"))

_BEFORE, _AFTER = OKABE_ITO["sky_blue"], OKABE_ITO["orange"]
_BETTER, _WORSE = OKABE_ITO["bluish_green"], OKABE_ITO["vermillion"]
_WHOLE, _REGION = OKABE_ITO["blue"], OKABE_ITO["sky_blue"]
_NOTE = "0.35"

_REGION_LABELS = {
    "whole": "whole face", "forehead": "forehead", "glabellar": "glabella (frown lines)",
    "crowfeet": "crow's feet", "periocular": "around the eyes", "nasolabial": "nasolabial folds",
    "marionette": "marionette lines", "nose": "nose", "cheek": "cheeks", "t_zone": "T-zone",
    "u_zone": "U-zone",
}

_SCORE_TEXT = {
    "ui_score": "ui_score (1-99, higher = healthier skin)",
    "raw_score": "raw_score (1-100, higher = healthier skin)",
}


from .errors import MixedBackendsError  # noqa: E402 - one class for the ledger and the plots


# ----------------------------------------------------------------------------- helpers


def _mpl():
    """Import matplotlib's Figure on first use (never pyplot), with an install hint if it is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a test dependency
        raise ImportError("skinlab.plots needs matplotlib: pip install 'skinlab[notebook]'") from exc
    return Figure, FigureCanvasAgg


def _score_col(score: str) -> str:
    col = {"ui": "ui_score", "ui_score": "ui_score", "raw": "raw_score", "raw_score": "raw_score"}.get(score)
    if col is None:
        raise ValueError(f"score must be 'ui' or 'raw', got {score!r}")
    return col


def concern_label(name: str, *, tier_suffix: bool = False) -> str:
    """The concern as people say it, from an action name (``"dark_circle_v2"``), a concern key
    (``"dark_circle"``) or a label; unknown names are tidied (``"my_thing"`` -> ``"My thing"``)."""
    action = CATALOGUE.get(name)
    if action is None and name in CONCERNS:
        action = next(a for a in CATALOGUE.values() if a.concern == name)
    if action is None:
        text = str(name).replace("_", " ").strip()
        return text[:1].upper() + text[1:]
    return action.label + (" (HD)" if tier_suffix and action.tier == "hd" else "")


def region_label(region: str) -> str:
    """A region as people say it (``"crowfeet"`` -> ``"crow's feet"``)."""
    return _REGION_LABELS.get(region, str(region).replace("_", " "))


def _as_scores(obj: Any, what: str):
    """The tidy scores table of a result (or a copy of a given table)."""
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        return obj.copy()
    scores = getattr(obj, "scores", None)
    if isinstance(scores, pd.DataFrame):
        return scores
    raise TypeError(f"{what} must be an AnalysisResult or a tidy scores DataFrame, not {type(obj).__name__}")


def _require(df, columns: Iterable[str], func: str, *, hint: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{func}() needs the column(s) {', '.join(map(repr, missing))}, which the table lacks. "
            f"It has: {', '.join(map(str, df.columns)) or 'no columns'}.{(' ' + hint) if hint else ''}")


def _key_column(df, func: str) -> str:
    """``action`` when present (it tells HD from SD), else ``concern``."""
    for col in ("action", "concern"):
        if col in df.columns:
            return col
    _require(df, ["action"], func, hint="A 'concern' column works too.")
    raise AssertionError  # pragma: no cover


def _check_backends(df, *, allow_mixed: bool, func: str, exempt: bool = False) -> list[str]:
    """Raise unless all rows come from one backend; return the backends (and warn on engines)."""
    if "backend" not in df.columns:
        if allow_mixed:
            return []
        raise ValueError(f"{func}() needs a 'backend' column to keep local-engine and cloud scores apart "
                         f"(it has: {', '.join(map(str, df.columns))}). Add it, or pass allow_mixed=True "
                         "if you know the rows come from one instrument.")
    counts = df["backend"].fillna("unknown").astype(str).value_counts()
    backends = sorted(counts.index)
    if len(backends) > 1 and not (allow_mixed or exempt):
        listed = ", ".join(f"{b} ({counts[b]} rows)" for b in backends)
        raise MixedBackendsError(
            f"{func}(): these scores come from more than one backend: {listed}. skinlab's local engine and "
            "the YouCam cloud service measure differently, so their scores must not share a series. Plot "
            "one backend at a time (e.g. df[df['backend'] == 'local']), group by it (by='backend' in "
            "cohort()), or pass allow_mixed=True to pool them anyway.")
    if "engine" in df.columns and len(backends) == 1:
        engines = sorted(df["engine"].dropna().astype(str).unique())
        if len(engines) > 1:
            warnings.warn(f"{func}(): the scores come from {len(engines)} engine versions "
                          f"({'; '.join(engines)}); scores may shift between versions.", UserWarning, stacklevel=3)
    return backends


def _instrument_note(df, extra: str = "") -> str:
    parts = []
    if "backend" in df.columns:
        for backend in sorted(df["backend"].dropna().astype(str).unique()):
            engines = []
            if "engine" in df.columns:
                engines = sorted(df.loc[df["backend"] == backend, "engine"].dropna().astype(str).unique())
            name = {"local": "local engine (not YouCam scores)", "cloud": "YouCam cloud"}.get(backend, backend)
            parts.append(name + (f" - {', '.join(engines)}" if engines else ""))
    note = "Backend: " + " | ".join(parts) if parts else "Backend: not recorded"
    return note + (f"\n{extra}" if extra else "")


def _wrap_note(note: str, inches: float, per_inch: float = 13.0) -> str:
    """The instrument note wrapped to about ``inches`` of text of ``per_inch`` characters an inch
    (13 for the medium size, 15 for small)."""
    import textwrap

    width = max(30, int(inches * per_inch))
    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
                     for line in note.split("\n"))


def _root_figure(ax):
    """The Figure an axes is drawn in, through any SubFigure (which has no size and cannot save)."""
    fig = ax.figure
    while not hasattr(fig, "savefig"):  # a SubFigure has no savefig; its .figure is the parent
        fig = fig.figure
    return fig


def _title(ax, title: str, note: str) -> None:
    """An axes title with the instrument note above the plot, wrapped to the axes' share of the
    figure width (an unwrapped note wider than the figure made the layout squash the plot)."""
    share = 0.9
    spec = ax.get_subplotspec() if hasattr(ax, "get_subplotspec") else None
    if spec is not None:
        cols = spec.get_gridspec().ncols
        share *= len(range(spec.colspan.start, spec.colspan.stop)) / cols
    note = _wrap_note(note, _root_figure(ax).get_figwidth() * share, per_inch=15.0)
    lines = note.count("\n") + 1
    ax.set_title(title, loc="left", fontweight="bold", pad=6 + 11 * lines)
    ax.text(0, 1.012, note, transform=ax.transAxes, ha="left", va="bottom", fontsize="small", color=_NOTE)


def _suptitle(fig, title: str, note: str) -> None:
    """A figure title and the instrument note, wrapped to the figure's width."""
    fig.suptitle(title + "\n" + _wrap_note(note, fig.get_figwidth()), fontsize="medium", x=0.02, ha="left")


def _natural_key(value: Any):
    text = str(value)
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text) if t]


def _order(values, df, column: str, order: Sequence | None, time_col: str | None = "created_at") -> list:
    """The order of a categorical column: ``order``, a categorical dtype's order, a natural sort
    when every value holds a number ("T0" before "T1", "week 2" before "week 10"), else the
    earliest ``created_at`` of each value ("baseline" before "follow-up" if analysed first), else
    a natural sort. Analysis order is only a last resort: photos are often analysed out of turn."""
    import pandas as pd

    present = list(pd.unique(values))
    if order is not None:
        unknown = [v for v in present if v not in list(order)]
        if unknown:
            raise ValueError(f"order for {column!r} lacks {unknown!r}; it has {list(order)!r}")
        return [v for v in order if v in present]
    if isinstance(df[column].dtype, pd.CategoricalDtype) and df[column].dtype.ordered:
        return [v for v in df[column].dtype.categories if v in present]
    if all(re.search(r"\d", str(v)) for v in present):
        return sorted(present, key=_natural_key)
    if time_col and time_col in df.columns:
        first = pd.to_datetime(df[time_col], errors="coerce", utc=True).groupby(values).min()
        if first.notna().all():
            return sorted(present, key=lambda v: (first[v], _natural_key(v)))
    return sorted(present, key=_natural_key)


def _color_cycle(n: int, colors: Sequence[str] = SERIES_COLORS) -> list[str]:
    if n > len(colors):
        warnings.warn(f"{n} groups but only {len(colors)} colour-blind-safe colours; colours repeat.",
                      UserWarning, stacklevel=3)
    return [colors[i % len(colors)] for i in range(n)]


def _one_submission(df, func: str) -> None:
    if "submission_id" in df.columns and df["submission_id"].nunique() > 1:
        raise ValueError(f"{func}() draws one submission, but the table holds {df['submission_id'].nunique()} "
                         "(submission_id). Select one first, e.g. df[df['submission_id'] == ...].")


def _notebook_display() -> None:
    """Let IPython show figures made without pyplot: register the PNG formatter pyplot's inline
    backend would register, unless a figure format is registered already (the user's choice of
    PNG, retina or SVG is kept). Does nothing outside IPython."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/png" not in formatters:
        return
    from matplotlib.figure import Figure

    for mime in ("image/png", "image/svg+xml", "image/jpeg", "application/pdf"):
        if mime in formatters:
            try:
                formatters[mime].lookup_by_type(Figure)
            except KeyError:
                continue
            return
    from functools import partial

    from IPython.core.pylabtools import print_figure

    formatters["image/png"].for_type(Figure, partial(print_figure, fmt="png", base64=True))


def _new_figure(figsize):
    """A new Figure with an Agg canvas, outside pyplot (no registry, no double display)."""
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    _notebook_display()
    return fig


def _check_profile_rows(df, func: str) -> None:
    """Refuse a table holding the same concern (action, region) twice: two submissions that the
    table cannot tell apart (a bar per concern would show one of them and hide the other)."""
    key = _key_column(df, func)
    region = df["region"].fillna("whole") if "region" in df.columns else None
    keys = df[key].astype(str) if region is None else df[key].astype(str) + " / " + region.astype(str)
    twice = list(dict.fromkeys(keys[keys.duplicated()]))
    if twice:
        has_id = "submission_id" in df.columns and df["submission_id"].notna().any()
        why = ("its submission_id does not tell them apart" if has_id
               else "and it has no submission_id column to tell them apart")
        raise ValueError(
            f"{func}() draws one submission, but the table holds the same action and region more than once "
            f"({len(twice)} repeated: {', '.join(twice[:4])}{', ...' if len(twice) > 4 else ''}), {why}. "
            "Pass the scores of one submission, e.g. ledger.scores() filtered by submission_id, or one result.")


def _fmt(value: float, col: str) -> str:
    return f"{value:.0f}" if col == "ui_score" else f"{value:.1f}"


# ----------------------------------------------------------------------------- one result


def _profile_rows(df, col: str, regions: bool) -> list[tuple[str, str, float, bool]]:
    """(label, action, value, is_region) in table order: each concern's whole-face score, then
    (with ``regions``) its regional scores."""
    key = _key_column(df, "score_profile")
    scored = df[df[col].notna()]
    rows = []
    for action in dict.fromkeys(scored[key]):
        part = scored[scored[key] == action]
        region_of = part["region"] if "region" in part.columns else None
        whole = part if region_of is None else part[region_of.fillna("whole") == "whole"]
        if len(whole):
            rows.append((concern_label(action), action, float(whole[col].iloc[0]), False))
        if regions and region_of is not None:
            for _, r in part[region_of.fillna("whole") != "whole"].iterrows():
                rows.append((f"{concern_label(action)}: {region_label(r['region'])}", action, float(r[col]), True))
    return rows


def score_profile(result, *, score: str = "ui", regions: bool = False, allow_mixed: bool = False, ax=None,
                  title: str | None = None, annotate: bool = True):
    """One horizontal bar per concern: the score profile of one submission.

    Parameters
    ----------
    result : AnalysisResult or DataFrame
        A result, or the tidy scores of one submission (columns ``action`` or ``concern``,
        ``ui_score``/``raw_score``, and optionally ``region``, ``skin_type``, ``backend``,
        ``engine``, ``submission_id``).
    score : {"ui", "raw"}
        Which score to draw (both run 1 to 100, higher meaning healthier skin).
    regions : bool
        Add a bar per facial region for concerns scored by region (HD wrinkles and pores).
    allow_mixed : bool
        Allow rows of more than one backend (say local-engine scores for some concerns and cloud
        scores for others); otherwise :class:`MixedBackendsError` names the backends.
    ax : matplotlib Axes, optional
        Draw into this axes instead of a new figure.
    title : str, optional
    annotate : bool
        Write each score at the end of its bar.

    Returns
    -------
    matplotlib.figure.Figure
        Bars run top to bottom in catalogue order; skin type (a category) is written in the note,
        and with ``score="ui"`` the overall score is a dashed line.

    Raises
    ------
    MixedBackendsError
        The rows come from more than one backend and ``allow_mixed`` is False.
    ValueError
        The table holds more than one submission: several ``submission_id`` values, or (with or
        without ``allow_mixed``) the same action and region twice.
    """
    col = _score_col(score)
    df = _as_scores(result, "result")
    _require(df, [col], "score_profile")
    _one_submission(df, "score_profile")
    if "backend" not in df.columns and getattr(result, "backend", None):
        df = df.assign(backend=result.backend)
    if "backend" in df.columns:  # one submission without a backend column has nothing to mix
        _check_backends(df, allow_mixed=allow_mixed, func="score_profile")
    _check_profile_rows(df, "score_profile")
    rows = _profile_rows(df, col, regions)
    if not rows:
        raise ValueError(f"score_profile(): no {col} in this result (only skin type was requested?)")

    if ax is None:
        fig = _new_figure((7.5, 1.6 + 0.32 * len(rows)))
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    y = list(range(len(rows)))
    colors = [_REGION if is_region else _WHOLE for *_, is_region in rows]
    bars = ax.barh(y, [v for _, _, v, _ in rows], color=colors, height=0.72)
    for bar, (_, action, _, is_region) in zip(bars, rows):
        bar.set_gid(f"{action}{':region' if is_region else ''}")
    ax.set_yticks(y, [label for label, *_ in rows])
    for tick, (*_, is_region) in zip(ax.get_yticklabels(), rows):
        if is_region:
            tick.set_color("0.3")
            tick.set_fontsize("small")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(_SCORE_TEXT[col])
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if annotate:
        for bar, (_, _, v, _) in zip(bars, rows):
            inside = v > 88
            # above the overall line, on a white ground where they sit beside the bar, so the dashed
            # line does not run through the figures
            ax.text(v - 1 if inside else v + 1, bar.get_y() + bar.get_height() / 2, _fmt(v, col),
                    va="center", ha="right" if inside else "left", fontsize="small",
                    color="white" if inside else "0.15", zorder=4,
                    bbox=None if inside else dict(facecolor="white", edgecolor="none", pad=0.6, alpha=0.9))

    handles = []
    overall = getattr(result, "overall", None)
    if col == "ui_score" and overall is not None:
        handles.append(ax.axvline(overall, color=OKABE_ITO["black"], linestyle="--", linewidth=1.2,
                                  label=f"Overall {overall:.1f}", zorder=3))
    if regions and any(r[3] for r in rows):
        from matplotlib.patches import Patch

        handles[:0] = [Patch(color=_WHOLE, label="Whole face"), Patch(color=_REGION, label="Region")]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)

    extra = []
    skin = {}
    if "skin_type" in df.columns:
        st = df[df["skin_type"].notna()]
        skin = {str(r.get("region", "whole")): str(r["skin_type"]) for _, r in st.iterrows()}
    if skin:
        parts = [skin.get("whole", "")] if "whole" in skin else []
        parts += [f"{region_label(k)}: {v}" for k, v in skin.items() if k != "whole"]
        extra.append("Skin type: " + ", ".join(p for p in parts if p))
    if getattr(result, "skin_age", None) is not None:
        extra.append(f"skin age {result.skin_age}")
    _title(ax, title or "Skin score profile", _instrument_note(df, " | ".join(extra)))
    return fig


def _photo_array(result, image) -> Any:
    import numpy as np

    img = image if image is not None else result.resize_image()
    if img is None:
        return None
    if hasattr(img, "convert"):
        return np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3].astype(np.uint8)


def _hex_rgb(color: str) -> tuple[int, int, int]:
    from matplotlib.colors import to_rgb

    return tuple(int(round(c * 255)) for c in to_rgb(color))


def overlay_mask(photo, mask, *, color=None, opacity: float = 1.0):
    """Alpha-composite one mask over the photo; returns an ``H x W x 3`` uint8 array.

    Parameters
    ----------
    photo : PIL image or array
        The result's ``resize_image()`` (masks are aligned with it, not with the original).
    mask : PIL image
        An RGBA mask (alpha = where and how strongly the concern was detected). An RGB mask
        (``enable_mask_overlay``: already blended over the photo) is returned as it is.
    color : colour or None
        Paint the mask in this colour (any matplotlib colour) instead of its own; its alpha is kept.
    opacity : float
        Multiplies the mask's alpha (1 keeps it).

    Notes
    -----
    Each pixel is ``round(c * a + p * (1 - a))`` with ``a = alpha / 255 * opacity``, which is
    what ``PIL.Image.alpha_composite`` does over an opaque photo.
    """
    import numpy as np
    from PIL import Image

    base = np.asarray(photo.convert("RGB")) if hasattr(photo, "convert") else np.asarray(photo)[..., :3]
    if mask.mode not in ("RGBA", "LA", "P", "PA"):
        out = np.asarray(mask.convert("RGB"))
        return out
    m = mask.convert("RGBA")
    if m.size != (base.shape[1], base.shape[0]):
        warnings.warn(f"A mask of {m.size[0]}x{m.size[1]} px does not match the photo "
                      f"({base.shape[1]}x{base.shape[0]}); it was resized. Masks align with resize_image(), "
                      "not with the original upload.", UserWarning, stacklevel=2)
        m = m.resize((base.shape[1], base.shape[0]), Image.BILINEAR)
    arr = np.asarray(m).astype(np.float32)
    alpha = arr[..., 3:4] / 255.0 * float(opacity)
    rgb = arr[..., :3] if color is None else np.array(_hex_rgb(color), dtype=np.float32)
    out = rgb * alpha + base.astype(np.float32) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _mask_color(mask) -> tuple[float, float, float] | None:
    """The colour a mask is drawn in: its alpha-weighted mean RGB (None for overlay JPEGs)."""
    import numpy as np

    if mask.mode not in ("RGBA", "LA", "P", "PA"):
        return None
    arr = np.asarray(mask.convert("RGBA")).astype(np.float64)
    w = arr[..., 3]
    if w.sum() == 0:
        return tuple(arr[0, 0, :3] / 255.0)
    return tuple((arr[..., :3] * w[..., None]).sum(axis=(0, 1)) / w.sum() / 255.0)


def _single_colour(mask) -> bool:
    import numpy as np

    if mask.mode != "RGBA":
        return mask.mode in ("LA", "P", "PA")
    arr = np.asarray(mask)
    seen = arr[..., :3][arr[..., 3] > 0]
    return len(seen) == 0 or bool((seen == seen[0]).all())


def _select_masks(result, concerns, regions: bool) -> list[tuple[str, str]]:
    names = result.mask_names
    order = {}
    for i, (action, region) in enumerate(zip(result.scores["action"], result.scores["region"])):
        order.setdefault((action, region), i)
    keys = sorted(names, key=lambda k: (order.get(k, 10_000), k))
    if not regions:
        keys = [k for k in keys if k[1] == "whole"] or keys[:1]
    if concerns is not None:
        wanted = [concerns] if isinstance(concerns, str) else list(concerns)
        chosen = []
        for w in wanted:
            hits = [k for k in keys if w in (k[0], CATALOGUE[k[0]].concern if k[0] in CATALOGUE else None)
                    or str(w).lower() == concern_label(k[0]).lower()]
            if not hits:
                raise KeyError(f"No mask for {w!r} in this result; it has masks for "
                               f"{', '.join(sorted({k[0] for k in names}))}")
            chosen += [h for h in hits if h not in chosen]
        keys = chosen
    return keys


def mask_overlay(result, concerns=None, *, regions: bool = False, colors: str | Sequence[str] = "okabe-ito",
                 opacity: float = 1.0, combine: bool = False, ncols: int | None = None, panel_width: float | None = None,
                 max_side: int | None = None, image=None, legend: bool = True, ax=None,
                 title: str | None = None):
    """Each concern's mask over the photo: one panel per concern (or all in one with ``combine``).

    Parameters
    ----------
    result : AnalysisResult
        A ZIP or JSON result. For a JSON result the masks are downloaded on first use, so its
        client must still be open (or the presigned URLs still valid, 2 h).
    concerns : str or list of str, optional
        Action names, concern keys or labels ("wrinkle", "hd_pore", "Dark circles"); default all.
    regions : bool
        One panel per regional mask too (HD wrinkles, pores; skin type's T- and U-zone).
    colors : "okabe-ito", "original" or a list of colours
        ``"okabe-ito"`` repaints each single-colour mask in a colour-blind-safe colour (keeping its
        alpha); ``"original"`` keeps the service's colours. Masks with several colours (a tinted
        ``enable_dark_background_*``) always keep theirs.
    opacity : float
        Multiplies each mask's alpha.
    combine : bool
        Draw all masks on one photo (best with few concerns: the palette has 8 colours).
    ncols, panel_width :
        Grid columns (default up to 4) and panel width in inches (default 3, or 4.5 for one panel).
    max_side : int, optional
        Downscale photo and masks so the long side is at most this (saves memory for HD photos).
    image : PIL image, optional
        The photo to draw on when the result has no ``resize_image`` (older archives); it must
        have the masks' size.
    legend : bool
        A figure legend: one colour patch per concern.
    ax : matplotlib Axes, optional
        Only with ``combine=True`` or a single concern.

    Returns
    -------
    matplotlib.figure.Figure
        Each panel holds one image: ``overlay_mask(resize_image, mask, color=...)``.
    """
    import numpy as np
    from PIL import Image

    keys = _select_masks(result, concerns, regions)
    if not keys:
        raise ValueError("mask_overlay(): this result has no masks.")
    if ax is not None and not combine and len(keys) > 1:
        raise ValueError(f"mask_overlay(): ax= draws one panel, but {len(keys)} masks were chosen; pass "
                         "combine=True or a single concern.")
    photo = _photo_array(result, image)
    masks = {k: result.mask(*k) for k in keys}
    blended = [f"{a}/{r}" for (a, r), m in masks.items() if m.mode not in ("RGBA", "LA", "P", "PA")]
    if combine and len(keys) > 1 and blended:
        raise ValueError(f"mask_overlay(): the masks {', '.join(blended)} are already blended over the photo "
                         "(requested with mask_overlay=True), so they cannot share one photo; draw them as "
                         "panels (combine=False).")
    if photo is None:
        first = next(iter(masks.values()))
        warnings.warn("This result has no resize_image; masks are drawn on grey. Pass image= to draw on the "
                      "photo.", UserWarning, stacklevel=2)
        photo = np.full((first.size[1], first.size[0], 3), 235, dtype=np.uint8)
    if max_side and max(photo.shape[:2]) > max_side:
        scale = max_side / max(photo.shape[:2])
        size = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS))
        masks = {k: m.resize(size, Image.BILINEAR) for k, m in masks.items()}

    if isinstance(colors, str):
        if colors not in ("okabe-ito", "original"):
            raise ValueError(f"colors must be 'okabe-ito', 'original' or a list of colours, got {colors!r}")
        palette = MASK_COLORS if colors == "okabe-ito" else None
    else:
        palette = list(colors)
    actions = list(dict.fromkeys(a for a, _ in keys))
    if combine and palette is not None and len(actions) > len(palette):
        warnings.warn(f"{len(actions)} concerns on one photo but {len(palette)} colours; colours repeat. "
                      "Use panels (combine=False) or fewer concerns.", UserWarning, stacklevel=2)
    # One panel per concern: one colour for all (the panel title names the concern). One photo for
    # all concerns: a colour per concern. A mask with several colours of its own keeps them.
    single = colors == "okabe-ito" and not combine and len(keys) > 1
    paint = {}
    for k in keys:
        if palette is not None and _single_colour(masks[k]):
            paint[k] = palette[0] if single else palette[actions.index(k[0]) % len(palette)]
        else:
            paint[k] = None

    scores = result.scores
    def caption(action: str, region: str) -> str:
        row = scores[(scores["action"] == action) & (scores["region"] == region)]
        name = concern_label(action) + ("" if region == "whole" else f": {region_label(region)}")
        if len(row) and row["skin_type"].notna().any():
            return f"{name}\n{row['skin_type'].iloc[0]}"
        if len(row) and row["ui_score"].notna().any():
            raw = row["raw_score"].iloc[0]
            return f"{name}\nui {int(row['ui_score'].iloc[0])} \u00b7 raw {raw:.1f}"
        return name

    h, w = photo.shape[:2]
    if combine or len(keys) == 1:
        n_panels, ncols_, nrows = 1, 1, 1
    else:
        n_panels = len(keys)
        ncols_ = ncols or min(4, n_panels)
        nrows = math.ceil(n_panels / ncols_)
    if panel_width is None:
        panel_width = 4.5 if n_panels == 1 else 3.0
    if ax is None:
        panel_h = panel_width * h / w + 0.55
        fig = _new_figure((ncols_ * panel_width + 0.2, nrows * panel_h + 0.9 + (0.5 if legend else 0)))
        axes = list(np.atleast_1d(fig.subplots(nrows, ncols_, squeeze=False)).ravel())
    else:
        fig, axes = _root_figure(ax), [ax]

    from matplotlib.patches import Patch

    handles = []
    if combine or len(keys) == 1:
        composite = photo
        for k in keys:
            composite = overlay_mask(composite, masks[k], color=paint[k], opacity=opacity)
        axes[0].imshow(composite)
        axes[0].set_gid("masks:" + ",".join(f"{a}/{r}" for a, r in keys))
        if len(keys) == 1:
            axes[0].set_title(caption(*keys[0]), fontsize="medium")
    else:
        for axis, k in zip(axes, keys):
            arr = overlay_mask(photo, masks[k], color=paint[k], opacity=opacity)
            axis.imshow(arr)
            axis.set_gid(f"mask:{k[0]}/{k[1]}")
            empty = masks[k].mode == "RGBA" and np.asarray(masks[k])[..., 3].max() == 0
            axis.set_title(caption(*k) + ("\n(nothing detected)" if empty else ""), fontsize="medium")
    for axis in axes[:max(n_panels, 1)]:
        axis.set_axis_off()
    for axis in axes[n_panels:]:
        axis.remove()
    from matplotlib.colors import to_hex

    drawn = {k: paint[k] or _mask_color(masks[k]) for k in keys}
    colours = {to_hex(c) for c in drawn.values() if c is not None}
    if len(colours) == 1 and len(keys) > 1 and not combine:
        # every panel in one colour: the legend explains the encoding (opacity = strength)
        c = colours.pop()
        handles = [Patch(facecolor=c, edgecolor="none", label="Detected, strong"),
                   Patch(facecolor=c, alpha=0.35, edgecolor="none", label="Detected, weak")]
        legend_title = "Mask over the photo (opacity = strength of the finding)"
    else:
        seen = set()
        for k in keys:
            label = concern_label(k[0]) + ("" if k[1] == "whole" or not regions else f": {region_label(k[1])}")
            if drawn[k] is None or label in seen:
                continue
            seen.add(label)
            handles.append(Patch(facecolor=drawn[k], edgecolor="none", label=label))
        legend_title = "Detected area (stronger colour = stronger finding)"
    if legend and handles:
        target = axes[0] if ax is not None else fig
        kw = dict(loc="outside lower center") if ax is None else dict(loc="lower right", fontsize="small")
        target.legend(handles=handles, ncols=min(len(handles), 4), frameon=ax is not None,
                      title=legend_title, title_fontsize="small", **kw)

    if ax is None:
        _suptitle(fig, title or "Masks over the photo", _instrument_note(scores))
    return fig


# ----------------------------------------------------------------------------- two results


def _axes_pair(ax, func: str):
    """``(ax_scores, ax_change)`` from a pair of Axes, or a clear error."""
    from matplotlib.axes import Axes

    if isinstance(ax, Axes):
        raise TypeError(f"{func}(): ax= takes a pair of Axes (the scores and the change), not a single Axes; "
                        "e.g. fig, (ax1, ax2) = plt.subplots(1, 2) and ax=(ax1, ax2), or leave ax out for a "
                        "new figure.")
    try:
        pair = list(ax.ravel() if hasattr(ax, "ravel") else ax)
    except TypeError:
        raise TypeError(f"{func}(): ax= takes a pair of matplotlib Axes, not {type(ax).__name__}") from None
    if len(pair) != 2 or not all(isinstance(a, Axes) for a in pair):
        raise TypeError(f"{func}(): ax= takes a pair of matplotlib Axes (the scores and the change); got "
                        f"{len(pair)} item(s): {', '.join(type(a).__name__ for a in pair) or 'none'}.")
    return pair


def before_after(before, after, *, score: str = "ui", labels: tuple[str, str] = ("Before", "After"),
                 regions: bool = False, allow_mixed: bool = False, ax=None, title: str | None = None):
    """Two submissions side by side, and the change per concern (after - before).

    Parameters
    ----------
    before, after : AnalysisResult or DataFrame
        Results, or the tidy scores of one submission each (see :func:`score_profile`).
    score : {"ui", "raw"}
    labels : (str, str)
        Names of the two submissions in the legend.
    regions : bool
        Also compare regional scores.
    allow_mixed : bool
        Allow a local-engine result to be compared with a cloud one (their scores are not on one
        scale; without this a :class:`MixedBackendsError` names the two backends).
    ax : pair of matplotlib Axes, optional
        Where to draw the scores and the change, e.g. ``plt.subplots(1, 2)[1]``; a single Axes
        is refused (two panels are drawn).

    Returns
    -------
    matplotlib.figure.Figure
        Left: paired bars per concern. Right: the change, positive (healthier) in bluish green,
        negative in vermillion. Only concerns scored in both are drawn.
    """
    import pandas as pd

    col = _score_col(score)
    if ax is not None:
        ax = _axes_pair(ax, "before_after")
    a, b = _as_scores(before, "before"), _as_scores(after, "after")
    for df, res in ((a, before), (b, after)):
        _require(df, [col], "before_after")
        _one_submission(df, "before_after")
        if "backend" not in df.columns and getattr(res, "backend", None):
            df["backend"] = res.backend
    both = pd.concat([a, b], ignore_index=True)
    if "backend" in both.columns and not allow_mixed:
        ba, bb = (sorted(df["backend"].dropna().astype(str).unique()) for df in (a, b))
        if ba != bb:
            raise MixedBackendsError(
                f"before_after(): {labels[0]!r} comes from backend {'/'.join(ba) or '?'} and {labels[1]!r} "
                f"from {'/'.join(bb) or '?'}. skinlab's local engine and the YouCam cloud measure differently, "
                "so the change would be meaningless; compare results of one backend, or pass allow_mixed=True.")
    if "engine" in both.columns and not allow_mixed:
        ea, eb = (set(df["engine"].dropna().astype(str)) for df in (a, b))
        if ea and eb and ea != eb:
            warnings.warn(f"before_after(): different engine versions ({'; '.join(sorted(ea))} vs "
                          f"{'; '.join(sorted(eb))}); part of the change may come from the engine.",
                          UserWarning, stacklevel=2)

    rows_a = {(r[1], r[0]): r[2] for r in _profile_rows(a, col, regions)}
    rows_b = {(r[1], r[0]): r[2] for r in _profile_rows(b, col, regions)}
    common = [k for k in rows_a if k in rows_b]
    if not common:
        raise ValueError("before_after(): the two results share no scored concern (HD and SD actions differ: "
                         f"{sorted({k[0] for k in rows_a})} vs {sorted({k[0] for k in rows_b})}).")
    names = [label for _, label in common]
    va = [rows_a[k] for k in common]
    vb = [rows_b[k] for k in common]
    change = [y - x for x, y in zip(va, vb)]

    if ax is None:
        fig = _new_figure((10, 1.9 + 0.38 * len(common)))
        ax_s, ax_c = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    else:
        ax_s, ax_c = ax
        fig = _root_figure(ax_s)
    y = list(range(len(common)))
    hgt = 0.38
    bars_a = ax_s.barh([i - hgt / 2 for i in y], va, height=hgt, color=_BEFORE, label=labels[0])
    bars_b = ax_s.barh([i + hgt / 2 for i in y], vb, height=hgt, color=_AFTER, label=labels[1])
    for (action, label), pa, pb in zip(common, bars_a, bars_b):
        pa.set_gid(f"before:{action}:{label}")
        pb.set_gid(f"after:{action}:{label}")
    ax_s.set_yticks(y, names)
    ax_s.invert_yaxis()
    ax_s.set_xlim(0, 100)
    ax_s.set_xlabel(_SCORE_TEXT[col])
    bars_c = ax_c.barh(y, change, height=0.6, color=[_BETTER if d >= 0 else _WORSE for d in change])
    for (action, label), patch in zip(common, bars_c):
        patch.set_gid(f"change:{action}:{label}")
    for bar, d in zip(bars_c, change):
        digits = 0 if col == "ui_score" else 1
        text = "0" if round(d, digits) == 0 else f"{d:+.{digits}f}"
        ax_c.text(d, bar.get_y() + bar.get_height() / 2, f" {text} ", va="center",
                  ha="left" if d >= 0 else "right", fontsize="small")
    lim = max(5.0, max(abs(d) for d in change) * 1.3)
    ax_c.set_xlim(-lim, lim)
    ax_c.axvline(0, color="0.2", linewidth=0.8)
    ax_c.set_xlabel(f"Change ({labels[1]} - {labels[0]}; + = healthier)")
    from matplotlib.patches import Patch

    handles = [Patch(color=_BEFORE, label=labels[0]), Patch(color=_AFTER, label=labels[1]),
               Patch(color=_BETTER, label="Change: healthier"), Patch(color=_WORSE, label="Change: less healthy")]
    if ax is None:
        fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False, fontsize="small")
    else:
        ax_s.legend(handles=handles[:2], loc="best", fontsize="small", framealpha=0.9)
        ax_c.legend(handles=handles[2:], loc="best", fontsize="small", framealpha=0.9)
    for axis in (ax_s, ax_c):
        axis.grid(axis="x", color="0.9")
        axis.set_axisbelow(True)
        for side in ("top", "right"):
            axis.spines[side].set_visible(False)
    _title(ax_s, title or _pair_title(a, b, labels), _instrument_note(both))
    return fig


def _pair_title(a, b, labels: tuple[str, str]) -> str:
    """"Before and After", with the subject when both submissions name the same one."""
    each = [{str(v) for v in df["subject"].dropna().unique()} if "subject" in df.columns else set() for df in (a, b)]
    who = f"{next(iter(each[0]))}: " if len(each[0]) == 1 and each[0] == each[1] else ""
    return f"{who}{labels[0]} and {labels[1]}"


# ----------------------------------------------------------------------------- cohorts


def _prepare_tidy(df, col: str, func: str, needed: Sequence[str], region: str | None, concerns):
    """Check columns, keep scored rows of ``region`` and the chosen concerns; return (df, key)."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{func}() takes a tidy DataFrame (one row per submission x action x region, e.g. "
                        f"ledger.scores()), not {type(df).__name__}")
    _require(df, [col, *needed], func)
    key = _key_column(df, func)
    out = df[df[col].notna()].copy()
    out[col] = out[col].astype("float64")
    if region is not None and "region" in out.columns:
        out = out[out["region"].fillna("whole") == region]
    if concerns is not None:
        wanted = [concerns] if isinstance(concerns, str) else list(concerns)
        keep = []
        for w in wanted:
            match = out[key] == w
            if key == "action" and "concern" in out.columns:
                match |= out["concern"] == w
            match |= out[key].map(lambda v: concern_label(v).lower()) == str(w).lower()
            if not match.any():
                present = sorted(map(str, out[key].unique()))
                if present:
                    raise KeyError(f"{func}(): no {col} rows for {w!r}; the table has {', '.join(present)} in "
                                   f"its {key!r} column: pass one of them.")
                raise KeyError(f"{func}(): no {col} rows for {w!r}: the table has no scored rows at all "
                               f"(region={region!r}; {len(df)} rows in all). Check that the ledger is the one you "
                               "meant (Ledger(...).created is True for a new, empty one) and that its "
                               "submissions succeeded (ledger.submissions()).")
            keep.append(match)
        out = out[pd.concat(keep, axis=1).any(axis=1)]
    if out.empty:
        raise ValueError(f"{func}(): no rows with a {col} to plot (region={region!r}).")
    return out, key


def _key_order(keys) -> list:
    order = {name: i for i, name in enumerate(CATALOGUE)}
    concern_order = {c: i for i, c in enumerate(CONCERNS)}
    return sorted(keys, key=lambda k: (order.get(k, concern_order.get(k, 999) * 2 + 1000), str(k)))


def _labels_for(keys) -> dict:
    tiers = {CATALOGUE[k].tier for k in keys if k in CATALOGUE}
    return {k: concern_label(k, tier_suffix=len(tiers) > 1) for k in keys}


def cohort(df, by: str = "condition", *, score: str = "ui", concerns=None, region: str = "whole",
           order: Sequence | None = None, points: bool = True, ylim: tuple[float, float] | None = (0, 101),
           allow_mixed: bool = False, ax=None, title: str | None = None):
    """Score distributions per concern, one box per group of a tag (``condition``, ``timepoint``...).

    Parameters
    ----------
    df : DataFrame
        Tidy scores, one row per submission x action x region (``ledger.scores()``). Needed
        columns: ``action`` (or ``concern``), ``ui_score`` or ``raw_score``, ``backend``, and the
        ``by`` column. Used when present: ``region`` (rows of other regions are left out),
        ``submission_id`` (for the n in the legend), ``created_at`` (to order the groups),
        ``engine``. Rows without a score (skin type) are left out; rows without a ``by`` value
        form the group "(untagged)".
    by : str
        The tag to group by. ``by="backend"`` puts local and cloud side by side.
    score : {"ui", "raw"}
    concerns : str or list, optional
        Action names, concern keys or labels; default all in the table.
    region : str
        Which region's scores (default the whole face); None keeps all rows.
    order : list, optional
        The order of the groups (default: categorical order, else earliest ``created_at``, else a
        natural sort).
    points : bool
        Draw each observation as a dot over its box.
    ylim : (float, float) or None
        The score axis (default the whole 0-100 scale; None zooms to the data).
    allow_mixed : bool
        Pool local-engine and cloud scores (otherwise :class:`MixedBackendsError`).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        Concerns along x; within each, one box (median, quartiles, 1.5 IQR whiskers) per group, in
        the Okabe-Ito colours; the legend lists the groups with their n.
    """
    import numpy as np

    col = _score_col(score)
    data, key = _prepare_tidy(df, col, "cohort", [by], region, concerns)
    _check_backends(data, allow_mixed=allow_mixed, func="cohort", exempt=(by == "backend"))
    data["_group"] = data[by].astype(object).where(data[by].notna(), "(untagged)")
    groups = _order(data["_group"], data, "_group", order)
    keys = _key_order(data[key].unique())
    labels = _labels_for(keys)
    colors = _color_cycle(len(groups))

    if ax is None:
        fig = _new_figure((max(6.0, 1.2 + len(keys) * (0.35 + 0.32 * len(groups))), 5.0))
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    width = 0.8 / len(groups)
    rng = np.random.default_rng(0)
    for j, group in enumerate(groups):
        sub = data[data["_group"] == group]
        for i, k in enumerate(keys):
            values = sub.loc[sub[key] == k, col].to_numpy(dtype=float)
            if not len(values):
                continue
            x = i + (j - (len(groups) - 1) / 2) * width
            bp = ax.boxplot([values], positions=[x], widths=width * 0.8, patch_artist=True, showfliers=not points,
                            manage_ticks=False)
            for box in bp["boxes"]:
                box.set(facecolor=colors[j], alpha=0.45, edgecolor=colors[j], linewidth=1.2)
                box.set_gid(f"box:{k}:{group}")
            for part in ("whiskers", "caps"):
                for line in bp[part]:
                    line.set(color=colors[j], linewidth=1.1)
            for line in bp["medians"]:
                line.set(color="0.1", linewidth=1.6)
                line.set_gid(f"median:{k}:{group}")
            if points:
                jitter = rng.uniform(-width * 0.25, width * 0.25, size=len(values))
                dots = ax.scatter(x + jitter, values, s=12, color=colors[j], edgecolor="white", linewidth=0.4,
                                  zorder=3)
                dots.set_gid(f"points:{k}:{group}")
    n_of = (data.groupby("_group")["submission_id"].nunique() if "submission_id" in data.columns
            else data.groupby("_group").size())
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, alpha=0.6, edgecolor=c, label=f"{g} (n={int(n_of.get(g, 0))})")
               for g, c in zip(groups, colors)]
    ax.legend(handles=handles, title=by, fontsize="small", title_fontsize="small", loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xticks(range(len(keys)), [labels[k] for k in keys])
    ax.set_xlim(-0.6, len(keys) - 0.4)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(_SCORE_TEXT[col])
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    where = "" if region in (None, "whole") else f" ({region_label(region)})"
    _title(ax, title or f"Scores by {by}{where}", _instrument_note(data))
    _fit_xticklabels(ax)
    return fig


def _fit_xticklabels(ax) -> None:
    """Concern names along x: level when they fit side by side; else slanted at 45 degrees and
    anchored at their tick, which keeps them parallel and apart when the tick spacing times
    sin 45 exceeds the text height; else upright. Measured on the laid-out figure, so it holds
    for the figure size the caller chose."""
    import math

    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    if len(labels) < 2:
        return
    for t in labels:
        t.set(rotation=0, rotation_mode="default", ha="center", va="top")
    fig = _root_figure(ax)
    fig.draw_without_rendering()
    # a Figure made without pyplot and without an Agg canvas has no canvas.get_renderer()
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    if all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])):
        return
    height = max(b.height for b in boxes)
    xs = sorted(ax.transData.transform([(x, 0) for x in ax.get_xticks()])[:, 0])
    gap = min(b - a for a, b in zip(xs, xs[1:]))
    angle = 45 if gap * math.sin(math.radians(45)) >= 1.15 * height else 90
    for t in labels:
        t.set(rotation=angle, rotation_mode="anchor", ha="right", va="top" if angle == 45 else "center")


def _time_axis(data, time: str, order):
    """Map the time column to x positions: numbers and datetimes as they are, anything else as
    ordered categories. Returns (x series, tick positions, tick labels or None)."""
    import pandas as pd

    values = data[time]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values) and order is None:
        return values.astype(float), None, None
    if pd.api.types.is_datetime64_any_dtype(values) and order is None:
        return values, None, None
    cats = _order(values, data, time, order)
    pos = {c: i for i, c in enumerate(cats)}
    return values.map(pos).astype(float), list(range(len(cats))), [str(c) for c in cats]


def time_course(df, concern, *, score: str = "ui", time: str = "timepoint", subject: str = "subject",
                by: str | None = None, region: str = "whole", order: Sequence | None = None,
                subjects: bool = True, spread: str | None = "sem", ylim: tuple[float, float] | None = (0, 101),
                allow_mixed: bool = False, ax=None, title: str | None = None):
    """Scores over time: a thin line per subject and a bold mean line per group.

    Parameters
    ----------
    df : DataFrame
        Tidy scores, one row per submission x action x region (``ledger.scores()``). Needed
        columns: ``action`` (or ``concern``), ``ui_score`` or ``raw_score``, ``backend``, and the
        ``time`` and ``subject`` columns (and ``by`` if given). Used when present: ``region``,
        ``created_at`` (orders text timepoints), ``engine``.
    concern : str or list of str
        An action name, concern key or label; a list gives one panel per concern.
    score : {"ui", "raw"}
    time : str
        The time column: numbers or datetimes are drawn to scale; text ("baseline", "week 4") as
        ordered categories (``order``, else categorical order, else a natural sort when every
        label holds a number, "T0" < "T1" < "T10", else the earliest ``created_at``).
    subject : str
        The column identifying a person.
    by : str, optional
        A tag to split the mean by (``condition``): one mean line per group.
    region : str
        Which region's scores (default the whole face).
    subjects : bool
        Draw each subject's own line (thin).
    spread : {"sem", "sd", None}
        The band around each mean (standard error or standard deviation across subjects).
    ylim : (float, float) or None
        The score axis (default the whole 0-100 scale; None zooms to the data).
    allow_mixed : bool
        Allow local-engine and cloud scores in one line (otherwise :class:`MixedBackendsError`).
    ax : matplotlib Axes, optional
        Only for a single concern.

    Returns
    -------
    matplotlib.figure.Figure
        Repeated measurements of a subject at one time point are averaged first, so each subject
        weighs once in the mean. Mean lines carry the gid ``"mean:<concern>:<group>"``, subject
        lines ``"subject:<concern>:<subject>"``.
    """
    import numpy as np

    col = _score_col(score)
    if spread not in ("sem", "sd", None):
        raise ValueError(f"spread must be 'sem', 'sd' or None, got {spread!r}")
    needed = [time, subject] + ([by] if by else [])
    wanted = [concern] if isinstance(concern, str) else list(concern)
    if not wanted:
        raise ValueError("time_course(): name at least one concern.")
    if ax is not None and len(wanted) > 1:
        raise ValueError("time_course(): ax= takes one concern; a list of concerns makes its own panels.")
    data, key = _prepare_tidy(df, col, "time_course", needed, region, wanted)
    tagged = data[time].notna() & data[subject].notna()
    if not tagged.any():
        raise ValueError(f"time_course(): no score row has both a {time!r} and a {subject!r} tag. Tag the photos "
                         "when submitting (tags=skinlab.tags.FilenamePattern('{subject}_{timepoint}.jpg'), a tag "
                         "sheet, or the form's tag fields), or name other columns with time= and subject=.")
    data = data[tagged]
    _check_backends(data, allow_mixed=allow_mixed, func="time_course")
    x, ticks, ticklabels = _time_axis(data, time, order)
    data = data.assign(_x=x, _group=(data[by].astype(object).where(data[by].notna(), "(untagged)") if by
                                     else "all"))
    groups = _order(data["_group"], data, "_group", None) if by else ["all"]
    colors = _color_cycle(len(groups)) if by else [OKABE_ITO["black"]]

    panels = []
    for w in wanted:
        match = (data[key] == w) | (data[key].map(lambda v: concern_label(v).lower()) == str(w).lower())
        if key == "action" and "concern" in data.columns:
            match |= data["concern"] == w
        part = data[match]
        found = sorted(part[key].unique())
        if not found:
            raise ValueError(f"time_course(): no tagged score row for {w!r}; the tagged rows hold "
                             f"{sorted(map(str, data[key].unique()))}.")
        if len(found) > 1:
            raise ValueError(f"time_course(): {w!r} matches {found}; HD and SD scores are different "
                             "measurements. Pass the action name to pick one.")
        panels.append((found[0], part))

    if ax is None:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = _new_figure((5.2 * ncols + 0.4, 3.9 * nrows + 0.6))
        axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=True)).ravel())
        for extra in axes[len(panels):]:
            extra.remove()
    else:
        fig, axes = _root_figure(ax), [ax]

    from matplotlib.lines import Line2D

    for axis, (k, part) in zip(axes, panels):
        per_subject = part.groupby(["_group", subject, "_x"], sort=True)[col].mean().reset_index()
        if subjects:
            for (group, subj), line in per_subject.groupby(["_group", subject], sort=False):
                c = colors[groups.index(group)]
                (ln,) = axis.plot(line["_x"], line[col], color=c if by else "0.55", alpha=0.35, linewidth=0.9,
                                  marker="o", markersize=2.5)
                ln.set_gid(f"subject:{k}:{subj}")
        for group, c in zip(groups, colors):
            g = per_subject[per_subject["_group"] == group]
            if g.empty:
                continue
            stats = g.groupby("_x")[col].agg(["mean", "std", "count"]).sort_index()
            n_subj = g[subject].nunique()
            lo, hi = int(stats["count"].min()), int(stats["count"].max())
            if lo == hi == n_subj:
                label = f"{group} (mean, n={n_subj})" if by else f"Mean of {n_subj} subject{'s' * (n_subj != 1)}"
            else:   # some subjects miss some time points: the mean is over fewer of them there
                label = (f"{group} (mean, n={lo}-{hi} of {n_subj} per time point)" if by
                         else f"Mean (n={lo}-{hi} of {n_subj} subjects per time point)")
            (ln,) = axis.plot(stats.index, stats["mean"], color=c, linewidth=2.4, marker="o", markersize=5,
                              label=label, zorder=4)
            ln.set_gid(f"mean:{k}:{group}")
            for xv, row in stats.iterrows():
                if row["count"] < n_subj:     # say where the mean rests on fewer subjects
                    t = axis.annotate(f"n={int(row['count'])}", (xv, row["mean"]), xytext=(4, 6),
                                      textcoords="offset points", fontsize=7, color=c)
                    t.set_gid(f"n:{k}:{group}:{xv}")
            if spread in ("sem", "sd") and (stats["count"] > 1).any():
                s = stats["std"].fillna(0.0)
                if spread == "sem":
                    s = s / np.sqrt(stats["count"])
                band = axis.fill_between(stats.index, stats["mean"] - s, stats["mean"] + s, color=c, alpha=0.15,
                                         linewidth=0)
                band.set_gid(f"spread:{k}:{group}")
        if ticks is not None:
            axis.set_xticks(ticks, ticklabels)
            axis.set_xlim(-0.3, len(ticks) - 0.7)
        if ylim is not None:
            axis.set_ylim(*ylim)
        axis.set_xlabel(time)
        if ax is not None or axis.get_subplotspec().is_first_col():
            axis.set_ylabel(_SCORE_TEXT[col])
        axis.grid(color="0.92")
        axis.set_axisbelow(True)
        for side in ("top", "right"):
            axis.spines[side].set_visible(False)
        axis.set_title(concern_label(k) + ("" if region in (None, "whole") else f": {region_label(region)}"),
                       loc="left", fontweight="bold")
        handles, _ = axis.get_legend_handles_labels()
        if subjects:
            handles.append(Line2D([], [], color="0.55", alpha=0.6, linewidth=0.9, marker="o", markersize=2.5,
                                  label="Individual subjects"))
        if spread in ("sem", "sd"):
            from matplotlib.patches import Patch

            handles.append(Patch(color="0.5", alpha=0.25, label="\u00b1 SEM" if spread == "sem" else "\u00b1 SD"))
        if axis is axes[0]:  # the colours mean the same in every panel
            axis.legend(handles=handles, fontsize="small", loc="best", framealpha=0.9)
    note = _instrument_note(data)
    if ax is None:
        _suptitle(fig, title or "Time course", note)
    else:
        axis = axes[0]
        axis.set_title(f"{title or concern_label(panels[0][0])}", loc="left", fontweight="bold",
                       pad=6 + 11 * (note.count(chr(10)) + 1))
        axis.text(0, 1.012, note, transform=axis.transAxes, ha="left", va="bottom", fontsize="small", color=_NOTE)
    return fig


# ----------------------------------------------------------------------------- saving


_FORMATS = {"png", "svg", "pdf"}


def save_figure(fig, path, *, dpi: int = 300, formats: Sequence[str] | None = None, transparent: bool = False,
                **savefig_kw):
    """Save a figure for publication: PNG, SVG or PDF.

    Parameters
    ----------
    fig : matplotlib Figure
    path : str or Path
        The file; its suffix picks the format. Parent folders are created.
    dpi : int
        Resolution of PNGs (and of images embedded in SVG/PDF, e.g. the photo of a mask figure).
    formats : list of {"png", "svg", "pdf"}, optional
        Save one file per format next to ``path`` (its suffix is replaced).
    transparent : bool
    **savefig_kw
        Passed to :meth:`matplotlib.figure.Figure.savefig`.

    Returns
    -------
    Path or list of Path
        The file written (a list when ``formats`` is given). Text stays text in SVG and PDF
        (TrueType fonts), so journals and editors can restyle it.
    """
    import matplotlib

    path = Path(path)
    if formats is None:
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in _FORMATS:
            raise ValueError(f"save_figure(): cannot tell the format from {path.name!r}; use a .png, .svg or .pdf "
                             "suffix, or formats=['png', 'pdf'].")
        targets = [(path, fmt)]
    else:
        bad = [f for f in formats if f.lower().lstrip(".") not in _FORMATS]
        if bad:
            raise ValueError(f"save_figure(): unsupported format(s) {bad}; choose from png, svg, pdf.")
        targets = [(path.with_suffix("." + f.lower().lstrip(".")), f.lower().lstrip(".")) for f in formats]
    if not isinstance(dpi, (int, float)) or isinstance(dpi, bool) or dpi <= 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    savefig_kw.setdefault("bbox_inches", "tight")
    written = []
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}):
        for target, fmt in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(target, format=fmt, dpi=dpi, transparent=transparent, **savefig_kw)
            written.append(target)
    return written if formats is not None else written[0]
