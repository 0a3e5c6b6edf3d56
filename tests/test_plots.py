"""skinlab.plots and skinlab.display: check what is drawn, not only that a call runs.

Inputs are real results of the local backend on the bundled astronaut portrait (and a reddened
copy), plus synthetic tidy tables shaped like ``ledger.scores()``. Reference figures are saved
to ``test-artifacts/plots/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from PIL import Image  # noqa: E402

import skinlab  # noqa: E402
from skinlab import display, plots  # noqa: E402
from skinlab.actions import CATALOGUE, SD_ACTIONS  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "plots"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def save(fig, name: str) -> Path:
    path = plots.save_figure(fig, ARTIFACTS / name, dpi=90)
    assert path.stat().st_size > 1000
    return path


# ----------------------------------------------------------------------------- real results


@pytest.fixture(scope="module")
def portrait():
    return skinlab.samples.sample_portrait("astronaut", "sd")


@pytest.fixture(scope="module")
def results(portrait):
    """SD results of the astronaut (ZIP), a reddened copy (JSON: masks fetched through the still
    open client) and an HD result for regional scores."""
    # redness painted on the central face (a global colour cast would be undone by the engine's
    # white balance, as it should be)
    arr = np.asarray(portrait).astype(np.float64)
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((yy - 0.58 * h) / (0.16 * h)) ** 2 + ((xx - 0.5 * w) / (0.25 * w)) ** 2))
    arr[..., 1] *= 1 - 0.25 * blob
    arr[..., 2] *= 1 - 0.15 * blob
    reddened = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    with skinlab.Client.local(task_duration_s=0) as client:
        out = {
            "zip": client.analyze(portrait, list(SD_ACTIONS)),
            "red_json": client.analyze(reddened, list(SD_ACTIONS), format="json"),
            "overlay": client.analyze(portrait, ["wrinkle", "redness"], mask_overlay=True),
            "hd": client.analyze(skinlab.samples.sample_portrait("astronaut", "hd"),
                                 ["hd_wrinkle", "hd_pore", "hd_redness"]),
        }
        yield out


def _bars(ax):
    return [p for p in ax.patches if p.get_gid()]


def test_score_profile_bars_are_the_ui_scores(results):
    res = results["zip"]
    fig = plots.score_profile(res)
    ax = fig.axes[0]
    expected = res.scores[res.scores["ui_score"].notna() & (res.scores["region"] == "whole")]
    bars = _bars(ax)
    assert [b.get_gid() for b in bars] == list(expected["action"])
    assert [b.get_width() for b in bars] == pytest.approx(expected["ui_score"].astype(float).tolist())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [CATALOGUE[a].label for a in expected["action"]]
    assert "Dark circles" in labels and "dark_circle_v2" not in labels
    overall = [ln for ln in ax.get_lines() if ln.get_label().startswith("Overall")]
    assert len(overall) == 1 and overall[0].get_xdata()[0] == pytest.approx(res.overall)
    note = " ".join(t.get_text() for t in ax.texts)
    note = " ".join(note.split())  # the note is wrapped to the figure's width
    assert "local engine" in note and res.engine in note and "Skin type: Normal" in note
    save(fig, "score_profile_sd.png")


def test_score_profile_raw_with_regions(results):
    res = results["hd"]
    fig = plots.score_profile(res, score="raw", regions=True)
    ax = fig.axes[0]
    scored = res.scores[res.scores["raw_score"].notna()]
    bars = _bars(ax)
    assert len(bars) == len(scored) == 12
    assert [b.get_width() for b in bars] == pytest.approx(scored["raw_score"].tolist())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["Wrinkles", "Wrinkles: forehead"] and "Pores: nose" in labels
    assert {to_hex(b.get_facecolor()) for b in bars if b.get_gid().endswith(":region")} == {"#56b4e9"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Whole face", "Region"]
    assert ax.get_xlabel().startswith("raw_score")
    save(fig, "score_profile_hd_regions.png")


def test_score_profile_into_given_axes_and_from_a_table(results):
    fig, (a1, a2) = plt.subplots(1, 2)
    table = results["zip"].scores
    assert plots.score_profile(table, ax=a2) is fig
    assert not _bars(a1) and len(_bars(a2)) == 15
    two = pd.concat([table.assign(submission_id=1), table.assign(submission_id=2)])
    with pytest.raises(ValueError, match="submission_id"):
        plots.score_profile(two)
    with pytest.raises(ValueError, match="'ui' or 'raw'"):
        plots.score_profile(table, score="uii")


def test_score_profile_refuses_mixed_backends_and_a_concern_twice(results):
    """The audit's case: local and cloud rows of the same concerns, no submission_id. Before, the
    profile drew the local values under a note naming both backends."""
    local = results["zip"].scores
    cloud = local.assign(backend="cloud", engine="youcam-skin-analysis v2.0",
                         ui_score=local["ui_score"].where(local["ui_score"].isna(), 99))
    both = pd.concat([local, cloud], ignore_index=True)
    assert "submission_id" not in both.columns
    mixed = r"score_profile\(\).*cloud \(\d+ rows\), local \(\d+ rows\)"
    with pytest.raises(plots.MixedBackendsError, match=mixed):
        plots.score_profile(both)
    # allowing the mix does not make two submissions one: each concern is there twice
    twice = rf"same action and region more than once \({len(local)} repeated: wrinkle / whole, .*no submission_id column"
    with pytest.raises(ValueError, match=twice) as info:
        plots.score_profile(both, allow_mixed=True)
    assert not isinstance(info.value, plots.MixedBackendsError)
    # one backend, two submissions stacked without their ids: refused too, not half drawn
    with pytest.raises(ValueError, match="more than once"):
        plots.score_profile(pd.concat([local, local], ignore_index=True))
    with pytest.raises(ValueError, match="submission_id does not tell them apart"):
        plots.score_profile(pd.concat([local, local], ignore_index=True).assign(submission_id=7))
    # different concerns from the two backends: refused unless asked, then drawn with both named
    wrinkle = local["action"] == "wrinkle"
    part = pd.concat([local[~wrinkle], cloud[wrinkle]], ignore_index=True)
    with pytest.raises(plots.MixedBackendsError):
        plots.score_profile(part)
    fig = plots.score_profile(part, allow_mixed=True)
    ax = fig.axes[0]
    widths = {b.get_gid(): b.get_width() for b in _bars(ax)}
    assert widths["wrinkle"] == 99 and widths["redness"] == float(local.set_index("action").loc["redness", "ui_score"])
    note = " ".join(t.get_text() for t in ax.texts)
    assert "YouCam cloud" in note and "local engine" in note
    # a result's own table (one backend) still draws, with or without a backend column
    assert plots.score_profile(local.drop(columns=["backend", "engine"])).axes


def test_plots_are_built_without_pyplot(results, tmp_path):
    """No figure is added to pyplot's registry (in notebooks pyplot's figures are shown again at the
    end of the cell, and they pile up); each call still returns a Figure that saves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plt.close("all")
    df = study_table()
    before = plt.get_fignums()
    figs = [
        plots.score_profile(results["zip"]),
        plots.mask_overlay(results["zip"], ["wrinkle", "redness"]),
        plots.mask_overlay(results["zip"], "acne"),
        plots.before_after(results["zip"], results["red_json"]),
        plots.cohort(df, by="condition"),
        plots.time_course(df, ["wrinkle", "pore"], by="condition"),
    ]
    assert plt.get_fignums() == before == []
    for fig in figs:
        assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
        assert fig.canvas.manager is None  # not a pyplot window
    out = plots.save_figure(figs[4], tmp_path / "cohort.png", dpi=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.suffix for p in plots.save_figure(figs[0], tmp_path / "p", formats=["svg", "pdf"])] == [".svg", ".pdf"]


