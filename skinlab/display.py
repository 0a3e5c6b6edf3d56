"""Rich notebook displays: HTML and plain-text reprs of results and of the ledger.

Small, self-contained functions that the classes call from ``_repr_html_``:

* :func:`result_html` / :func:`result_text`: an :class:`~skinlab.results.AnalysisResult` as its
  status, backend and engine, the overall score and skin age, and the score table.
* :func:`ledger_html` / :func:`ledger_text`: a submissions DataFrame as counts (by status,
  backend, tags) and its most recent rows.
* :func:`repr_html`: the safe entry point for ``_repr_html_``: it returns None instead of
  raising, so a notebook falls back to the plain-text repr.

No repr shows an image: faces appear only when a plot is asked for (:mod:`skinlab.plots`).
Mask files are listed by count only, and nothing here downloads anything.
"""

from __future__ import annotations

import html
import logging
from typing import Any, Callable

__all__ = ["ledger_html", "ledger_text", "repr_html", "result_html", "result_text"]

log = logging.getLogger(__name__)

_BACKEND_NOTE = {
    "local": "skinlab's local engine: measured from the pixels; not YouCam scores, not clinically validated",
    "cloud": "the YouCam AI Skin Analysis service",
}
_BAR = "#0072B2"  # Okabe-Ito blue, as in skinlab.plots
_WARN = "#D55E00"  # Okabe-Ito vermillion
_CSS = ("font-family: var(--jp-content-font-family, sans-serif); font-size: 13px; line-height: 1.35;")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _label(action: str) -> str:
    from .plots import concern_label  # light: plots imports matplotlib only inside its functions

    return concern_label(action)


def _region(region: str) -> str:
    from .plots import region_label

    return region_label(region)


def _num(value: Any, digits: int) -> str:
    try:
        if value is None or value != value:  # NaN
            return ""
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return ""


def _result_facts(result) -> list[tuple[str, str]]:
    n_masks = len(getattr(result, "mask_names", {}) or {})
    facts = [
        ("Status", "success"),
        ("Backend", f"{result.backend} \u2014 {_BACKEND_NOTE.get(result.backend, 'unknown instrument')}"),
        ("Engine", result.engine or "not reported"),
        ("Task", result.task_id or "\u2014"),
        ("Format", f"{result.format}" + (f", {result.tier.upper()}" if result.tier else "")),
    ]
    if result.overall is not None:
        facts.append(("Overall", f"{result.overall:.1f}"))
    if result.skin_age is not None:
        facts.append(("Skin age", str(result.skin_age)))
    facts.append(("Masks", f"{n_masks} (draw them with skinlab.plots.mask_overlay(result))" if n_masks else "none"))
    return facts


def result_html(result) -> str:
    """HTML for an :class:`~skinlab.results.AnalysisResult`: status, backend, engine, overall
    score, skin age and the score table (concerns as people say them). No images."""
    facts = _result_facts(result)
    head = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{_e(k)}</th><td style='text-align:left'>"
                   f"{_e(v)}</td></tr>" for k, v in facts)
    rows = []
    for e in sorted(result.entries, key=_entry_order):
        if e.skin_type:
            rows.append(f"<tr><td style='text-align:left'>{_e(_label(e.action))}</td>"
                        f"<td style='text-align:left'>{_e(_region(e.region))}</td><td></td><td></td>"
                        f"<td style='text-align:left'>{_e(e.skin_type)}</td><td></td></tr>")
            continue
        ui = e.ui_score
        width = max(0, min(100, ui)) if isinstance(ui, (int, float)) else 0
        bar = (f"<div style='background:#e6e6e6;width:100px;height:0.7em;display:inline-block' "
               f"title='ui_score {ui}'><div style='background:{_BAR};height:100%;width:{width}px'></div></div>"
               if ui is not None else "")
        rows.append(f"<tr><td style='text-align:left'>{_e(_label(e.action))}</td>"
                    f"<td style='text-align:left'>{_e(_region(e.region))}</td>"
                    f"<td>{_e('' if ui is None else ui)}</td><td>{_num(e.raw_score, 1)}</td><td></td>"
                    f"<td style='text-align:left'>{bar}</td></tr>")
    table = ("<table><thead><tr><th style='text-align:left'>Concern</th><th style='text-align:left'>Region</th>"
             "<th>ui_score</th><th>raw_score</th><th style='text-align:left'>Skin type</th>"
             "<th style='text-align:left'>ui_score (0\u2013100)</th></tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>") if rows else "<p><em>No scores.</em></p>"
    warn = ""
    if result.backend == "local":
        warn = (f"<p style='color:{_WARN};margin:0.3em 0'>Local-engine scores: not comparable with YouCam cloud "
                "scores; never pool them.</p>")
    return (f"<div class='skinlab-result' style='{_CSS}'><strong>skinlab AnalysisResult</strong>"
            f"<table>{head}</table>{warn}{table}"
            "<p style='color:#555;margin:0.3em 0'>Higher scores mean healthier skin. "
            "<code>result.scores</code> has the full table.</p></div>")


def _entry_order(e) -> tuple:
    from .actions import CATALOGUE

    order = {name: i for i, name in enumerate(CATALOGUE)}
    action = CATALOGUE.get(e.action)
    region_i = action.regions.index(e.region) if action and e.region in action.regions else 99
    return (order.get(e.action, 999), region_i, e.region)


