"""The main job end to end: real public-domain portraits through the client, over HTTP, on the local backend."""

import argparse
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

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
    assert "Backend: LOCAL" in out and "(no API key set)" in out and "not clinically validated" in out
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


# ---------------------------------------------------------------------------- the README, as written

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks(lang: str) -> list[str]:
    """The fenced code blocks of the README whose info string is ``lang`` ("" for plain fences)."""
    blocks, current, info = [], None, None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, local_server):
    """Every ```python block of the README, in order, in one namespace, unchanged. ``face.jpg`` and
    ``photos/`` are the files the examples name; the "cloud" (``skinlab.Client()`` with a key) is
    the local emulator standing in for the service's URL."""
    pytest.importorskip("ipywidgets")  # the last block shows the form
    import skinlab.client as client_module

    blocks = _readme_blocks("python")
    assert len(blocks) >= 4 and any("skinlab.Client()" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(client_module, "DEFAULT_BASE_URL", local_server.url)
    monkeypatch.setenv("SKINLAB_API_KEY", "readme-example-key")
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    sample_portrait("astronaut", "hd").save("face.jpg", quality=92)  # HD: one example asks for hd_ actions
    Path("photos").mkdir()
    for subject, name in (("S01", "astronaut"), ("S02", "grace_hopper")):
        base = sample_portrait(name, "sd")
        for timepoint, gain in (("T0", 1.0), ("T1", 0.92)):
            ImageEnhance.Brightness(base).enhance(gain).save(f"photos/{subject}_{timepoint}.jpg", quality=92)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
    # what the comments in the examples promise
    assert set(ns["task"].result().scores["action"]) == {"hd_wrinkle", "hd_pore"}
    assert set(ns["result"].scores["action"]) == {"redness", "dark_circle_v2"} and ns["result"].backend == "local"
    assert (tmp_path / "out" / "face" / "scores.csv").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "face").glob("*.png")) == [
        "pore_output.png", "redness_output.png", "wrinkle_output.png"]
    report, ledger = ns["report"], ns["ledger"]
    assert report.count("done") == 4 and "units spent" in report.summary()
    assert (tmp_path / "study" / "ledger.sqlite").exists() and (tmp_path / "study" / "results").is_dir()
    tidy = ledger.scores(backend="local")
    assert set(tidy["subject"]) == {"S01", "S02"} and set(tidy["timepoint"]) == {"T0", "T1"}
    assert len(ledger.wide()) == 4
    ledger.close()


def _readme_command_lines() -> list[str]:
    """Every ``skinlab ...`` command the README shows, in code blocks or inline code."""
    text = README.read_text(encoding="utf-8")
    lines = [ln.split("#")[0].strip() for block in _readme_blocks("") for ln in block.splitlines()]
    lines += re.findall(r"`(skinlab [^`]+)`", text)
    return [ln for ln in lines if ln.startswith("skinlab ")]


def _concrete(line: str) -> list[str]:
    """A README synopsis as a concrete command line: optional parts taken, placeholders filled."""
    line = re.sub(r"\[(--[\w-]+)(?: ([^\]|]+)(?:\|[^\]]+)?)?\]", lambda m: f"{m[1]} {m[2] or ''}", line)
    words = shlex.split(line)[1:]
    fill = {"PHOTO...": "face.jpg", "DIR": "out", "PATH": "study/ledger.sqlite"}
    return [fill.get(w, w) for w in words]


def test_readme_command_lines_parse():
    from skinlab.cli import build_parser

    lines = _readme_command_lines()
    commands = {ln.split()[1] for ln in lines}
    assert {"analyze", "actions", "serve", "sample", "app"} <= commands, commands
    parser = build_parser()
    for line in lines:
        try:
            args = parser.parse_args(_concrete(line))
        except SystemExit:  # argparse refuses: the README shows an option the command does not have
            pytest.fail(f"the README's command does not parse: {line}")
        assert args.command == line.split()[1]
    synopsis = parser.parse_args(_concrete(
        "skinlab analyze PHOTO... --actions wrinkle,pore,redness [--hd] [--format json|zip] [--out DIR]"))
    assert (synopsis.photos, synopsis.actions, synopsis.hd, synopsis.format, synopsis.out) == (
        ["face.jpg"], "wrinkle,pore,redness", True, "json", "out")