def test_plots_import_no_pyplot_and_show_once_in_ipython():
    """In a fresh IPython shell (where pyplot was never imported) a returned figure still has a
    PNG representation, registered once; pyplot is never imported."""
    pytest.importorskip("IPython")
    code = textwrap.dedent("""
        import sys
        import pandas as pd
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        from skinlab import plots
        df = pd.DataFrame({"action": ["wrinkle", "pore"], "region": "whole", "ui_score": [60, 70],
                           "backend": "local"})
        fig = plots.score_profile(df)
        plots.score_profile(df)
        data, _ = shell.display_formatter.format(fig)
        print(sorted(data), "matplotlib.pyplot" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['image/png', 'text/plain'] False"


def _reference_composite(photo: Image.Image, mask: Image.Image, color: str | None) -> np.ndarray:
    """PIL's own alpha compositing, independent of plots.overlay_mask."""
    layer = mask.convert("RGBA")
    if color is not None:
        rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
        layer = Image.merge("RGBA", [Image.new("L", mask.size, c) for c in rgb] + [layer.getchannel("A")])
    return np.asarray(Image.alpha_composite(photo.convert("RGBA"), layer).convert("RGB")).astype(int)


def test_mask_panels_are_masks_composited_over_resize_image(results):
    res = results["zip"]
    fig = plots.mask_overlay(res)
    panels = [ax for ax in fig.axes if ax.get_gid() and ax.get_gid().startswith("mask:")]
    whole = [k for k in res.mask_names if k[1] == "whole"]
    assert len(panels) == len(whole) == 16
    photo = res.resize_image()
    for ax in panels:
        action, region = ax.get_gid()[5:].split("/")
        (image,) = ax.get_images()
        drawn = np.asarray(image.get_array()).astype(int)
        assert drawn.shape == (photo.height, photo.width, 3)
        want = _reference_composite(photo, res.mask(action, region), plots.MASK_COLORS[0])
        assert np.abs(drawn - want).max() <= 1, action
        assert ax.get_title().startswith(CATALOGUE[action].label)
    # the one colour is explained by the legend: strong vs weak findings
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["Detected, strong", "Detected, weak"]
    assert any("(nothing detected)" in ax.get_title() for ax in panels) == any(
        np.asarray(res.mask(*k))[..., 3].max() == 0 for k in whole)
    save(fig, "masks_sd_panels.png")


def test_mask_panels_with_the_service_colours(results):
    res = results["zip"]
    fig = plots.mask_overlay(res, ["wrinkle", "Dark circles", "redness"], colors="original", ncols=3)
    panels = [ax for ax in fig.axes if ax.get_gid()]
    assert [ax.get_gid() for ax in panels] == ["mask:wrinkle/whole", "mask:dark_circle_v2/whole",
                                               "mask:redness/whole"]
    photo = res.resize_image()
    for ax in panels:
        action = ax.get_gid()[5:].split("/")[0]
        want = _reference_composite(photo, res.mask(action), None)
        assert np.abs(np.asarray(ax.get_images()[0].get_array()).astype(int) - want).max() <= 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Wrinkles", "Dark circles", "Redness"]


def test_masks_of_a_json_result_combined_on_one_photo(results):
    res = results["red_json"]
    assert res.format == "json"
    fig = plots.mask_overlay(res, ["redness", "wrinkle", "pore"], combine=True)
    (ax,) = fig.axes
    photo = res.resize_image()
    want = photo
    for i, action in enumerate(["redness", "wrinkle", "pore"]):
        want = Image.fromarray(_reference_composite(want, res.mask(action), plots.MASK_COLORS[i]).astype(np.uint8))
    drawn = np.asarray(ax.get_images()[0].get_array()).astype(int)
    assert np.abs(drawn - np.asarray(want).astype(int)).max() <= 2  # three roundings
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["Redness", "Wrinkles", "Pores"]
    assert [to_hex(h.get_facecolor()) for h in legend.legend_handles] == [c.lower() for c in plots.MASK_COLORS[:3]]
    save(fig, "masks_json_combined.png")


def test_mask_overlay_arguments(results):
    res = results["zip"]
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="combine=True"):
        plots.mask_overlay(res, ax=ax)
    fig = plots.mask_overlay(res, "acne", ax=ax)
    assert fig is ax.figure and len(ax.get_images()) == 1
    with pytest.raises(KeyError, match="No mask for 'hd_acne'"):
        plots.mask_overlay(res, "hd_acne")
    regional = plots.mask_overlay(results["hd"], "hd_pore", regions=True, max_side=400)
    gids = [a.get_gid() for a in regional.axes if a.get_gid()]
    assert gids == ["mask:hd_pore/whole", "mask:hd_pore/forehead", "mask:hd_pore/nose", "mask:hd_pore/cheek"]
    assert max(regional.axes[0].get_images()[0].get_array().shape[:2]) == 400


