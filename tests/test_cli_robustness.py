"""The command line when a new user's input or surroundings are not what it expects: a photo given
as the ledger, a busy port, a closed pipe, Ctrl-C, -v after the subcommand, WebP files in a folder,
the API key banner, an output name of another format, and the advice after a stop."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from test_end_to_end import _photo, no_key, portraits  # noqa: F401 - fixtures, reused

from skinlab.cli import build_parser, main

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to a child process")


def _env(**keys) -> dict:
    """The environment for a child ``python -m skinlab.cli``: no API key but ``keys``."""
    env = {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}
    env.update(keys)
    return env


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "skinlab.cli", *argv]


# ---------------------------------------------------------------------------- 1. --ledger that is not a ledger


def test_a_photo_given_as_the_ledger_is_a_clear_error(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    before = photo.read_bytes()
    code = main(["analyze", str(photo), "--actions", "redness", "--ledger", str(photo), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 2, out
    line = next(ln for ln in out.splitlines() if ln.startswith("error:"))
    assert line.startswith(f"error: --ledger {str(photo)!r} is not a skinlab ledger: it is not an SQLite database")
    assert "Give --ledger a new path (e.g. --ledger study/ledger.sqlite)" in line
    assert "Traceback" not in out and "DatabaseError" not in out
    assert photo.read_bytes() == before  # left untouched


def test_a_default_ledger_that_is_not_one_is_a_clear_error(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    ledger = tmp_path / "out" / "ledger.sqlite"
    ledger.parent.mkdir()
    ledger.write_text("these are my notes, not a database\n" * 20)
    code = main(["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 2, out
    assert f"error: the ledger {str(ledger)!r} (the default one, in the results folder) is not a skinlab ledger" in out
    assert "Traceback" not in out


def test_a_folder_given_as_the_ledger_is_a_clear_error(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    code = main(["analyze", str(photo), "--actions", "redness", "--ledger", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 2, out
    assert f"error: --ledger {str(tmp_path)!r} is a folder, not a ledger file. Give --ledger a new path" in out
    assert "OperationalError" not in out


# ---------------------------------------------------------------------------- 2. skinlab serve --port


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "eighty"])
def test_serve_refuses_a_port_out_of_range(capsys, port):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", port])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --port: the port must be a whole number from 0 to 65535 (0 picks a free one), not {port!r}" \
           in err
    assert "OverflowError" not in err and "Traceback" not in err


def test_serve_and_app_accept_the_port_range():
    parser = build_parser()
    assert parser.parse_args(["serve", "--port", "0"]).port == 0
    assert parser.parse_args(["serve", "--port", "65535"]).port == 65535
    assert parser.parse_args(["serve"]).port == 8765
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "--port", "70000"])


def test_serve_on_a_busy_port_names_it_and_suggests_another(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--port", str(port), "--task-duration", "0"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.startswith(f"error: port {port} on 127.0.0.1 is already in use")
    assert "--port 0 to pick a free one" in out and "OSError" not in out and "Address already in use" not in out


# ---------------------------------------------------------------------------- 3. a closed stdout


class _ClosedPipe:
    """A stdout whose reader has gone (``skinlab actions | head`` once head has exited)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_closed_stdout_stops_quietly_in_process(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["actions"]) == 141
    assert capsys.readouterr().err == ""


