"""The main job end to end: real public-domain portraits through the client, over HTTP, on the local backend."""

import io
import json

import numpy as np
import pytest
from PIL import Image

import skinlab
from skinlab import errors
from skinlab.actions import CATALOGUE, HD_ACTIONS, SD_ACTIONS
from skinlab.client import Client, PollSchedule
from skinlab.samples import sample_portrait

FAST_POLL = PollSchedule(first=0.02, factor=1.5, cap=0.2, minimum=0.01)


def _jpeg(img, quality=95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def portraits():
    out = {}
    for name in ("astronaut", "grace_hopper"):
        out[name, "original"] = _jpeg(sample_portrait(name, crop=False))
        out[name, "sd"] = _jpeg(sample_portrait(name, "sd"))
        out[name, "hd"] = _jpeg(sample_portrait(name, "hd"))
    return out


@pytest.fixture(scope="module")
def client(local_server):
    with Client("e2e-key", base_url=local_server.url, poll_schedule=FAST_POLL) as c:
        yield c


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_uncropped_portraits_face_too_small(client, portraits, name):
    with pytest.raises(errors.FaceTooSmallError) as info:
        client.analyze(portraits[name, "original"], ["wrinkle", "redness"], timeout=60)
    assert info.value.code == "error_src_face_too_small" and info.value.task_id


def _check_result(r, names, tier):
    df = r.scores
    assert set(df.action) == set(names)
    expected_rows = sum(len(CATALOGUE[n].regions) for n in names)
    assert len(df) == expected_rows and not df.duplicated(["action", "region"]).any()
    scored = df[df.action.map(lambda a: CATALOGUE[a].scored)]
    assert scored.raw_score.between(1, 100).all() and scored.ui_score.between(1, 99).all()
    types = df[df.action.str.endswith("skin_type")]
    assert types.skin_type.isin(skinlab.actions.SKIN_TYPES).all() and len(types) == 3
    whole = scored[scored.region == "whole"]
    assert r.overall == pytest.approx(whole.ui_score.mean(), abs=1e-6)
    assert isinstance(r.skin_age, int) and 10 <= r.skin_age <= 90
    assert r.backend == "local" and "face=" in r.engine and (df.backend == "local").all()
    assert r.tier == tier
    base = r.resize_image()
    masks = r.masks
    assert len(masks) == expected_rows
    for (action, region), m in masks.items():
        assert m.size == base.size, (action, region)
        assert m.mode == "RGBA"


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
@pytest.mark.parametrize("fmt", ["zip", "json"])
def test_sd_crop_scores_all_16(client, portraits, name, fmt):
    r = client.analyze(portraits[name, "sd"], list(SD_ACTIONS), format=fmt, timeout=120)
    assert r.format == fmt
    _check_result(r, SD_ACTIONS, "sd")


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_hd_crop_scores_all_16(client, portraits, name, tmp_path):
    r = client.analyze(portraits[name, "hd"], list(HD_ACTIONS), format="zip", timeout=180)
    _check_result(r, HD_ACTIONS, "hd")
    folder = r.save(tmp_path / name)
    assert len(list(folder.glob("hd_*.png"))) == 27
    saved = json.loads((folder / "result.json").read_text())
    assert saved["backend"] == "local" and len(saved["scores"]) == 27


def test_same_image_same_scores_in_both_formats(client, portraits):
    a = client.analyze(portraits["astronaut", "sd"], ["redness", "wrinkle", "pore"], format="zip", timeout=60)
    b = client.analyze(portraits["astronaut", "sd"], ["redness", "wrinkle", "pore"], format="json", timeout=60)
    cols = ["action", "region", "raw_score", "ui_score"]
    assert a.scores[cols].equals(b.scores[cols])


def test_sd_and_hd_share_one_measurement_of_redness(client, portraits):
    # The same upright pixels analysed as SD and HD give the same redness (as the service does).
    img = portraits["astronaut", "hd"]
    sd = client.analyze(img, ["redness"], timeout=60).score("redness")
    hd = client.analyze(img, ["hd_redness"], timeout=60).score("hd_redness")
    assert sd == hd


def test_exif_rotated_png_scores_like_upright(client, portraits):
    upright = Image.open(io.BytesIO(portraits["astronaut", "sd"]))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF 6 says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    up = io.BytesIO()
    upright.save(up, "PNG")
    task = client.submit(buf.getvalue(), ["redness", "dark_circle_v2"])
    assert any("EXIF orientation 6" in c for c in task.source["changes"])
    rotated = task.wait(60)
    reference = client.analyze(up.getvalue(), ["redness", "dark_circle_v2"], timeout=60)
    assert rotated.scores.raw_score.tolist() == reference.scores.raw_score.tolist()


def test_url_source_fetched_by_the_service(client, portraits, local_server):
    # The emulator fetches src_file_url itself; a URL that cannot be fetched ends in error_download_image.
    with pytest.raises(errors.DownloadImageError):
        client.analyze(f"{local_server.url}/no/such/image.jpg", ["redness"], timeout=60)


def test_masks_mark_detected_areas_inside_the_face(client, portraits):
    r = client.analyze(portraits["astronaut", "sd"], ["redness"], timeout=60)
    alpha = np.asarray(r.mask("redness"))[..., 3]
    assert alpha.max() > 0
    ys, xs = np.nonzero(alpha)
    h, w = alpha.shape
    # the detected area lies inside the image's central face zone, not at the borders
    assert 0.1 * w < xs.mean() < 0.9 * w and 0.2 * h < ys.mean() < 0.9 * h


def test_helper_uses_local_backend_without_key(monkeypatch, portraits):
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    r = skinlab.analyze(portraits["grace_hopper", "sd"], "redness,dark_circle")
    assert r.backend == "local" and set(r.scores.action) == {"redness", "dark_circle_v2"}


def test_cli_main_job(tmp_path, monkeypatch, capsys):
    from skinlab.cli import main

    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    code = main(["analyze", "--sample", "astronaut", "--actions", "wrinkle,redness,skin_type",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Backend: LOCAL" in out and "not clinically validated" in out
    assert "redness" in out and "overall score" in out
    folder = tmp_path / "out" / "astronaut_sd"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "redness_output.png", "skin_type_output.png", "skin_type_t_zone_output.png", "skin_type_u_zone_output.png",
        "wrinkle_output.png"]


def test_cli_reports_failures_and_bad_actions(tmp_path, monkeypatch, capsys, portraits):
    from skinlab.cli import main

    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    photo = tmp_path / "subject 01.jpg"
    photo.write_bytes(portraits["astronaut", "original"])
    assert main(["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "subject 01.jpg: failed" in out and "too small. Crop the photo" in out
    assert "failed with error_src_face_too_small: 1" in out
    assert main(["analyze", str(photo), "--actions", "rednes"]) == 2
    assert "Did you mean 'redness'" in capsys.readouterr().out


def test_cli_actions_lists_catalogue(capsys):
    from skinlab.cli import main

    assert main(["actions"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CATALOGUE)