def test_masks_already_blended_by_the_service_are_drawn_as_they_are(results):
    res = results["overlay"]
    assert set(res.mask_names.values()) == {"wrinkle_output.jpg", "redness_output.jpg"}
    fig = plots.mask_overlay(res)
    panels = [ax for ax in fig.axes if ax.get_gid()]
    assert len(panels) == 2
    for ax in panels:
        action = ax.get_gid()[5:].split("/")[0]
        assert np.array_equal(ax.get_images()[0].get_array(), np.asarray(res.mask(action).convert("RGB")))
    with pytest.raises(ValueError, match="already blended"):
        plots.mask_overlay(res, combine=True)


def test_overlay_mask_passes_an_overlay_jpeg_through(portrait):
    blended = portrait.copy()
    assert np.array_equal(plots.overlay_mask(portrait, blended), np.asarray(blended))
    mask = Image.new("RGBA", portrait.size, (0, 0, 0, 0))
    assert np.array_equal(plots.overlay_mask(portrait, mask), np.asarray(portrait))
    half = Image.new("RGBA", portrait.size, (255, 255, 255, 255))
    out = plots.overlay_mask(portrait, half, opacity=0.5)
    assert np.abs(out.astype(int) - (np.asarray(portrait).astype(int) + 255) / 2).max() <= 0.51