def test_closed_pipe_stops_quietly_with_141():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first line: every write meets a closed pipe
    try:
        proc = subprocess.run(_cli("actions"), stdout=write_end, stderr=subprocess.PIPE, text=True, env=_env(),
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit


# ---------------------------------------------------------------------------- 4. and 9. Ctrl-C


def _interrupt_waits(monkeypatch, times: int) -> None:
    """The batch's first ``times`` waits raise KeyboardInterrupt, as Ctrl-C there would."""
    import skinlab.batch as batch

    real, calls = batch.wait, []

    def wait(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "wait", wait)


@pytest.mark.parametrize("presses", [1, 2])  # 2: again during the clean stop
def test_interrupted_embedded_run_exits_130_and_its_advice_agrees(tmp_path, capsys, monkeypatch, portraits, no_key,
                                                                   presses):
    _interrupt_waits(monkeypatch, presses)
    photo = _photo(tmp_path, portraits)
    code = main(["analyze", str(photo), "--actions", "redness", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 130, captured.out
    stopped = next(ln for ln in captured.out.splitlines() if "stopped early:" in ln)
    assert stopped.startswith("  stopped early: interrupted (Ctrl-C)")
    # the embedded emulator stops with the command: the next run analyses them again, it collects nothing
    assert "collects them" not in stopped and "ledger.resume" not in stopped
    assert stopped.endswith("tasks already created were in this command's embedded local emulator, which stops "
                            "with it: the next run analyses them again, free"), stopped
    assert "Traceback" not in captured.out + captured.err


def test_stopped_early_wording_keeps_collect_advice_for_a_served_emulator():
    from skinlab.cli import _cli_text

    text = ("stopped early: interrupted (Ctrl-C): ... tasks already created are kept running, and "
            "ledger.resume(client) or the next run collects them")
    assert _cli_text(text).endswith("tasks already created are kept running, and running the same command again "
                                    "collects them")
    assert _cli_text(text, embedded=True).endswith("the next run analyses them again, free")


@pytest.fixture
def slow_polls():
    """An emulator whose tasks run a minute and whose every poll takes 3 s: a run is under way, and
    its images in flight take a while to stop."""
    from skinlab.local import serve
    from skinlab.local.server import Faults

    faults = Faults()
    faults.slow(route="poll", seconds=3.0, n=10_000)
    with serve(task_duration_s=60.0, rate_limit=None, faults=faults) as srv:
        yield srv


@contextlib.contextmanager
def _killed_at_the_end(proc: subprocess.Popen):
    """``proc``, killed (and reaped) on the way out if it is still running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _analysis_under_way(tmp_path, portraits, srv) -> subprocess.Popen:
    photo = _photo(tmp_path, portraits)
    proc = subprocess.Popen(_cli("analyze", str(photo), "--actions", "redness", "--base-url", srv.url, "--out",
                                 str(tmp_path / "out")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.monotonic() + 120
    while not srv.app.task_ids():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no task was created"
        time.sleep(0.05)
    time.sleep(0.5)  # its first poll is under way (each takes 3 s)
    return proc


def _read_until(stream, start: str) -> str:
    """The lines read from ``stream`` up to the first that starts with ``start``, joined."""
    lines: list[str] = []
    while not lines or not lines[-1].startswith(start):
        line = stream.readline()
        assert line, f"the stream ended before a line starting {start!r}: {''.join(lines)}"
        lines.append(line)
    return "".join(lines)


@posix_only
def test_ctrl_c_once_analysis_is_under_way_exits_130(tmp_path, portraits, slow_polls):
    with _killed_at_the_end(_analysis_under_way(tmp_path, portraits, slow_polls)) as proc:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "  stopped early: interrupted (Ctrl-C)" in out and "left running 1" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@posix_only
def test_ctrl_c_again_during_the_clean_stop_exits_130_without_traceback(tmp_path, portraits, slow_polls):
    with _killed_at_the_end(_analysis_under_way(tmp_path, portraits, slow_polls)) as proc:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # cuts the batch's wait short: the summary comes at once
        summary = _read_until(proc.stdout, "  ledger:")
        assert "  stopped early: interrupted (Ctrl-C)" in summary
        # the command is over, but its image is still in a 3 s poll, which the process waits for on its
        # way out (Python joins the batch's threads at exit): Ctrl-C there
        said = _read_until(proc.stderr, "note: waiting for 1 image(s) in flight to stop at their next step; "
                                        "Ctrl-C again to quit now.")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    err = said + err
    assert proc.returncode == 130, summary + out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Exception ignored" not in err, err
    assert err.endswith("Ctrl-C again to quit now.\ninterrupted\n"), err


# ---------------------------------------------------------------------------- 5. -v


@pytest.mark.parametrize("argv, verbose", [
    (["-v", "analyze", "face.jpg"], True),
    (["analyze", "face.jpg", "-v"], True),
    (["analyze", "--verbose", "face.jpg"], True),
    (["-v", "analyze", "face.jpg", "-v"], True),
    (["analyze", "face.jpg"], False),
    (["actions", "-v"], True),
    (["serve", "-v", "--port", "0"], True),
    (["sample", "astronaut", "-v"], True),
])
def test_verbose_is_accepted_before_and_after_the_subcommand(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_verbose_help_says_what_it_shows():
    import argparse

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in [parser, subparsers.choices["analyze"]]:
        text = " ".join(p.format_help().split())
        assert "pre-flight changes" in text and "HTTP requests are not logged" in text
        assert "HTTP and pre-flight details" not in text


def test_verbose_after_the_subcommand_logs(tmp_path, portraits, local_server):
    photo = _photo(tmp_path, portraits)
    base = ["analyze", str(photo), "--actions", "redness", "--dry-run", "--base-url", local_server.url]
    for n, argv in enumerate([base + ["-v"], ["-v"] + base, base]):
        proc = subprocess.run(_cli(*argv, "--out", str(tmp_path / f"out{n}")), capture_output=True, text=True,
                              env=_env(SKINLAB_API_KEY="robust-verbose"), timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert ("Created a new, empty ledger at" in proc.stderr) is ("-v" in argv), (argv, proc.stderr)


# ---------------------------------------------------------------------------- 6. other image types in a folder


def test_folder_of_only_webp_and_gif_says_so(tmp_path, capsys, portraits, no_key):
    photos = tmp_path / "photos"
    photos.mkdir()
    with Image.open(_photo(tmp_path, portraits)) as img:
        img.save(photos / "a.webp")
        img.save(photos / "b.gif")
    (photos / "notes.txt").write_text("not an image")
    code = main(["analyze", str(photos), "--actions", "redness", "--dry-run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 2, out
    assert f"error: No .jpg, .jpeg or .png files in {str(photos)!r}: its 2 image file(s) are of other types " \
           "(a.webp, b.gif), which the service does not take. Convert them to JPEG or PNG" in out, out
    assert not (tmp_path / "out").exists()


def test_other_image_types_beside_photos_get_one_note(tmp_path, capsys, portraits, no_key):
    photos = tmp_path / "photos"
    _photo(photos, portraits, "S01_T0.jpg")
    for name in ("S02_T0.heic", "S03_T0.TIFF", "S04_T0.bmp", "S05_T0.webp", ".hidden.webp"):
        (photos / name).write_bytes(b"not really")
    code = main(["analyze", str(photos), "--actions", "redness", "--dry-run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    notes = [ln for ln in out.splitlines() if "not JPEG or PNG" in ln]
    assert notes == [f"note: Skipped 4 file(s) in {str(photos)!r} that are not JPEG or PNG (S02_T0.heic, "
                     "S03_T0.TIFF, S04_T0.bmp, ...): the service takes only JPEG and PNG; convert them to JPEG or "
                     "PNG to analyse them too."], out
    assert "would submit 1 image(s)" in out


def test_folder_with_only_jpegs_has_no_note(tmp_path, capsys, portraits, no_key):
    photos = tmp_path / "photos"
    _photo(photos, portraits, "S01_T0.jpg")
    assert main(["analyze", str(photos), "--actions", "redness", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "not JPEG or PNG" not in capsys.readouterr().out


# ---------------------------------------------------------------------------- 7. the API key banner


def _banner(out: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith("Backend:"))


def test_banner_says_the_key_is_sent_to_a_local_base_url(tmp_path, capsys, monkeypatch, portraits, local_server):
    monkeypatch.setenv("SKINLAB_API_KEY", "robust-banner-key")
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    photo = _photo(tmp_path, portraits)
    before = len(local_server.app.task_ids("robust-banner-key"))
    code = main(["analyze", str(photo), "--actions", "redness", "--base-url", local_server.url,
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    banner = _banner(out)
    assert banner.startswith(f"Backend: LOCAL engine at {local_server.url} (a local --base-url given; the API key "
                             "in SKINLAB_API_KEY is sent to it).")  # not embedded: a server of its own
    assert "not used" not in banner
    assert len(local_server.app.task_ids("robust-banner-key")) == before + 1  # it was sent: the task is its own


def test_banner_names_youcam_api_key_when_that_is_the_one(tmp_path, capsys, monkeypatch, portraits, local_server):
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.setenv("YOUCAM_API_KEY", "robust-banner-youcam")
    photo = _photo(tmp_path, portraits)
    assert main(["analyze", str(photo), "--actions", "redness", "--dry-run", "--base-url", local_server.url,
                 "--out", str(tmp_path / "out")]) == 0
    assert "the API key in YOUCAM_API_KEY is sent to it" in _banner(capsys.readouterr().out)


def test_banner_without_a_key(tmp_path, capsys, portraits, local_server, no_key):
    photo = _photo(tmp_path, portraits)
    argv = ["analyze", str(photo), "--actions", "redness", "--dry-run", "--out", str(tmp_path / "out")]
    assert main(argv + ["--base-url", local_server.url]) == 0
    assert "(a local --base-url given; no API key set, so none is sent)" in _banner(capsys.readouterr().out)
    assert main(argv) == 0
    assert re.match(r"Backend: LOCAL embedded engine at http://127\.0\.0\.1:\d+ \(no API key set\)\.",
                    _banner(capsys.readouterr().out))


def test_banner_with_local_and_a_key(tmp_path, capsys, monkeypatch, portraits):
    monkeypatch.setenv("SKINLAB_API_KEY", "robust-banner-local")
    photo = _photo(tmp_path, portraits)
    assert main(["analyze", str(photo), "--actions", "redness", "--dry-run", "--local",
                 "--out", str(tmp_path / "out")]) == 0
    banner = _banner(capsys.readouterr().out)
    assert "(--local given; the API key in SKINLAB_API_KEY is not used)" in banner


def test_the_embedded_engine_never_receives_the_users_key(monkeypatch):
    """What the --local banner says: Client.local() sends its own token, not the key in the
    environment (an embedded engine that accepts only that token answers it)."""
    from skinlab import errors
    from skinlab.client import LOCAL_TOKEN, Client

    monkeypatch.setenv("SKINLAB_API_KEY", "robust-never-sent")
    with Client.local(api_keys=[LOCAL_TOKEN]) as client:
        assert client.backend == "local"
        client.balance()  # a 401 here would mean the environment's key was sent
    with Client.local(api_keys=["robust-never-sent"]) as client:
        with pytest.raises(errors.AuthenticationError, match="This is a local server: it accepts only the keys"):
            client.balance()
    with Client.local(api_keys=["robust-chosen"], api_key="robust-chosen") as client:
        client.balance()  # a key chosen on purpose is sent
    # connect(), which --local uses, sends no user key either
    import skinlab.client as client_mod

    with client_mod.connect(local=True) as shared:
        app = client_mod._shared_server.app
        seen = []
        real = app._authenticate
        app._authenticate = lambda req: seen.append(req.header("Authorization")) or real(req)
        try:
            shared.balance()
        finally:
            del app._authenticate
        assert seen == [f"Bearer {LOCAL_TOKEN}"]


# ---------------------------------------------------------------------------- 8. skinlab sample -o


@pytest.mark.parametrize("name", ["x.webp", "x.gif", "x"])
def test_sample_refuses_a_name_of_another_format(tmp_path, capsys, name):
    path = tmp_path / name
    assert main(["sample", "astronaut", "-o", str(path)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: cannot write {str(path)!r} as ")
    assert f"writes JPEG (.jpg, .jpeg) or PNG (.png), the formats the service takes. Name the output " \
           f"{tmp_path / 'x.jpg'} or {tmp_path / 'x.png'}." in out
    assert not path.exists()


@pytest.mark.parametrize("name, fmt", [("x.png", "PNG"), ("x.JPEG", "JPEG"), ("x.jpg", "JPEG")])
def test_sample_writes_the_format_its_name_says(tmp_path, capsys, name, fmt):
    path = tmp_path / name
    assert main(["sample", "astronaut", "-o", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    with Image.open(path) as img:
        assert img.format == fmt and img.size == (600, 800)


def test_a_dry_run_creates_no_ledger_and_no_folder(tmp_path, capsys, portraits, no_key):
    """A dry run changes nothing: with a ledger that does not exist yet it says so and leaves no
    file or folder behind (it used to create the ledger and its parent folders)."""
    photo = _photo(tmp_path, portraits)
    ledger = tmp_path / "new" / "study" / "ledger.sqlite"
    assert main(["analyze", str(photo), "--actions", "redness", "--dry-run", "--ledger", str(ledger)]) == 0
    out = capsys.readouterr().out
    assert f"note: {str(ledger)!r} does not exist yet, so nothing is recorded; the dry run does not create it." in out
    assert "would submit 1 image(s)" in out
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- 10. skinlab's own output in a folder


def test_recursive_folder_scan_skips_skinlab_own_result_folders(tmp_path, capsys, portraits, no_key):
    """FOLDER --recursive with the ledger, its results/ and the per-photo result folders inside it: the
    masks and resize_image.jpg there are skinlab's output, not faces, and are not planned again."""
    study = tmp_path / "study"
    _photo(study / "S01", portraits, "T0.jpg")
    _photo(study / "S02", portraits, "T0.jpg", which="grace_hopper")
    ledger = study / "ledger.sqlite"
    base = ["analyze", str(study), "--recursive", "--actions", "redness", "--ledger", str(ledger)]
    assert main(base) == 0, capsys.readouterr().out
    capsys.readouterr()
    # what the first run wrote inside the folder: per-photo folders and the ledger's results/
    written = sorted(p.relative_to(study).as_posix() for p in study.rglob("*.*")
                     if p.suffix in (".jpg", ".png") and p.parent.name not in ("S01", "S02"))
    assert any(w.startswith("S01_T0/") and w.endswith("_output.png") for w in written), written
    assert any(w.startswith("S01_T0/") and w.endswith("resize_image.jpg") for w in written), written
    assert (study / "S01_T0" / "result.json").exists() and (study / "results").is_dir()
    assert main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would submit 0 image(s), reuse 2 recorded" in out, out
    note = next(ln for ln in out.splitlines() if ln.startswith("note: Skipped") and "result folder" in ln)
    assert note.startswith(f"note: Skipped 3 skinlab result folder(s) in {str(study)!r} (S01_T0, S02_T0, "
                           "results): skinlab's own output"), note
    assert "resize_image" not in out.split(note)[1] and "_output.png" not in out.split(note)[1]


# ---------------------------------------------------------------------------- 11. credentials in --base-url


def test_credentials_in_the_base_url_are_never_printed(tmp_path, capsys, portraits, local_server, no_key):
    photo = _photo(tmp_path, portraits)
    url = local_server.url.replace("http://", "http://me:secret@")
    hidden = local_server.url  # the credentials are dropped from the URL shown
    for extra in (["--dry-run"], []):
        code = main(["analyze", str(photo), "--actions", "redness", "--base-url", url, "--out",
                     str(tmp_path / "out"), *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.out
        assert "secret" not in captured.out + captured.err and "me:" not in captured.out
        assert _banner(captured.out).startswith(f"Backend: LOCAL engine at {hidden} (")
        assert f"on the LOCAL backend ({hidden})" in captured.out, captured.out


def test_every_line_the_command_writes_hides_url_credentials(capsys):
    from skinlab.cli import _print

    _print("error: cannot reach https://user:p%40ss@example.com/v2 (and http://a@b:1); user@example.com stays")
    assert capsys.readouterr().out == ("error: cannot reach https://***@example.com/v2 (and http://***@b:1); "
                                       "user@example.com stays\n")


# ---------------------------------------------------------------------------- 12. a dry run's scratch ledger


def test_a_dry_run_names_the_intended_ledger_not_its_scratch_one(tmp_path, capsys, portraits, no_key):
    photo = _photo(tmp_path, portraits)
    ledger = tmp_path / "new" / "ledger.sqlite"
    assert main(["analyze", str(photo), "--actions", "redness", "--dry-run", "--ledger", str(ledger)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == f"  ledger: {ledger} (does not exist yet; the dry run did not create it)"
    assert "skinlab-dry-run-" not in out
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- 13. one file given twice


def test_a_photo_given_twice_is_analysed_once(tmp_path, capsys, portraits, no_key, monkeypatch):
    dup = tmp_path / "dup"
    _photo(dup, portraits, "S01_T0.jpg")
    _photo(dup, portraits, "S02_T0.jpg", which="grace_hopper")
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    code = main(["analyze", "dup/", "dup/S02_T0.jpg", str(dup / "S01_T0.jpg"), "--actions", "redness", "--out",
                 str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "note: Skipped 2 photo(s) given more than once (dup/S02_T0.jpg, " in out, out
    assert out.count("== S02_T0.jpg:") == 1 and out.count("== S01_T0.jpg:") == 1, out
    assert "done 2, reused 0" in out
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name.startswith("S0")) == ["S01_T0", "S02_T0"]


# ---------------------------------------------------------------------------- 14. analysed again, said once


from test_batch import ABANDON_CHILD as _ABANDON  # noqa: E402 - one child script for both files


@posix_only
def test_the_rerun_after_a_stop_says_why_it_analysed_again_once(tmp_path, capsys, portraits, no_key):
    photos = [_photo(tmp_path / "photos", portraits, "S01_T0.jpg"),
              _photo(tmp_path / "photos", portraits, "S02_T0.jpg", which="grace_hopper")]
    ledger = tmp_path / "study" / "ledger.sqlite"
    child = subprocess.run([sys.executable, "-c", _ABANDON, str(ledger), *map(str, photos)], capture_output=True,
                           text=True, env=_env(), timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    code = main(["analyze", str(tmp_path / "photos"), "--actions", "redness", "--ledger", str(ledger)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = next(ln for ln in out.splitlines() if ln.startswith("  analysed again 2: "))
    why = summary.removeprefix("  analysed again 2: ")
    assert why.startswith("its task was in another local emulator"), summary
    assert out.count(why) == 1, out  # once, in the summary
    assert out.count("\n   analysed again (local, free): why is in the summary below\n") == 2, out


# ---------------------------------------------------------------------------- 15. one word for an outcome


def test_interrupted_photos_are_not_started_in_their_lines_and_the_summary(tmp_path, capsys, monkeypatch, portraits,
                                                                           no_key):
    _interrupt_waits(monkeypatch, 1)
    for i in range(3):
        _photo(tmp_path / "photos", portraits, f"S0{i}_T0.jpg", which=("astronaut", "grace_hopper")[i % 2])
    code = main(["analyze", str(tmp_path / "photos"), "--actions", "redness", "--workers", "1", "--out",
                 str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 130, out
    lines = [ln for ln in out.splitlines() if ln.startswith("== ")]
    not_started = [ln for ln in lines if ln.endswith(": not started (interrupted)")]
    assert not_started and not any(ln.endswith(": interrupted") for ln in lines), out
    assert f", not started {len(not_started)}" in out, out


def test_a_dry_run_says_a_greyscale_photo_will_fail_as_the_run_then_says(tmp_path, capsys, portraits, no_key):
    grey = tmp_path / "grey.jpg"
    with Image.open(_photo(tmp_path, portraits)) as img:
        img.convert("L").save(grey)
    base = ["analyze", str(grey), "--actions", "redness", "--out", str(tmp_path / "out")]
    assert main(base + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "recorded, fail 1 (pre-flight problems: the run records them as failed" in plan, plan
    assert "  - grey.jpg: would fail: 'grey.jpg' is a greyscale photo" in plan, plan
    assert main(base) == 1
    run = capsys.readouterr().out
    assert "== grey.jpg: failed" in run and "failed 1" in run, run


# ---------------------------------------------------------------------------- 16. BrokenPipeError, narrowly


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    """A BrokenPipeError from elsewhere (a socket, a child's pipe) is not a closed stdout: main does
    not swallow it as exit 141."""
    import skinlab.cli as cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a socket)")

    monkeypatch.setattr(cli, "_cmd_actions", broken)
    with pytest.raises(BrokenPipeError, match="a socket"):
        main(["actions"])


class _ClosedPipeWithFd(_ClosedPipe):
    """A closed stdout with a file descriptor (a stand-in for fd 1, here a file of the test's)."""

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


@posix_only
def test_a_broken_pipe_raised_outside_the_commands_lines_is_still_told_by_stdout(monkeypatch):
    """Raised by a write that is not one of the command's own lines, while stdout's reader has gone
    (the failed write dropped what it held, so stdout flushes fine): its descriptor tells."""
    import skinlab.cli as cli

    read_end, write_end = os.pipe()
    os.close(read_end)

    class Stdout:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return write_end

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_actions", broken)
    monkeypatch.setattr(sys, "stdout", Stdout())
    try:
        assert main(["actions"]) == 141
    finally:
        os.close(write_end)


def test_main_called_from_python_leaves_the_callers_fd_alone(tmp_path, monkeypatch):
    with open(tmp_path / "stdout.txt", "wb") as fh:
        before = os.fstat(fh.fileno())
        monkeypatch.setattr(sys, "stdout", _ClosedPipeWithFd(fh.fileno()))
        assert main(["actions"]) == 141
        after = os.fstat(fh.fileno())
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # not pointed at /dev/null


# ---------------------------------------------------------------------------- 17. the SIGINT handler


@pytest.mark.parametrize("extra", [["--dry-run"], ["--tags", "t.csv", "--pattern", "{subject}.jpg"]])
def test_main_as_the_program_puts_the_sigint_handler_back(tmp_path, capsys, monkeypatch, portraits, no_key, extra):
    photo = _photo(tmp_path, portraits)
    monkeypatch.setattr(sys, "argv", ["skinlab", "analyze", str(photo), "--actions", "redness", "--out",
                                      str(tmp_path / "out"), *extra])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()  # argv None: as the skinlab script calls it
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_photos_of_one_name_from_two_folders_keep_their_folders_in_any_order(tmp_path, capsys, portraits, no_key):
    """a/face.jpg and b/face.jpg used to be written to face/ and face-2/ in the order given, so a
    re-run in the other order swapped them, and both headers read "face.jpg"."""
    a = _photo(tmp_path / "a", portraits, "face.jpg")
    b = _photo(tmp_path / "b", portraits, "face.jpg", which="grace_hopper")
    out = tmp_path / "out"
    runs = []
    for order in ([a, b], [b, a]):
        assert main(["analyze", *map(str, order), "--actions", "redness", "--out", str(out)]) == 0
        text = capsys.readouterr().out
        assert "\n== a/face.jpg: " in text and "\n== b/face.jpg: " in text, text
        assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.endswith("face")) == ["a_face", "b_face"]
        runs.append({d: json.loads((out / d / "result.json").read_text())["task_id"] for d in ("a_face", "b_face")})
    assert runs[0] == runs[1] and runs[0]["a_face"] != runs[0]["b_face"]  # each folder keeps its photo's result


def test_another_programs_database_as_the_ledger_is_a_clear_error(tmp_path, capsys, portraits, no_key):
    import sqlite3

    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()
    before = other.read_bytes()
    photo = _photo(tmp_path, portraits)
    assert main(["analyze", str(photo), "--actions", "redness", "--ledger", str(other)]) == 2
    out = capsys.readouterr().out
    assert "is not a skinlab ledger: it is another program's SQLite database (tables: notes)" in out
    assert other.read_bytes() == before
