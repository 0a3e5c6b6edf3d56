import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from contract import EXAMPLES, SHARED_EXAMPLES, example
from skinlab.actions import CATALOGUE, HD_ACTIONS, SD_ACTIONS
from skinlab.errors import ResultFormatError
from skinlab.results import SCORE_COLUMNS, AnalysisResult, parse_score_info, read_zip



@pytest.mark.allow_skip  # a clean clone on its own has no ../shared; the copy is then all there is
@pytest.mark.skipif(not SHARED_EXAMPLES.is_dir(), reason="../shared/contract-examples is not beside the repository")
def test_vendored_examples_match_the_shared_contract():
    shared = {f.name: f.read_bytes() for f in SHARED_EXAMPLES.glob("*.json")}
    vendored = {f.name: f.read_bytes() for f in EXAMPLES.glob("*.json")}
    assert sorted(vendored) == sorted(shared)
    assert [n for n in shared if shared[n] != vendored[n]] == []


def test_every_contract_example_is_valid_json():
    files = sorted(EXAMPLES.glob("*.json"))
    assert len(files) >= 19
    for f in files:
        json.loads(f.read_text())


def test_json_hd_example_gives_tidy_scores():
    r = AnalysisResult.from_json(example("poll-success-json-hd.json"))
    df = r.scores
    assert list(df.columns) == SCORE_COLUMNS
    assert len(df) == 27  # 7 wrinkle + 4 pore + 13 single + 3 skin type
    assert set(df["action"]) == set(HD_ACTIONS)
    assert not df.duplicated(["action", "region"]).any()
    wr = df[df.action == "hd_wrinkle"]
    assert list(wr.region) == list(CATALOGUE["hd_wrinkle"].regions)  # catalogue order, not service order
    st = df[df.action == "hd_skin_type"]
    assert st.raw_score.isna().all() and st.skin_type.notna().all()
    assert r.overall == pytest.approx(84.66666666666667)
    assert r.skin_age == 34 and r.tier == "hd"
    # all = mean of the ui scores of scored concerns (region whole): the contract's observed rule
    whole = df[(df.region == "whole") & df.ui_score.notna()]
    assert whole.ui_score.mean() == pytest.approx(r.overall, abs=0.01)


def test_json_sd_example():
    r = AnalysisResult.from_json(example("poll-success-json-sd.json"))
    df = r.scores
    assert len(df) == 18 and set(df.action) == set(SD_ACTIONS)
    assert (df.region[df.action != "skin_type"] == "whole").all()  # no region on SD -> whole
    assert df.loc[df.action == "pore", "raw_score"].notna().all()
    assert r.tier == "sd"
    assert set(r.skin_types) == {"whole", "t_zone", "u_zone"}


@pytest.mark.parametrize("name, n", [("score_info-hd.json", 27), ("score_info-sd.json", 18)])
def test_score_info_three_shapes(name, n):
    entries, extras = parse_score_info(example(name))
    assert len(entries) == n
    assert {(e.action, e.region) for e in entries} == {
        (a, r) for a in (HD_ACTIONS if "hd" in name else SD_ACTIONS) for r in CATALOGUE[a].regions}
    for e in entries:
        assert e.mask == CATALOGUE[e.action].mask_file(e.region)
    assert "all" in extras


def _zip(entries: dict, *, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _png(w=60, h=80, alpha=128):
    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (255, 0, 0, alpha)).save(buf, "PNG")
    return buf.getvalue()