# ----------------------------------------------------------------------------- before / after


def test_before_after_bars_and_change(results):
    before, after = results["zip"], results["red_json"]
    fig = plots.before_after(before, after, labels=("Original", "Reddened"))
    ax_s, ax_c = fig.axes
    got = {p.get_gid(): p for p in ax_s.patches + ax_c.patches if p.get_gid()}
    a = before.scores.set_index("action")["ui_score"].dropna().astype(float)
    b = after.scores.set_index("action")["ui_score"].dropna().astype(float)
    for action in a.index:
        label = CATALOGUE[action].label
        assert got[f"before:{action}:{label}"].get_width() == a[action]
        assert got[f"after:{action}:{label}"].get_width() == b[action]
        assert got[f"change:{action}:{label}"].get_width() == b[action] - a[action]
    change = got["change:redness:Redness"]
    assert change.get_width() < 0  # the reddened copy has less healthy redness
    assert to_hex(change.get_facecolor()) == plots.OKABE_ITO["vermillion"].lower()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "Original", "Reddened", "Change: healthier", "Change: less healthy"]
    save(fig, "before_after.png")


def test_before_after_into_a_pair_of_axes_and_not_one(results):
    before, after = results["zip"], results["red_json"]
    fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(10, 6))
    assert plots.before_after(before, after, ax=(ax_s, ax_c), labels=("Original", "Reddened")) is fig
    assert len(fig.axes) == 2  # drawn into the given pair, no new axes
    gids = [p.get_gid() for p in ax_s.patches if p.get_gid()]
    assert gids and all(g.split(":")[0] in ("before", "after") for g in gids)
    change = {p.get_gid(): p.get_width() for p in ax_c.patches if p.get_gid()}
    a = before.scores.set_index("action")["ui_score"].dropna().astype(float)
    b = after.scores.set_index("action")["ui_score"].dropna().astype(float)
    assert change["change:redness:Redness"] == b["redness"] - a["redness"]
    assert set(change) == {f"change:{k}:{plots.concern_label(k)}" for k in a.index}
    assert [t.get_text() for t in ax_s.get_legend().get_texts()] == ["Original", "Reddened"]
    assert [t.get_text() for t in ax_c.get_legend().get_texts()] == ["Change: healthier", "Change: less healthy"]
    _, pair = plt.subplots(1, 2)  # the numpy array plt.subplots gives works as it is
    assert plots.before_after(before, after, ax=pair) is pair[0].figure
    with pytest.raises(TypeError, match=r"ax= takes a pair of Axes.*not a single Axes"):
        plots.before_after(before, after, ax=ax_s)
    with pytest.raises(TypeError, match=r"pair of matplotlib Axes.*got 3 item"):
        plots.before_after(before, after, ax=[ax_s, ax_c, ax_s])
    with pytest.raises(TypeError, match="pair of matplotlib Axes, not int"):
        plots.before_after(before, after, ax=3)


def test_before_after_never_mixes_local_and_cloud(results):
    local = results["zip"].scores
    cloud = local.assign(backend="cloud", engine="youcam-skin-analysis v2.0")
    with pytest.raises(plots.MixedBackendsError, match=r"local.*cloud"):
        plots.before_after(local, cloud)
    fig = plots.before_after(local, cloud, allow_mixed=True)
    assert "YouCam cloud" in " ".join(t.get_text() for t in fig.axes[0].texts)


# ----------------------------------------------------------------------------- tidy tables

TIMES = ["baseline", "week 4", "week 12"]


def study_table() -> pd.DataFrame:
    """A ledger-like tidy table: 6 subjects, 2 conditions, 3 timepoints, 3 actions + skin type."""
    rows = []
    sid = 0
    start = pd.Timestamp("2025-01-06", tz="UTC")
    for s in range(6):
        subject = f"S{s + 1:02d}"
        condition = "cream" if s % 2 else "placebo"
        for t, tp in enumerate(TIMES):
            repeats = 2 if (subject == "S01" and tp == "week 4") else 1
            for rep in range(repeats):
                sid += 1
                for j, action in enumerate(["wrinkle", "redness", "pore"]):
                    ui = 50 + 3 * s + (6 * t if condition == "cream" else t) + 5 * j + 4 * rep
                    rows.append(dict(submission_id=sid, action=action, concern=CATALOGUE[action].concern,
                                     region="whole", raw_score=ui - 7.5, ui_score=ui, backend="local",
                                     engine="skinlab-local 0.1.0", created_at=start + pd.Timedelta(weeks=4 * t,
                                                                                                  hours=s),
                                     subject=subject, timepoint=tp, condition=condition, site="A"))
                rows.append(dict(submission_id=sid, action="skin_type", concern="skin_type", region="whole",
                                 raw_score=np.nan, ui_score=pd.NA, backend="local", engine="skinlab-local 0.1.0",
                                 created_at=start + pd.Timedelta(weeks=4 * t, hours=s), subject=subject,
                                 timepoint=tp, condition=condition, site="A"))
    df = pd.DataFrame(rows)
    df["ui_score"] = df["ui_score"].astype("Int64")
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)  # the order must not matter