def test_cli_help_describes_every_option(capsys):
    from skinlab.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"skinlab {name} {action.option_strings[0]} has no help text"


def test_cli_folder_with_ledger_pattern_tags_and_dry_run(tmp_path, monkeypatch, capsys, local_server):
    from skinlab.cli import main
    from skinlab.ledger import Ledger

    photos = tmp_path / "photos"
    photos.mkdir()
    for subject, name in (("S01", "astronaut"), ("S02", "grace_hopper")):
        sample_portrait(name, "sd").save(photos / f"{subject}_T0.jpg", quality=92)
    ledger = tmp_path / "study" / "ledger.sqlite"
    base = ["analyze", str(photos), "--actions", "redness", "--ledger", str(ledger), "--base-url", local_server.url,
            "--out", str(tmp_path / "out")]
    monkeypatch.setenv("SKINLAB_API_KEY", "cli-folder-key")
    before = len(local_server.app.task_ids())
    assert main(base + ["--pattern", "{subject}_{timepoint}.jpg", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN on the LOCAL backend" in out and "would submit 2 image(s)" in out and "estimated cost 18" in out
    # a key is set and --base-url names a local server: the key is sent to it, and the banner says so
    assert "Backend: LOCAL" in out and "the API key in SKINLAB_API_KEY is sent to it" in out
    assert len(local_server.app.task_ids()) == before  # nothing created
    assert main(base + ["--pattern", "{subject}_{timepoint}.jpg"]) == 0
    out = capsys.readouterr().out
    assert "done 2" in out and "units spent 18" in out
    subs = Ledger(ledger).submissions()
    assert sorted(zip(subs.subject, subs.timepoint)) == [("S01", "T0"), ("S02", "T0")]
    # a tag sheet with the same run: nothing is billed again, and a photo missing from the sheet stops it first
    sheet = tmp_path / "tags.csv"
    sheet.write_text("filename,subject,condition\nS01_T0.jpg,S01,placebo\nS02_T0.jpg,S02,active\n")
    assert main(base + ["--tags", str(sheet)]) == 0
    assert "reused 2 (no new task)" in capsys.readouterr().out
    assert len(local_server.app.task_ids()) == before + 2
    sheet.write_text("filename,subject\nS01_T0.jpg,S01\n")
    assert main(base + ["--tags", str(sheet)]) == 2
    assert "no row for 1 file(s): S02_T0.jpg" in capsys.readouterr().out
    assert main(base + ["--tags", str(sheet), "--pattern", "{subject}.jpg"]) == 2
    assert "not both" in capsys.readouterr().out


def test_cli_sample_writes_the_cropped_portrait(tmp_path, capsys):
    from skinlab.cli import main

    assert main(["sample", "astronaut", "--hd", "-o", str(tmp_path / "astronaut_hd.jpg")]) == 0
    with Image.open(tmp_path / "astronaut_hd.jpg") as img:
        assert img.format == "JPEG" and min(img.size) >= 1080
    assert main(["sample", "grace_hopper", "--uncropped", "-o", str(tmp_path / "gh.jpg")]) == 0
    with Image.open(tmp_path / "gh.jpg") as img:
        assert img.size == Image.open(io.BytesIO(_jpeg(sample_portrait("grace_hopper", crop=False)))).size
    assert f"wrote {tmp_path / 'gh.jpg'}" in capsys.readouterr().out


def test_cli_serve_runs_the_emulator_until_interrupted(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}
    proc = subprocess.Popen([sys.executable, "-m", "skinlab.cli", "serve", "--port", "0", "--task-duration", "0",
                             "--units", "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", first)
        assert url, first
        with Client("serve-key", base_url=url[1], poll_schedule=FAST_POLL) as c:
            assert c.balance() == 50
            result = c.analyze(sample_portrait("astronaut", "sd"), ["redness"])
            assert result.score("redness") is not None and c.balance() == 50 - 9
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0 and "stopping" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_options_inject_faults_seen_over_http():
    """`skinlab serve` with options: the faults are armed at start and seen by a plain HTTP client."""
    import time

    import requests

    env = {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}
    proc = subprocess.Popen([sys.executable, "-m", "skinlab.cli", "serve", "--port", "0", "--task-duration", "0",
                             "--rate-limit", "off", "--upload-headers-as-list", "--fault", "invalid-task-id:2",
                             "--fault", "503:credit"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", lines[0])
        assert url, lines
        assert "Faults armed: invalid-task-id:2, 503:credit" in lines[2], lines
        base, auth = url[1], {"Authorization": "Bearer serve-options"}
        assert [requests.get(base + "/s2s/v1.0/client/credit", headers=auth, timeout=30).status_code
                for _ in range(2)] == [503, 200]
        slot = requests.post(base + "/s2s/v2.0/file", headers=auth, timeout=30, json={"files": [
            {"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": 3}]}).json()["data"]["files"][0]
        assert slot["requests"][0]["headers"] == [{"key": "Content-Length", "value": "3"},
                                                  {"key": "Content-Type", "value": "image/jpeg"}]
        created = requests.post(base + "/s2s/v2.0/task/skin-analysis", headers=auth, timeout=30,
                                json={"src_file_id": slot["file_id"], "dst_actions": ["redness"]})
        task = f"{base}/s2s/v2.0/task/skin-analysis/{created.json()['data']['task_id']}"
        for _ in range(2):
            resp = requests.get(task, headers=auth, timeout=30)
            assert resp.status_code == 400
            assert resp.json() == {"status": 400, "error": "Invalid task ID", "error_code": "InvalidTaskId"}
        for _ in range(200):                                   # then the live task answers again
            data = requests.get(task, headers=auth, timeout=30).json()["data"]
            if data["task_status"] != "running":
                break
            time.sleep(0.05)
        assert data["error"] == "unknown_internal_error"      # never PUT: check 1
        proc.send_signal(signal.SIGINT)
        assert "stopping" in proc.communicate(timeout=30)[0] and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- the command line, as a new user meets it


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)


def _photo(tmp_path, portraits, name="S01_T0.jpg", which="astronaut"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(portraits[which, "sd"])
    return path


def test_cli_no_key_mode_ignores_proxy_variables(tmp_path, monkeypatch, capsys, portraits, no_key):
    """A proxy in the environment (here a dead one) must not come between the CLI and the embedded
    emulator on loopback, whatever no_proxy says."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    photo = _photo(tmp_path, portraits)
    code = main_cli(["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Backend: LOCAL" in out and "done 1" in out and "ProxyError" not in out
    assert (tmp_path / "out" / "S01_T0" / "scores.csv").exists()


def main_cli(argv):
    from skinlab.cli import main

    return main(argv)


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "0"], "argument --timeout: the wait per task (seconds) must be a number above 0, not '0'"),
    (["--timeout", "-1"], "argument --timeout: the wait per task (seconds) must be a number above 0, not '-1'"),
    (["--timeout", "soon"], "argument --timeout: the wait per task (seconds) must be a number above 0"),
    (["--max-units", "-5"], "argument --max-units: the unit cap must be a whole number at least 0, not '-5'"),
    (["--max-units", "2.5"], "argument --max-units: the unit cap must be a whole number"),
    (["--workers", "0"], "argument --workers: the number of images in flight must be a whole number at least 1"),
])
def test_cli_refuses_bad_numbers(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main_cli(["analyze", "face.jpg", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_accepts_good_numbers():
    from skinlab.cli import build_parser

    args = build_parser().parse_args(["analyze", "face.jpg", "--timeout", "0.5", "--max-units", "0", "--workers", "1"])
    assert (args.timeout, args.max_units, args.workers) == (0.5, 0, 1)
    defaults = build_parser().parse_args(["analyze", "face.jpg"])
    assert (defaults.timeout, defaults.max_units, defaults.workers, defaults.out) == (300.0, None, 4, None)


def test_cli_warning_is_one_clean_line(tmp_path, capsys, portraits, no_key):
    import warnings

    before = warnings.showwarning
    photo = _photo(tmp_path, portraits)
    assert main_cli(["analyze", str(photo), "--actions", "Wrinkle, wrinkle", "--dry-run",
                     "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    warning_lines = [ln for ln in captured.err.splitlines() if "Duplicate" in ln]
    assert warning_lines == ["warning: Duplicate actions dropped: wrinkle"], captured.err
    assert "UserWarning" not in captured.err and "cli.py" not in captured.err and "names = " not in captured.err
    assert "would submit 1 image(s)" in captured.out and "estimated cost 9" in captured.out
    assert warnings.showwarning is before  # restored for whatever runs next in this process


def test_cli_serve_hint_names_the_flag(capsys):
    assert main_cli(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: Refusing to bind the local emulator to '0.0.0.0'")
    assert "add --allow-remote if you really mean it" in out and "allow_remote_bind" not in out


def test_cli_unreachable_backend_advises_cli_options(tmp_path, monkeypatch, capsys, portraits):
    monkeypatch.setattr(skinlab.client.RetryPolicy, "delay", lambda self, attempt: 0.0)  # no backoff waits
    photo = _photo(tmp_path, portraits)
    code = main_cli(["analyze", str(photo), "--actions", "redness", "--base-url", "http://127.0.0.1:9",
                     "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "cannot reach http://127.0.0.1:9" in out and "work offline with --local" in out
    assert "skinlab.Client.local()" not in out
    with pytest.raises(errors.SkinlabConnectionError, match=r"work offline with skinlab\.Client\.local\(\)"):
        Client(base_url="http://127.0.0.1:9", retry=skinlab.client.RetryPolicy(sleep=lambda s: None)).balance()


def test_cli_timeout_advice_is_true_for_the_command_line(tmp_path, capsys, portraits):
    """A task still running at --timeout: the CLI says to run the same command again (not Python's
    ledger.resume), says it once per photo (no extra warning), and running it again collects it."""
    from skinlab.local import serve

    photo = _photo(tmp_path, portraits)
    with serve(task_duration_s=2.0, rate_limit=None) as srv:
        argv = ["analyze", str(photo), "--actions", "redness", "--base-url", srv.url, "--out", str(tmp_path / "out")]
        assert main_cli(argv + ["--timeout", "0.3"]) == 1
        captured = capsys.readouterr()
        assert "running the same skinlab analyze command again" in captured.out
        assert "ledger.resume" not in captured.out + captured.err
        assert "warning: Submission" not in captured.err and "UserWarning" not in captured.err
        assert main_cli(argv + ["--timeout", "60"]) == 0
        out = capsys.readouterr().out
        assert "S01_T0.jpg: reused" in out and "redness" in out
        assert len(srv.app.task_ids()) == 1  # collected, not submitted again


def test_cli_tag_problems_are_clear_errors(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    base = ["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path / "out"), "--dry-run"]
    binary = tmp_path / "tags.csv"
    binary.write_bytes(portraits["astronaut", "sd"][:2000])
    cases = [
        (["--tags", str(tmp_path / "nofile.csv")], "error: No tag sheet at "),
        (["--tags", str(binary)], "is a binary file, not a CSV text file"),
        (["--pattern", "{subject}{timepoint}.jpg"],
         "puts {subject} and {timepoint} side by side with no separator"),
        (["--pattern", "{subject}-{timepoint}.jpg"],
         "1 file(s) do not fit '{subject}-{timepoint}.jpg': S01_T0.jpg. For example, the pattern needs '-' after "
         "{subject}, and 'S01_T0.jpg' has none there."),
    ]
    nokey = tmp_path / "nokey.csv"
    nokey.write_text("subject,day\nS01,1\n")
    cases.append((["--tags", str(nokey)], "in the sheet's first row. The columns are subject, day."))
    for extra, message in cases:
        assert main_cli(base + extra) == 2, extra
        out = capsys.readouterr().out
        assert message in out and "Traceback" not in out and "key=" not in out and "tags=" not in out, out
    assert not (tmp_path / "out").exists()  # refused before anything was set up


def test_cli_dry_run_shows_the_parsed_tags(tmp_path, capsys, portraits, no_key):
    photos = tmp_path / "photos"
    _photo(photos, portraits, "S01_T0.jpg")
    _photo(photos, portraits, "S02_T1.jpg", "grace_hopper")
    base = ["analyze", str(photos), "--actions", "redness", "--out", str(tmp_path / "out"), "--dry-run"]
    assert main_cli(base + ["--pattern", "{subject}_{timepoint}"]) == 0  # no extension: matched on the stem
    out = capsys.readouterr().out
    assert "Tags (--pattern '{subject}_{timepoint}'):\n   S01_T0.jpg: subject=S01, timepoint=T0\n" \
           "   S02_T1.jpg: subject=S02, timepoint=T1\n" in out
    sheet = tmp_path / "tags.csv"
    sheet.write_text("filename,subject,condition\nS01_T0.jpg,S01,placebo\nS02_T1.jpg,S02,\n")
    assert main_cli(base + ["--tags", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "   S01_T0.jpg: subject=S01, condition=placebo\n   S02_T1.jpg: subject=S02\n" in out


def test_cli_prints_preflight_changes_per_photo(tmp_path, capsys, portraits, no_key):
    upright = Image.open(io.BytesIO(portraits["astronaut", "sd"])).convert("RGBA")
    upright.paste((0, 0, 0, 0), (0, 0, 40, 40))                   # a transparent corner
    stored = upright.transpose(Image.Transpose.ROTATE_90)         # stored sideways; EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "cutout.png"
    stored.save(photo, "PNG", exif=exif)
    argv = ["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path / "out")]
    for outcome in ("done", "reused"):                            # a rerun shows what was sent, too
        assert main_cli(argv) == 0
        out = capsys.readouterr().out
        block = out.split("== cutout.png: ")[1]
        assert block.startswith(f"{outcome}\n   pre-flight: rotated upright from EXIF orientation 6"), block
        assert "\n   pre-flight: flattened transparency onto white (" in block
        assert "\n   pre-flight: removed metadata before upload: EXIF\n" in block
        assert "GPS" not in out


def test_cli_ledger_without_out_writes_beside_the_ledger(tmp_path, monkeypatch, capsys, portraits, no_key):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    photos = tmp_path / "photos"
    _photo(photos, portraits, "S01_T0.jpg")
    _photo(photos, portraits, "results.jpg", "grace_hopper")     # a name the ledger's own folder has
    ledger = tmp_path / "study" / "ledger.sqlite"
    assert main_cli(["analyze", str(photos), "--actions", "redness", "--ledger", str(ledger)]) == 0
    out = capsys.readouterr().out
    assert f"to {tmp_path / 'study' / 'S01_T0'}" in out
    assert (tmp_path / "study" / "S01_T0" / "scores.csv").exists()
    assert (tmp_path / "study" / "results-2" / "scores.csv").exists()
    assert not (tmp_path / "study" / "results" / "scores.csv").exists()  # the ledger's folder left alone
    assert list(cwd.iterdir()) == []                                      # nothing in the current folder
    from skinlab.ledger import Ledger

    with Ledger(ledger) as led:
        assert len(led) == 2 and all(s.result is not None for s in map(led.get, led.submissions().submission_id))


def test_cli_help_says_where_results_go():
    from skinlab.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = re.sub(r"(?<=\w-) ", "", " ".join(subparsers.choices["analyze"].format_help().split()))  # per- photo
    assert "default: the --ledger file's folder when --ledger is given, else skinlab-results" in text
    assert "without --out the per-photo folders are written beside it" in text


@pytest.mark.parametrize("library, cli", [
    ("upload slot: cannot reach http://127.0.0.1:9 (ProxyError). Check the network, or work offline with "
     "skinlab.Client.local().", "Check the network, or work offline with --local"),
    ("ledger.resume(client) collects the outcome (task ids stay valid 24 h after completion).",
     "running the same skinlab analyze command again collects the outcome (task ids"),
    ("its results were not saved: ledger.resume(client) polls again for fresh result URLs",
     "its results were not saved: running the same skinlab analyze command again polls again for fresh result URLs"),
    ("Submission 3 (recorded ..., task abc...) already holds this result: it was reused and nothing was billed. "
     "Pass force=True to analyse it again.", "nothing was billed. Add --force to analyse it again."),
    ("Billed but unrecoverable: submit(..., force=True) to measure again.",
     "Billed but unrecoverable: run the same command with --force to measure again."),
    ("To measure again: ledger.submit(..., force=True) (bills again).",
     "To measure again: run the same command with --force (bills again)."),
    ("Task abc: the deadline passed while polling; no poll was sent after it. The task is not lost: resume with "
     "client.task('abc').wait(); do not submit again", "The task is not lost: run the same skinlab analyze command "
     "again to collect it; do not submit again"),
    ("Bind 127.0.0.1, or pass allow_remote_bind=True if you really mean it.",
     "Bind 127.0.0.1, or add --allow-remote if you really mean it."),
    ("a.jpg is 11.2 MB; the service accepts at most 10 MB. Pass downscale=True to resize it to a 2560 px long side",
     "Add --downscale to resize it to a 2560 px long side"),
    ("No API key for https://x. Set SKINLAB_API_KEY (or YOUCAM_API_KEY), or pass api_key=.",
     "Set SKINLAB_API_KEY (or YOUCAM_API_KEY)."),
    ("tags.csv: no file-name column; name one of filename, file or pass key=. The columns are subject, day.",
     "name one of filename, file in the sheet's first row. The columns are subject, day."),
    ("tags.csv has no row for 'a.jpg' (column 'filename'). Add a row, or pass tags= explicitly for this image.",
     "Add a row for it to the sheet."),
])
def test_cli_rewords_python_advice(library, cli):
    from skinlab.cli import _cli_text

    assert cli in _cli_text(library)
    assert _cli_text("nothing to change here: skinlab.Ledger, force") == "nothing to change here: skinlab.Ledger, force"



def test_cli_offline_advice_names_the_key_variable_only_when_one_is_set(monkeypatch):
    from skinlab.cli import _cli_text

    text = "cannot reach http://127.0.0.1:9. Check the network, or work offline with skinlab.Client.local()."
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    assert _cli_text(text).endswith("Check the network, or work offline with --local.")
    monkeypatch.setenv("YOUCAM_API_KEY", "cli-offline-advice")
    assert _cli_text(text).endswith("work offline with --local (or unset YOUCAM_API_KEY).")

def _library_texts() -> list[str]:
    """Every string the library (all of skinlab but the command line) can build in one
    expression: literals, f-strings with each interpolation as ``X`` (``'X'`` for ``!r``) and
    ``+`` chains of them."""
    import ast
    import pathlib

    import skinlab

    def flat(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else ("'X'" if v.conversion == 114 else "X")
                           for v in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = flat(node.left), flat(node.right)
            if left is not None or right is not None:
                return (left or "X") + (right or "X")
        return None

    texts = []
    for path in pathlib.Path(skinlab.__file__).parent.rglob("*.py"):
        if path.name != "cli.py":
            texts += [t for t in map(flat, ast.walk(ast.parse(path.read_text(encoding="utf-8")))) if t]
    return texts


def test_every_cli_rewording_still_matches_a_library_message():
    """The command line re-words library advice by pattern; a library message re-phrased without
    its pattern would reach command-line users with Python advice. Each pattern must still match
    some message the library builds."""
    import re

    from skinlab.cli import _CLI_WORDING, _EMBEDDED_WORDING

    texts = _library_texts()
    assert len(texts) > 500
    stale = [pattern for pattern, _ in _EMBEDDED_WORDING + _CLI_WORDING
             if not any(re.search(pattern, t) for t in texts)]
    assert not stale, f"no library message matches these re-wordings any more: {stale}"


class _SlowStream(io.StringIO):
    """A terminal slow enough that a line written in two pieces lets another thread in between."""

    def write(self, text):
        import time

        n = super().write(text)
        time.sleep(0.0005)
        return n

    def isatty(self):
        return False


def test_cli_warnings_from_threads_and_the_progress_bar_never_share_a_line(monkeypatch):
    """Warnings printed from the batch's worker threads while the progress bar draws: each is a
    whole line of its own, never glued to another warning or to the bar."""
    import threading
    import warnings

    from tqdm import tqdm

    from skinlab import cli

    stream = _SlowStream()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = tqdm(total=400, desc="skinlab local", file=stream, mininterval=0, miniters=1)
    done = threading.Event()

    def draw():
        while not done.is_set():
            bar.update(0 if bar.n >= 400 else 1)

    def warn(t):
        for i in range(15):
            cli._show_warning(UserWarning(f"Submission {t}{i:02d} was reused; its tags differ. Change them "
                                          f"with ledger.tag({t}, ...)."), UserWarning, "ledger.py", 1)

    drawer = threading.Thread(target=draw)
    drawer.start()
    workers = [threading.Thread(target=warn, args=(t,)) for t in range(1, 7)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    drawer.join()
    bar.close()
    lines = [seg for line in stream.getvalue().split("\n") for seg in [line.split("\r")] if "warning" in line]
    assert len(lines) == 6 * 15
    for segments in lines:
        text = segments[-1]  # what stays on screen: nothing after the warning on its line
        assert re.fullmatch(r"warning: Submission \d+ was reused; its tags differ\. Change them with "
                            r"ledger\.tag\(\d, \.\.\.\)\.", text), segments


def test_cli_missing_folder_is_no_such_file_also_with_a_pattern(tmp_path, capsys, monkeypatch, no_key):
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--pattern", "{subject}_{timepoint}.jpg"], ["--tags", "tags.csv"]):
        assert main_cli(["analyze", "photos_t2", "--actions", "redness", "--dry-run", *extra]) == 2, extra
        out = capsys.readouterr().out
        assert f"error: No such file or folder: 'photos_t2'. Check the path (relative paths start at " \
               f"{str(tmp_path)!r})." in out, out
        assert "do not fit" not in out and "Rename" not in out and "tag sheet" not in out
    assert not (tmp_path / "skinlab-results").exists()  # refused before anything was set up


def test_cli_skips_sidecar_files_and_says_so_in_one_line(tmp_path, capsys, portraits, no_key):
    photos = tmp_path / "photos"
    _photo(photos, portraits, "S05_T0.jpg")
    for name in ("._S05_T0.jpg", ".DS_Store", "Thumbs.db"):
        (photos / name).write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")
    code = main_cli(["analyze", str(photos), "--actions", "redness", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    notes = [ln for ln in out.splitlines() if "Skipped" in ln]
    assert len(notes) == 1 and notes[0].startswith("note: Skipped 3 hidden or system file(s) in "), out
    assert "done 1," in out and "failed 0" in out and "== S05_T0.jpg: done" in out


def test_cli_subfolders_are_named_and_recursive_takes_them(tmp_path, capsys, portraits, no_key):
    nested = tmp_path / "nested"
    _photo(nested / "S01", portraits, "T0.jpg")
    _photo(nested / "S02", portraits, "T0.jpg", "grace_hopper")
    base = ["analyze", str(nested), "--actions", "redness", "--out", str(tmp_path / "out")]
    assert main_cli(base) == 2
    out = capsys.readouterr().out
    assert f"error: No .jpg, .jpeg or .png files in {str(nested)!r}; its subfolder(s) S01, S02 hold some, and the " \
           "search is not recursive. Add --recursive to include subfolders." in out, out
    sheet = tmp_path / "tags.csv"
    sheet.write_text("filename,subject,timepoint\nS01/T0.jpg,S01,T0\nS02/T0.jpg,S02,T0\n")
    assert main_cli(base + ["--recursive", "--tags", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "done 2," in out, out
    assert (tmp_path / "out" / "S01_T0" / "scores.csv").exists() and (tmp_path / "out" / "S02_T0").is_dir()
    subjects = _ledger_subjects(tmp_path / "out" / "ledger.sqlite")
    assert subjects == ["S01", "S02"]


def _ledger_subjects(path):
    with skinlab.Ledger(path) as ledger:
        return sorted(ledger.submissions().subject)


def test_cli_table_shows_a_dash_for_no_skin_type(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    assert main_cli(["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if "skin_type" in ln)
    rows = out.split(header + "\n", 1)[1].split("\n   ")[0].splitlines()
    assert rows and all(ln.split()[-1] == "-" for ln in rows), out
    assert "None" not in out


def test_cli_leaves_no_ledger_wal_or_shm_files(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    study = tmp_path / "study"
    assert main_cli(["analyze", str(photo), "--actions", "redness", "--ledger", str(study / "ledger.sqlite")]) == 0
    capsys.readouterr()
    assert (study / "ledger.sqlite").exists()
    assert not (study / "ledger.sqlite-wal").exists() and not (study / "ledger.sqlite-shm").exists()


def test_cli_advice_after_stopping_with_the_embedded_emulator():
    """The embedded emulator stops with the command: its running tasks cannot be collected later,
    and the advice says the next run analyses the photos again, free (not --base-url)."""
    from skinlab.batch import BatchItem, BatchReport
    from skinlab.cli import _cli_text
    from skinlab.ledger import _next_step

    row = {"id": 7, "status": "running", "error_code": None, "backend_key": "local", "base_url": "http://127.0.0.1:40000",
           "task_id": "T" * 40}
    step = _next_step(row)
    assert "--base-url" in _cli_text(step)              # a served emulator (skinlab serve) is still there
    embedded = _cli_text(step, embedded=True)
    assert "--base-url" not in embedded and "ledger.resume" not in embedded
    assert "the next run of the command analyses the photo again (local tasks are free)" in embedded
    report = BatchReport(items=[BatchItem(index=0, label="S01_T0.jpg", outcome="running")], backend="local",
                         base_url="http://127.0.0.1:40000")
    text = _cli_text(report.summary(), embedded=True)
    assert "left running 1" in text and "the next run analyses them again, free" in text
    assert "ledger.resume" not in text


def test_an_upside_down_photo_fails_with_advice_to_rotate_it(tmp_path):
    """A photo that lost its EXIF orientation used to pass upside down with wrong scores; the local
    engine now fails it as a head-angle error, and the advice says the photo may be turned."""
    from PIL import Image

    photo = tmp_path / "turned.jpg"
    skinlab.sample_portrait("astronaut", "sd").transpose(Image.Transpose.ROTATE_180).save(photo, quality=92)
    with skinlab.Client.local() as client:
        with pytest.raises(skinlab.errors.FaceAngleError, match="the photo itself is turned.*rotate it upright"):
            client.submit(photo, ["wrinkle"]).wait(60)