def test_zip_result_with_nested_flat_and_categorical():
    info = {"hd_acne": {"whole": {"raw_score": 100, "ui_score": 99, "output_mask_name": "hd_acne_output.png"}},
            "hd_redness": {"raw_score": 91.0, "ui_score": 93, "output_mask_name": "hd_redness_output.png"},
            "hd_skin_type": {"whole": {"skin_type": "Oily", "output_mask_name": "hd_skin_type_output.png"}},
            "all": {"score": 96.0}}  # no skin_age, no resize_image: older archives
    data = _zip({"skinanalysisResult/score_info.json": json.dumps(info),
                 "skinanalysisResult/hd_acne_output.png": _png(),
                 "skinanalysisResult/hd_redness_output.png": _png(),
                 "skinanalysisResult/hd_skin_type_output.png": _png()})
    r = AnalysisResult.from_zip(data)
    assert r.skin_age is None and r.resize_image() is None and r.overall == 96.0
    assert r.score("hd_acne") == 100.0 and isinstance(r.score("hd_acne"), float)
    assert r.score("redness") == 91.0
    assert r.skin_types == {"whole": "Oily"}
    m = r.mask("hd_acne")
    assert m.mode == "RGBA" and np.asarray(m)[0, 0, 3] == 128


def test_save_writes_csv_json_and_masks(tmp_path):
    info = {"hd_redness": {"raw_score": 91.0, "ui_score": 93, "output_mask_name": "hd_redness_output.png"},
            "resize_image": {"image_name": "resize_image.jpg"}, "skin_age": 30}
    buf = io.BytesIO()
    Image.new("RGB", (60, 80)).save(buf, "JPEG")
    data = _zip({"skinanalysisResult/score_info.json": json.dumps(info),
                 "skinanalysisResult/hd_redness_output.png": _png(),
                 "skinanalysisResult/resize_image.jpg": buf.getvalue()})
    out = AnalysisResult.from_zip(data, task_id="t1", backend="local", engine="x").save(tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == ["hd_redness_output.png", "resize_image.jpg", "result.json",
                                                    "scores.csv"]
    saved = json.loads((out / "result.json").read_text())
    assert saved["backend"] == "local" and saved["scores"][0]["raw_score"] == 91.0
    assert "hd_redness,redness,whole,91.0,93,,local,x" in (out / "scores.csv").read_text()


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/../../evil.png", "C:\\evil.png", "a\\b.png"])
def test_zip_path_traversal_rejected(name):
    data = _zip({"skinanalysisResult/score_info.json": "{}", name: b"x"})
    with pytest.raises(ResultFormatError, match="(?i)path|unsafe"):
        read_zip(data)


def test_html_instead_of_zip():
    with pytest.raises(ResultFormatError, match="Expected a ZIP archive.*<html>"):
        read_zip(b"<html><body>Access Denied</body></html>")


def test_truncated_zip():
    data = _zip({"skinanalysisResult/score_info.json": "{}" * 100})
    with pytest.raises(ResultFormatError, match="damaged or truncated"):
        read_zip(data[: len(data) // 2])


def test_zip_bomb_rejected(monkeypatch):
    import skinlab.results as results

    monkeypatch.setattr(results, "MAX_ZIP_BYTES", 1000)
    data = _zip({"a.bin": b"\0" * 800, "b.bin": b"\0" * 800}, compress=zipfile.ZIP_DEFLATED)
    assert len(data) < 1000
    with pytest.raises(ResultFormatError, match="ZIP bomb"):
        read_zip(data)


def test_zip_without_score_info():
    with pytest.raises(ResultFormatError, match="no score_info.json"):
        AnalysisResult.from_zip(_zip({"skinanalysisResult/x.png": _png()}))


def test_unknown_keys_ignored_and_integers_accepted():
    body = {"data": {"results": {"output": [
        {"type": "pore", "raw_score": 100, "ui_score": 99, "mask_urls": ["u"], "url": None, "new_key": 1},
        {"type": "hd_pore", "region": "nose", "raw_score": 48.6, "ui_score": 66, "mask_urls": ["v"]},
        {"type": "future_type", "foo": "bar"}]}}}
    r = AnalysisResult.from_json(body)
    assert r.score("pore") == 100.0 and r.score("hd_pore", "nose") == 48.6
    assert r.overall is None and r.skin_age is None