def test_cohort_boxes_and_points_are_the_data():
    df = study_table()
    fig = plots.cohort(df, by="condition")
    ax = fig.axes[0]
    scored = df[df["ui_score"].notna()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Wrinkles", "Pores", "Redness"]
    groups = ["placebo", "cream"]  # in order of the first submission (S01, placebo)
    for action in ["wrinkle", "pore", "redness"]:
        for g in groups:
            values = scored[(scored["action"] == action) & (scored["condition"] == g)]["ui_score"].astype(float)
            (median,) = [ln for ln in ax.lines if ln.get_gid() == f"median:{action}:{g}"]
            assert median.get_ydata()[0] == pytest.approx(values.median())
            (dots,) = [c for c in ax.collections if c.get_gid() == f"points:{action}:{g}"]
            assert sorted(dots.get_offsets()[:, 1]) == pytest.approx(sorted(values))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["placebo (n=10)", "cream (n=9)"]  # submissions per group (S01 came twice at week 4)
    assert ax.get_legend().get_title().get_text() == "condition"
    save(fig, "cohort_by_condition.png")


def test_cohort_names_missing_columns_and_refuses_mixed_backends():
    df = study_table()
    with pytest.raises(ValueError, match=r"needs the column\(s\) 'arm'.*It has: submission_id"):
        plots.cohort(df, by="arm")
    with pytest.raises(ValueError, match="'backend' column"):
        plots.cohort(df.drop(columns="backend"))
    mixed = df.copy()
    mixed.loc[mixed["subject"] == "S02", "backend"] = "cloud"
    with pytest.raises(plots.MixedBackendsError, match=r"cloud \(9 rows\), local \(48 rows\)"):
        plots.cohort(mixed, by="condition")
    fig = plots.cohort(mixed, by="backend", concerns="redness", score="raw")  # side by side: allowed
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["local (n=16)", "cloud (n=3)"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Redness"]
    save(fig, "cohort_by_backend.png")


def _all_concerns_table(groups=("placebo", "cream", "control")):
    rng = np.random.default_rng(7)
    names = [n for n in SD_ACTIONS if n != "skin_type"]
    rows = [dict(submission_id=10 * g + s, action=a, region="whole", ui_score=int(rng.integers(30, 95)),
                 backend="local", engine="skinlab-local 0.2.0", condition=group)
            for g, group in enumerate(groups) for s in range(5) for a in names]
    return pd.DataFrame(rows), names


def _label_geometry(ax):
    """Tick spacing and label boxes in display pixels, after layout."""
    fig = ax.figure
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    labels = ax.get_xticklabels()
    xs = ax.transData.transform([(x, 0) for x in ax.get_xticks()])[:, 0]
    return labels, np.diff(np.sort(xs)), [t.get_window_extent(renderer) for t in labels]


@pytest.mark.parametrize("figsize, n, expected", [(None, 15, None), (None, 3, 0), ((7, 4), 15, 45), ((7, 4), 2, 0)])
def test_cohort_concern_labels_never_overlap(figsize, n, expected):
    """All 15 scored concerns in the notebook's 7 x 4 in axes slant at 45 degrees; a figure sized by
    cohort() itself (wide), or a few concerns, keep them level when they fit. No two labels overlap."""
    df, names = _all_concerns_table()
    if figsize is None:
        fig = plots.cohort(df, by="condition", concerns=names[:n])
        ax = fig.axes[0]
    else:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        plots.cohort(df, by="condition", concerns=names[:n], ax=ax)
    labels, gaps, boxes = _label_geometry(ax)
    assert [t.get_text() for t in labels] == [plots.concern_label(a) for a in names[:n]]
    angles = {t.get_rotation() for t in labels}
    assert len(angles) == 1 and (expected is None or angles == {expected})
    angle = angles.pop()
    if angle == 0:
        ordered = sorted(boxes, key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(ordered, ordered[1:]))  # side by side, apart
    else:
        # parallel slanted labels anchored at their ticks are apart when spacing x sin(angle) > text height
        level_height = max(t.get_fontsize() for t in labels) * fig.dpi / 72
        assert all(t.get_rotation_mode() == "anchor" for t in labels)
        assert gaps.min() * np.sin(np.radians(angle)) > level_height
    if figsize == (7, 4) and n == 15:
        save(fig, "cohort_all_concerns_7x4.png")


def test_cohort_and_time_course_colours_are_the_palette():
    """The groups get SERIES_COLORS in order (all Okabe-Ito); the overall mean is Okabe-Ito black."""
    df = study_table()
    okabe = {c.lower() for c in plots.OKABE_ITO.values()}
    series = [c.lower() for c in plots.SERIES_COLORS]
    assert set(series) == okabe
    groups = ["placebo", "cream"]
    ax = plots.cohort(df, by="condition").axes[0]
    boxes = [p for p in ax.patches if (p.get_gid() or "").startswith("box:")]
    assert len(boxes) == 6
    for box in boxes:
        group = box.get_gid().split(":")[2]
        assert to_hex(box.get_facecolor()) == to_hex(box.get_edgecolor()) == series[groups.index(group)]
    for dots in [c for c in ax.collections if (c.get_gid() or "").startswith("points:")]:
        group = dots.get_gid().split(":")[2]
        assert {to_hex(c) for c in dots.get_facecolors()} == {series[groups.index(group)]}
    assert [to_hex(h.get_facecolor()) for h in ax.get_legend().legend_handles] == series[:2]
    ax = plots.time_course(df, "wrinkle", by="condition").axes[0]
    for group in groups:
        (mean,) = [ln for ln in ax.lines if ln.get_gid() == f"mean:wrinkle:{group}"]
        assert to_hex(mean.get_color()) == series[groups.index(group)]
        (band,) = [c for c in ax.collections if c.get_gid() == f"spread:wrinkle:{group}"]
        assert to_hex(band.get_facecolor()[0]) == series[groups.index(group)]
    subjects = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("subject:")]
    assert subjects and {to_hex(ln.get_color()) for ln in subjects} <= set(series[:2])
    ax = plots.time_course(df, "wrinkle").axes[0]
    (mean,) = [ln for ln in ax.lines if ln.get_gid() == "mean:wrinkle:all"]
    assert to_hex(mean.get_color()) == plots.OKABE_ITO["black"].lower()


def expected_means(df, action, condition=None):
    d = df[(df["action"] == action) & df["ui_score"].notna()]
    if condition is not None:
        d = d[d["condition"] == condition]
    per_subject = d.groupby(["subject", "timepoint"])["ui_score"].mean().astype(float).reset_index()
    return per_subject.groupby("timepoint")["ui_score"].mean().reindex(TIMES)


def test_time_course_lines_are_the_means():
    df = study_table()
    fig = plots.time_course(df, "wrinkle", by="condition")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == TIMES  # ordered by created_at
    for condition in ["cream", "placebo"]:
        (line,) = [ln for ln in ax.lines if ln.get_gid() == f"mean:wrinkle:{condition}"]
        assert list(line.get_xdata()) == [0, 1, 2]
        assert list(line.get_ydata()) == pytest.approx(expected_means(df, "wrinkle", condition).tolist())
    subjects = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("subject:")]
    assert len(subjects) == 6
    (s01,) = [ln for ln in subjects if ln.get_gid() == "subject:wrinkle:S01"]
    assert list(s01.get_ydata()) == [50, 53, 52]  # the two week-4 visits of S01 (51, 55) averaged
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["placebo (mean, n=3)", "cream (mean, n=3)", "Individual subjects", "\u00b1 SEM"]
    assert ax.get_title(loc="left") == "Wrinkles"
    save(fig, "time_course_by_condition.png")