def result_text(result) -> str:
    """A plain-text summary of a result (the fallback when HTML is not shown)."""
    lines = ["skinlab AnalysisResult"]
    lines += [f"  {k:<9} {v}" for k, v in _result_facts(result)]
    scored = [e for e in sorted(result.entries, key=_entry_order)]
    if scored:
        width = max(len(_label(e.action) + ("" if e.region == "whole" else f" ({_region(e.region)})"))
                    for e in scored)
        lines.append(f"  {'Concern':<{width}}  ui  raw")
        for e in scored:
            name = _label(e.action) + ("" if e.region == "whole" else f" ({_region(e.region)})")
            if e.skin_type:
                lines.append(f"  {name:<{width}}  {e.skin_type}")
            else:
                ui = "" if e.ui_score is None else str(e.ui_score)
                lines.append(f"  {name:<{width}}  {ui:>2}  {_num(e.raw_score, 1)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ledger

_SUMMARY_COLUMNS = ("status", "backend", "engine", "subject", "timepoint", "condition")


def _ledger_facts(df) -> list[tuple[str, str]]:
    facts = [("Submissions", str(len(df)))]
    for col in _SUMMARY_COLUMNS:
        if col not in df.columns or not len(df):
            continue
        counts = df[col].astype(object).where(df[col].notna(), "(none)").astype(str).value_counts()
        if col in ("subject",) or len(counts) > 8:
            facts.append((col.capitalize(), f"{df[col].nunique()} distinct"))
        else:
            facts.append((col.capitalize(), ", ".join(f"{k}: {v}" for k, v in counts.items())))
    if "created_at" in df.columns and len(df):
        import pandas as pd

        when = pd.to_datetime(df["created_at"], errors="coerce", utc=True).dropna()
        if len(when):
            facts.append(("Created", f"{when.min():%Y-%m-%d %H:%M} to {when.max():%Y-%m-%d %H:%M} UTC"))
    for col in ("units", "units_charged", "units_estimated"):
        if col in df.columns:
            import pandas as pd

            total = pd.to_numeric(df[col], errors="coerce").sum()
            facts.append((col.replace("_", " ").capitalize(), f"{total:g} in total"))
    return facts


#: Columns a ledger repr shows when the table has them (the rest stay in the DataFrame).
_LEDGER_COLUMNS = ("submission_id", "created_at", "status", "subject", "timepoint", "condition", "backend", "engine",
                   "tier", "actions", "overall", "skin_age", "units_charged", "error_code", "next_step")


def _shown_columns(df) -> list:
    cols = [c for c in _LEDGER_COLUMNS if c in df.columns]
    cols += [c for c in df.columns if str(c).startswith("tag_")]
    return cols if len(cols) >= 3 else list(df.columns)


def _recent(df, max_rows: int):
    if "created_at" in df.columns:
        import pandas as pd

        key = pd.to_datetime(df["created_at"], errors="coerce", utc=True)
        df = df.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k")
    return df.tail(max_rows)[_shown_columns(df)]


def ledger_html(submissions, *, max_rows: int = 20, title: str = "skinlab ledger", recent=None) -> str:
    """HTML for a ledger's submissions DataFrame: counts by status, backend and tags, a warning
    when local-engine and cloud submissions are both present, and the ``max_rows`` most recent
    rows (key columns such as status, tags, backend and units when present, else all; text
    escaped). Works with any columns; shows no images or file names. ``recent``, when given,
    holds the rows to list (with more columns than ``submissions``, which then only needs the
    columns that are counted)."""
    df = submissions
    facts = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{_e(k)}</th>"
                    f"<td style='text-align:left'>{_e(v)}</td></tr>" for k, v in _ledger_facts(df))
    warn = ""
    if "backend" in df.columns and df["backend"].nunique() > 1:
        warn = (f"<p style='color:{_WARN};margin:0.3em 0'>This ledger mixes backends "
                f"({_e(', '.join(sorted(map(str, df['backend'].dropna().unique()))))}); their scores are not "
                "comparable. Filter by backend before comparing.</p>")
    if len(df):
        source = df if recent is None else recent
        shown = _recent(source, max_rows)
        hidden = len(source.columns) - len(shown.columns)
        more = (f"<p style='color:#555;margin:0.3em 0'>The {len(shown)} most recent of {len(df)} rows"
                + (f"; {hidden} more columns in the DataFrame" if hidden else "") + ".</p>"
                if len(shown) < len(df) or hidden else "")
        table = more + shown.to_html(index=False, na_rep="", escape=True, border=0, max_cols=30)
    else:
        table = "<p><em>No submissions yet.</em></p>"
    return (f"<div class='skinlab-ledger' style='{_CSS}'><strong>{_e(title)}</strong>"
            f"<table>{facts}</table>{warn}{table}</div>")


def ledger_text(submissions, *, max_rows: int = 10, title: str = "skinlab ledger") -> str:
    """A plain-text summary of a submissions DataFrame (the fallback when HTML is not shown)."""
    df = submissions
    lines = [title] + [f"  {k}: {v}" for k, v in _ledger_facts(df)]
    if len(df):
        lines.append(_recent(df, max_rows).to_string(index=False, max_colwidth=40))
    return "\n".join(lines)


def repr_html(obj, render: Callable[[Any], str] | None = None) -> str | None:
    """``_repr_html_`` that never raises: the HTML of ``obj`` (a result by default), or None so
    Jupyter shows the plain-text repr instead."""
    try:
        return (render or result_html)(obj)
    except Exception:  # a repr must not break a notebook; say why in the log
        log.warning("skinlab: the HTML repr failed; showing the text repr instead", exc_info=True)
        return None