def test_time_course_panels_numeric_time_and_errors():
    df = study_table()
    df["day"] = df["timepoint"].map({"baseline": 0, "week 4": 28, "week 12": 84})
    fig = plots.time_course(df, ["wrinkle", "Redness"], time="day", spread="sd")
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["Wrinkles", "Redness"]
    (line,) = [ln for ln in fig.axes[1].lines if ln.get_gid() == "mean:redness:all"]
    assert list(line.get_xdata()) == [0, 28, 84]
    assert list(line.get_ydata()) == pytest.approx(expected_means(df, "redness").tolist())
    save(fig, "time_course_panels.png")

    mixed = df.copy()
    mixed.loc[mixed["timepoint"] == "week 12", "backend"] = "cloud"
    with pytest.raises(plots.MixedBackendsError, match="cloud.*local"):
        plots.time_course(mixed, "wrinkle")
    assert plots.time_course(mixed, "wrinkle", allow_mixed=True).axes
    with pytest.raises(ValueError, match=r"'visit'.*It has"):
        plots.time_course(df, "wrinkle", time="visit")
    with pytest.raises(KeyError, match="no ui_score rows for 'acne'"):
        plots.time_course(df, "acne")
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="ax= takes one concern"):
        plots.time_course(df, ["wrinkle", "pore"], ax=ax)
    assert plots.time_course(df, "pore", ax=ax, subjects=False) is ax.figure
    assert not [ln for ln in ax.lines if (ln.get_gid() or "").startswith("subject:")]


def test_time_course_text_order_without_dates():
    df = study_table().drop(columns="created_at")
    fig = plots.time_course(df, "pore", order=None)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == TIMES  # natural sort: week 4 < week 12
    fig = plots.time_course(df, "pore", order=["week 12", "week 4", "baseline"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["week 12", "week 4", "baseline"]


def test_time_course_numbered_timepoints_follow_their_numbers_not_the_analysis_order():
    """Photos are often analysed out of turn (T1 first): labels with numbers are put in their
    numeric order, whatever created_at says."""
    df = study_table()
    df["timepoint"] = df["timepoint"].map({"baseline": "T10", "week 4": "T2", "week 12": "T0"})
    fig = plots.time_course(df, "wrinkle")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["T0", "T2", "T10"]


def test_time_course_without_tags_says_how_to_tag():
    df = study_table()
    df["subject"] = None
    with pytest.raises(ValueError, match=r"no score row has both a 'timepoint' and a 'subject' tag.*FilenamePattern"):
        plots.time_course(df, "wrinkle")
    df = study_table()
    df.loc[df["action"] == "pore", "timepoint"] = None
    with pytest.raises(ValueError, match="no tagged score row for 'pore'"):
        plots.time_course(df, ["wrinkle", "pore"])


# ----------------------------------------------------------------------------- saving and import cost


def test_save_figure_formats(tmp_path):
    df = study_table()
    fig = plots.cohort(df, concerns=["wrinkle"])
    png = plots.save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    big = plots.save_figure(fig, tmp_path / "g.png", dpi=100)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(big) as b, Image.open(png) as p:
        assert b.width > 1.8 * p.width
    paths = plots.save_figure(fig, tmp_path / "h", formats=["svg", "pdf"])
    assert [p.suffix for p in paths] == [".svg", ".pdf"]
    assert b"Wrinkles" in paths[0].read_bytes()  # text stays text in SVG
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        plots.save_figure(fig, tmp_path / "f.jpg")


def test_importing_skinlab_and_plots_does_not_import_matplotlib():
    code = ("import sys, skinlab, skinlab.plots, skinlab.display; "
            "print([m for m in ('matplotlib', 'pandas') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- rich display


def test_result_html_has_status_backend_engine_and_scores_but_no_image(results):
    res = results["zip"]
    page = res._repr_html_()
    assert page == display.result_html(res)
    for text in ("Status", "success", "Backend", "local", "not YouCam scores", res.engine, "Dark circles",
                 "Skin type", "Normal", f"{res.overall:.1f}"):
        assert text in page, text
    wrinkle = res.scores.set_index("action").loc["wrinkle"]
    assert f"<td>{wrinkle['ui_score']}</td><td>{wrinkle['raw_score']:.1f}</td>" in page
    for face in ("<img", "data:image", "base64", "resize_image.jpg"):
        assert face not in page
    assert "18 (draw them with skinlab.plots.mask_overlay(result))" in page
    text = display.result_text(res)
    assert "Backend   local" in text and "Dark circles" in text and "<" not in text


def test_result_html_falls_back_to_text_when_it_fails(results, caplog):
    broken = display.repr_html(object())
    assert broken is None and "HTML repr failed" in caplog.text
    hd = display.result_html(results["hd"])
    assert "crow&#x27;s feet" in hd and "HD" in hd


def test_ledger_html_counts_warns_and_escapes():
    subs = pd.DataFrame({
        "submission_id": [1, 2, 3],
        "status": ["success", "success", "error"],
        "backend": ["local", "cloud", "local"],
        "subject": ["S01", "<b>S02</b>", "S01"],
        "created_at": pd.to_datetime(["2025-01-01", "2025-01-03", "2025-01-02"], utc=True),
    })
    page = display.ledger_html(subs, max_rows=2)
    assert "Submissions</th><td style='text-align:left'>3" in page
    assert "success: 2, error: 1" in page
    assert "mixes backends (cloud, local)" in page
    assert "&lt;b&gt;S02&lt;/b&gt;" in page and "<b>S02" not in page
    table = page.split("most recent")[1]
    assert "The 2 most recent of 3 rows" in page
    assert "<td>1</td>" not in table and "<td>2</td>" in table and "<td>3</td>" in table  # the oldest left out
    assert "<img" not in page
    assert "No submissions yet" in display.ledger_html(subs.iloc[:0])
    text = display.ledger_text(subs)
    assert text.startswith("skinlab ledger") and "Status: success: 2, error: 1" in text


def test_a_concern_missing_from_the_table_is_named_with_what_is_there():
    df = study_table()
    with pytest.raises(KeyError, match=r"no ui_score rows for 'acne'; the table has pore, redness, wrinkle in its "
                                       r"'action' column"):
        plots.cohort(df, concerns=["acne"])
    empty = df.iloc[0:0]
    with pytest.raises(KeyError, match=r"no scored rows at all .*Ledger\(\.\.\.\)\.created"):
        plots.cohort(empty, concerns=["wrinkle"])


def test_time_course_says_when_a_mean_rests_on_fewer_subjects():
    df = study_table()
    gone = df["subject"].isin(["S01", "S02"]) & (df["timepoint"] == "week 12")
    fig = plots.time_course(df[~gone], "wrinkle")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "Mean (n=4-6 of 6 subjects per time point)"
    notes = [t for t in ax.texts if (t.get_gid() or "").startswith("n:wrinkle:")]
    assert [t.get_text() for t in notes] == ["n=4"] and notes[0].xy[0] == 2
    full = plots.time_course(df, "wrinkle")
    assert [t.get_text() for t in full.axes[0].get_legend().get_texts()][0] == "Mean of 6 subjects"
    assert not [t for t in full.axes[0].texts if (t.get_gid() or "").startswith("n:")]


@pytest.mark.parametrize("by", ["condition", "backend"])
def test_cohort_with_a_real_engine_name_keeps_its_plot_wide(by):
    """The instrument note names the engine in full ("skinlab-local 0.2.3+landmarks;
    face=mediapipe-face-landmarker"); unwrapped, it was wider than cohort()'s own 6 in figure and
    the layout squashed the plot to a fifth of the width ("axes sizes collapsed to zero")."""
    import warnings

    df, names = _all_concerns_table()
    df["engine"] = "skinlab-local 0.2.3+landmarks; face=mediapipe-face-landmarker"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.cohort(df, by=by, concerns=names[:4])
        fig.draw_without_rendering()
    ax = fig.axes[0]
    assert ax.get_position().width > 0.55
    renderer = fig.canvas.get_renderer()
    note = next(t for t in ax.texts if "mediapipe" in t.get_text())
    assert note.get_window_extent(renderer).x1 <= fig.bbox.width  # wrapped inside the figure


def test_plots_draw_into_an_axes_of_a_subfigure():
    """An ax= inside a matplotlib SubFigure (no figure size of its own) is accepted."""
    df, names = _all_concerns_table()
    fig = plt.figure(figsize=(8, 4), layout="constrained")
    left, _right = fig.subfigures(1, 2)
    ax = left.subplots()
    out = plots.cohort(df, by="condition", concerns=names[:3], ax=ax)
    assert out is fig  # the root figure, which can be saved
    assert any("local engine" in t.get_text() for t in ax.texts)


def test_before_after_title_names_the_subject_of_both(results):
    """Two submissions of one subject: the default title says whose they are; different or no
    subjects: the plain "Before and After"."""
    a = results["zip"].scores.assign(subject="S07")
    b = results["red_json"].scores.assign(subject="S07")
    title = lambda fig: fig.axes[0].get_title(loc="left")  # noqa: E731
    assert title(plots.before_after(a, b, labels=("T0", "T4"))) == "S07: T0 and T4"
    assert title(plots.before_after(a, b.assign(subject="S08"))) == "Before and After"
    assert title(plots.before_after(results["zip"], results["red_json"])) == "Before and After"


def test_score_profile_value_labels_sit_above_the_overall_line(results):
    fig = plots.score_profile(results["zip"])
    ax = fig.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("Overall"))
    labels = [t for t in ax.texts if t.get_text().strip().isdigit()]
    assert labels and all(t.get_zorder() > line.get_zorder() for t in labels)
    outside = [t for t in labels if t.get_color() != "white"]
    assert outside and all(t.get_bbox_patch() is not None for t in outside)  # a white ground under the figures
