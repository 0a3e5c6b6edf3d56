"""Batch runs on the local backend: rate limit, faults, reuse, the spending guard, Ctrl-C, kill -9."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pandas as pd
import pytest
from PIL import Image, ImageEnhance

import skinlab
from skinlab import errors
from skinlab.batch import analyze_many, collect_images
from skinlab.client import Client, PollSchedule, RetryPolicy
from skinlab.ledger import Ledger
from skinlab.samples import sample_portrait

FAST = PollSchedule(first=0.02, factor=1.5, cap=0.2, minimum=0.01)
NO_SLEEP_RETRY = RetryPolicy(base=0.01, cap=0.05)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six distinct portraits (brightness variants of the two samples) and one photo the service rejects."""
    folder = tmp_path_factory.mktemp("cohort")
    for name, short in (("astronaut", "astronaut"), ("grace_hopper", "hopper")):
        base = sample_portrait(name, "sd")
        for i, factor in enumerate((0.95, 1.0, 1.05)):
            ImageEnhance.Brightness(base).enhance(factor).save(folder / f"{short}_t{i}.jpg", quality=92)
    sample_portrait("astronaut", crop=False).save(folder / "zz_uncropped.jpg", quality=92)
    return folder


def _client(server, key="batch-key", **kw):
    return Client(key, base_url=server.url, poll_schedule=FAST, retry=NO_SLEEP_RETRY, rate_limiter=False, **kw)


def test_collect_images(cohort, tmp_path):
    assert [p.name for p in collect_images(cohort)][:2] == ["astronaut_t0.jpg", "astronaut_t1.jpg"]
    assert len(collect_images(cohort)) == 7
    with pytest.raises(errors.InvalidParametersError, match="No .jpg"):
        collect_images(tmp_path)


def test_collect_images_skips_hidden_and_system_files(tmp_path):
    from skinlab.batch import scan_folder

    for name in ("S05_T0.jpg", "._S05_T0.jpg", ".DS_Store", "Thumbs.db", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_images(tmp_path)] == ["S05_T0.jpg"]
    line = scan_folder(tmp_path).skipped_line(tmp_path)
    assert line.startswith(f"Skipped 4 hidden or system file(s) in {str(tmp_path)!r} (") and "\n" not in line
    only = tmp_path / "only"
    only.mkdir()
    (only / "._S01_T0.jpg").write_bytes(b"x")
    with pytest.raises(errors.InvalidParametersError, match=r"only hidden or system files, skipped: ._S01_T0.jpg"):
        collect_images(only)


def test_collect_images_names_subfolders_and_recursive_takes_them(tmp_path):
    for rel in ("S01/T0.jpg", "S01/T1.jpg", "S02/T0.png", "S02/._T0.png", ".trash/S09.jpg", "notes/readme.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    with pytest.raises(errors.InvalidParametersError) as info:
        collect_images(tmp_path)
    assert str(info.value) == (f"No .jpg, .jpeg or .png files in {str(tmp_path)!r}; its subfolder(s) S01, S02 hold "
                               "some, and the search is not recursive. Pass recursive=True to include subfolders.")
    found = collect_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["S01/T0.jpg", "S01/T1.jpg", "S02/T0.png"]


def test_batch_records_all_and_rerun_creates_no_task(cohort, tmp_path):
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "study" / "ledger.sqlite")
        pattern = skinlab.tags.FilenamePattern("{subject}_{timepoint}.jpg")
        report = analyze_many(cohort, "redness,wrinkle", ledger=ledger, client=client, tags=pattern,
                              progress=False, max_workers=3)
        assert report.count("done") == 6 and report.count("failed") == 1
        assert report.failures == {"error_src_face_too_small": 1}
        assert report.units_spent == 6 * 9
        assert "LOCAL" in report.summary() and "failed with error_src_face_too_small: 1" in report.summary()
        subs = ledger.submissions()
        assert len(subs) == 7
        assert set(subs.subject) == {"astronaut", "hopper", "zz"}
        assert set(subs.timepoint) == {"t0", "t1", "t2", "uncropped"}
        created = len(server.app.task_ids())
        again = analyze_many(cohort, "redness,wrinkle", ledger=ledger, client=client, progress=False)
        assert again.count("reused") == 6 and again.units_spent == 0
        # the rejected photo is tried again (a failed task is free), the six successes are not
        assert len(server.app.task_ids()) - created == 1


def _counting_429s():
    """A requests session that counts the HTTP 429 answers it receives (the emulator keeps no such count)."""
    import requests

    session = requests.Session()
    seen = []
    session.hooks["response"].append(lambda resp, *a, **kw: seen.append(resp.url) if resp.status_code == 429 else None)
    return session, seen


def test_low_rate_limit_no_429_reaches_user(cohort, tmp_path):
    """The client's limiter, set below the service's limit, keeps every request within it: the
    service never answers 429 (so no retry is even needed), and the batch completes."""
    from skinlab.client import RateLimiter

    session, seen_429 = _counting_429s()
    with skinlab.local.serve(task_duration_s=0, rate_limit=12, rate_window_s=1.0) as server:
        limiter = RateLimiter(limit=9, window=1.0)  # the service allows 12 per second
        with Client("rl-key", base_url=server.url, poll_schedule=FAST, session=session, rate_limiter=limiter,
                    retry=RetryPolicy(base=0.2, cap=1.0, max_retries_429=8)) as client:
            assert client.rate_limiter is limiter
            t0 = time.monotonic()
            report = analyze_many(sorted(cohort.glob("astronaut_*.jpg")), "redness", ledger=tmp_path / "l.sqlite",
                                  client=client, progress=False, max_workers=3)
        assert report.count("done") == 3, report.summary()
        assert seen_429 == [], f"the service answered 429 {len(seen_429)} times: the limiter let too much through"
        assert limiter._times and time.monotonic() - t0 < 60  # the limiter was used, and the run did not stall


def test_injected_429_bursts_and_5xx(cohort, tmp_path):
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        server.faults.rate_limit(4).fail("poll", n=2, status=503)
        report = analyze_many(sorted(cohort.glob("hopper_*.jpg")), "redness", ledger=tmp_path / "l.sqlite",
                              client=client, progress=False, max_workers=2)
        assert report.count("done") == 3, report.summary()
        assert server.faults.pending() == 0  # every injected 429 and 503 was really served


def test_429_on_the_upload_slot_past_the_retries_requeues_the_image(cohort, tmp_path):
    """A 429 burst on the upload-slot route longer than the client's retry budget (6 attempts):
    no task exists yet, so the image is tried again after a pause instead of failing."""
    photos = sorted(cohort.glob("hopper_*.jpg"))[:2]
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        assert client.retry.max_retries_429 + 1 < 8
        server.faults.rate_limit(8, route="upload")
        ledger = Ledger(tmp_path / "l.sqlite")
        report = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False, max_workers=1)
        assert report.count("done") == 2 and report.count("failed") == 0, report.summary()
        assert server.faults.pending() == 0 and len(server.app.task_ids()) == 2
        refused = ledger.submissions(status="error")
        assert len(refused) == 1 and refused.iloc[0].units_charged == 0 and refused.iloc[0].task_id is None
        assert "No task was created" in refused.iloc[0].error_message
        # bounded: a 429 that never ends fails the image after a few tries, nothing billed
        server.faults.rate_limit(1000, route="upload")
        report = analyze_many(sorted(cohort.glob("hopper_*.jpg"))[2:], "redness", ledger=ledger, client=client,
                              progress=False)
        server.faults.clear()
        assert report.count("failed") == 1 and report.failures == {"RateLimitError": 1}, report.summary()
        assert "Tried 4 times; nothing was billed" in report.items[0].error
        assert len(server.app.task_ids()) == 2


def test_5xx_on_create_makes_that_image_ambiguous_and_the_rest_complete(cohort, tmp_path):
    photos = sorted(cohort.glob("hopper_*.jpg"))
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        server.faults.fail("create", n=1, status=500)
        ledger = Ledger(tmp_path / "l.sqlite")
        report = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False, max_workers=1)
        assert server.faults.pending() == 0
        assert report.count("done") == 2 and len(server.app.task_ids()) == 2, report.summary()
        (item,) = report.ambiguous
        assert item.label == "hopper_t0.jpg" and item.status == "ambiguous" and item.units == 9
        assert ledger.get(item.submission_id).status == "ambiguous"
        assert report.units_spent == 18 and report.units_at_risk == 9
        summary = report.summary()
        assert ("  ambiguous 1 (may be billed up to 9 units; never re-sent: see next_step in "
                "ledger.submissions(status='ambiguous'), then ledger.resolve)") in summary, summary
        assert "failed with" not in summary and report.failures == {}
        assert "hopper_t0.jpg: " in summary and "ledger.resolve(" in item.error  # its next step
        again = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False, max_workers=2)
        assert again.count("reused") == 2 and len(again.ambiguous) == 1  # never re-sent
        assert len(server.app.task_ids()) == 2


def test_max_units_counts_only_images_that_create_a_task(cohort, tmp_path):
    photos = sorted(cohort.glob("*_t*.jpg"))[:4]
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        assert analyze_many(photos, "redness", ledger=ledger, client=client, progress=False).count("done") == 4
        # all four are recorded: re-running them under a cap of one task reuses all four
        again = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False, max_workers=4,
                             max_units=9)
        assert again.count("reused") == 4 and again.count("skipped") == 0, again.summary()
        assert len(server.app.task_ids()) == 4
        # a task that fails unbilled gives its units back: the next image still fits under the cap
        mixed = [cohort / "zz_uncropped.jpg", sorted(cohort.glob("hopper_*.jpg"))[-1]]
        report = analyze_many(mixed, "redness", ledger=ledger, client=client, progress=False, max_workers=1,
                              max_units=9)
        assert [i.outcome for i in report.items] == ["failed", "done"], report.summary()
        assert report.units_spent == 9


def test_dry_run_holds_back_ambiguous_and_running_at_no_cost_and_applies_max_units(cohort, tmp_path):
    import warnings

    photos = sorted(cohort.glob("*.jpg"))  # astronaut t0-t2, hopper t0-t2, zz_uncropped
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ledger.submit(client, photos[0], ["redness"]).status == "success"
            server.faults.lose_create_response(1)
            assert ledger.submit(client, photos[1], ["redness"]).status == "ambiguous"
            assert ledger.submit(client, photos[2], ["redness"], wait=False).status == "running"
        tasks = len(server.app.task_ids())
        plan = analyze_many(photos, "redness", ledger=ledger, client=client, dry_run=True, max_units=27,
                            progress=False)
        assert len(server.app.task_ids()) == tasks  # nothing was sent
        assert [i.outcome for i in plan.items] == ["reused", "held", "held", "planned", "planned", "planned",
                                                   "skipped"]
        assert [i.reason for i in plan.items[1:3]] == ["ambiguous", "running"]
        assert [i.units for i in plan.items] == [0, 0, 0, 9, 9, 9, 0]
        assert plan.units_estimated == 27 and plan.items[6].reason == "max_units"
        summary = plan.summary()
        assert "would submit 3 image(s), reuse 1 recorded, skip 1" in summary, summary
        assert "held back 2 (0 units: the ledger already has them ambiguous 1, running 1" in summary
        assert "estimated cost 27 units" in summary
        listed = summary.split("would send:\n")[1].splitlines()[:4]
        assert listed[:3] == ["    hopper_t0.jpg: 9 units", "    hopper_t1.jpg: 9 units", "    hopper_t2.jpg: 9 units"]
        assert "zz_uncropped.jpg: 9 units" not in summary and "max_units=27" in summary
        # the real run does what the dry run said
        report = analyze_many(photos, "redness", ledger=ledger, client=client, max_units=27, progress=False,
                              max_workers=1)
        assert [i.outcome for i in report.items] == ["reused", "failed", "reused", "done", "done", "done",
                                                     "skipped"], report.summary()
        assert report.units_spent == plan.units_estimated and len(report.ambiguous) == 1
        assert len(server.app.task_ids()) == tasks + 3


def test_max_units_goes_to_the_images_in_input_order_as_the_dry_run_lists_them(cohort, tmp_path):
    """Several workers: the first images in input order get the units, whichever worker is fastest
    (here the first two images are the slowest to prepare), so the real run sends what the dry run listed."""
    photos = sorted(cohort.glob("*_t*.jpg"))[:4]  # astronaut t0-t2, hopper t0: 9 units each
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        plan = analyze_many(photos, "redness", ledger=ledger, client=client, dry_run=True, max_units=18,
                            progress=False)
        assert [i.outcome for i in plan.items] == ["planned", "planned", "skipped", "skipped"]
        real_plan = client.plan

        def slow_first_two(source, *args, **kwargs):
            if threading.current_thread().name.startswith("skinlab-batch") and source in photos[:2]:
                time.sleep(0.6)  # the workers of the later images reach the budget first
            return real_plan(source, *args, **kwargs)

        client.plan = slow_first_two
        report = analyze_many(photos, "redness", ledger=ledger, client=client, max_units=18, progress=False,
                              max_workers=4)
        assert [i.outcome for i in report.items] == ["done", "done", "skipped", "skipped"], report.summary()
        assert [i.reason for i in report.items[2:]] == ["max_units", "max_units"]
        assert report.units_spent == plan.units_estimated == 18
        assert len(server.app.task_ids()) == 2



def test_dry_run_counts_identical_photos_in_one_run_once_as_the_run_does(cohort, tmp_path):
    """Two files with the same bytes make one task: the dry run lists the second as reused (at no
    cost), so it says what the run then sends (it used to count both)."""
    import shutil

    folder = tmp_path / "dup"
    folder.mkdir()
    for name in ("A_1.jpg", "B_1.jpg"):
        shutil.copy(cohort / "astronaut_t0.jpg", folder / name)
    shutil.copy(cohort / "hopper_t0.jpg", folder / "C_1.jpg")
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        plan = analyze_many(folder, "redness", ledger=ledger, client=client, dry_run=True, progress=False)
        assert [i.outcome for i in plan.items] == ["planned", "reused", "planned"]
        assert "the same photo as A_1.jpg earlier in this run" in plan.items[1].note
        assert plan.units_estimated == 18
        report = analyze_many(folder, "redness", ledger=ledger, client=client, progress=False, max_workers=3)
        assert report.units_spent == plan.units_estimated and len(server.app.task_ids()) == 2
        assert sorted(i.outcome for i in report.items) == ["done", "done", "reused"]
        forced = analyze_many(folder, "redness", ledger=ledger, client=client, dry_run=True, force=True,
                              progress=False)
        assert [i.outcome for i in forced.items] == ["planned"] * 3  # force=True sends each file
        ledger.close()

def test_backend_is_stated_on_the_progress_bar_and_at_the_start(cohort, tmp_path, capsys, caplog):
    import logging

    from skinlab import batch

    bar = batch._progress(2, enabled=True, backend="cloud")
    try:
        assert bar.desc == "skinlab cloud"
    finally:
        bar.close()
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        with caplog.at_level(logging.INFO, logger="skinlab"):
            analyze_many(sorted(cohort.glob("hopper_*.jpg"))[:1], "redness", ledger=tmp_path / "l.sqlite",
                         client=client, progress=True)
    assert "skinlab local" in capsys.readouterr().err  # the bar's label
    assert any("1 image(s) on the LOCAL backend" in r.getMessage() for r in caplog.records)


def test_dry_run_sends_nothing_billable(cohort, tmp_path):
    with skinlab.local.serve(task_duration_s=0, initial_units=20) as server, _client(server) as client:
        report = analyze_many(cohort, "all", ledger=tmp_path / "l.sqlite", client=client, dry_run=True,
                              progress=False)
        assert report.dry_run and report.count("planned") == 7
        assert report.units_estimated == 7 * 16 and report.balance == 20
        assert "DRY RUN" in report.summary() and "balance is too low" in report.summary()
        assert server.app.task_ids() == []


def test_max_units_stops_before_exceeding(cohort, tmp_path):
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        report = analyze_many(sorted(cohort.glob("astronaut_*.jpg")), "redness", ledger=tmp_path / "l.sqlite",
                              client=client, progress=False, max_workers=1, max_units=20)
        assert report.count("done") == 2 and report.count("skipped") == 1
        assert report.units_spent == 18 <= 20
        assert len(server.app.task_ids()) == 2


def test_bad_key_stops_the_run(cohort, tmp_path):
    with skinlab.local.serve(task_duration_s=0, api_keys=["good"]) as server, _client(server, key="bad") as client:
        report = analyze_many(cohort, "redness", ledger=tmp_path / "l.sqlite", client=client, progress=False,
                              max_workers=1)
        assert report.stopped and "AuthenticationError" in report.stopped
        assert report.count("done") == 0


def test_stop_event_stops_new_images(cohort, tmp_path):
    stop = threading.Event()
    seen = []

    def on_update(item):
        seen.append(item.outcome)
        if item.outcome == "done":
            stop.set()

    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        report = analyze_many(cohort, "redness", ledger=tmp_path / "l.sqlite", client=client, progress=False,
                              max_workers=1, stop=stop, on_update=on_update)
    assert report.count("done") == 1 and report.count("interrupted") == 6
    assert "running" in seen


def test_kill_9_midway_then_rerun_bills_no_image_twice(cohort, tmp_path):
    import hashlib
    from collections import Counter

    env = {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}
    with skinlab.local.serve(task_duration_s=1.0) as server:
        ledger_path = tmp_path / "study" / "ledger.sqlite"
        cmd = [sys.executable, "-m", "skinlab.cli", "analyze", str(cohort), "--actions", "redness",
               "--ledger", str(ledger_path), "--base-url", server.url, "--out", str(tmp_path / "out"),
               "--workers", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while len(server.app.task_ids()) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(server.app.task_ids()) >= 3  # it really was midway
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        assert "Batch on the LOCAL backend" in rerun.stdout, rerun.stdout + rerun.stderr
        tasks = [server.app.task(t) for t in server.app.task_ids()]
        billed = Counter(t.source_sha256 for t in tasks if t.state == "success")
        assert billed and max(billed.values()) == 1, billed  # no image billed twice
    subs = Ledger(ledger_path).submissions()
    final = subs.sort_values("submission_id").groupby("image_name").tail(1)
    assert len(final) == 7
    for _, row in final.iterrows():
        ok = row.status == "success" or (row.status == "error" and row.error_code == "error_src_face_too_small")
        assert ok or (row.status == "ambiguous" and row.next_step), row.to_dict()


def test_ctrl_c_stops_cleanly_with_everything_recorded(cohort, tmp_path):
    """Ctrl-C in the middle of a batch (a real KeyboardInterrupt in the main thread, as the notebook's
    interrupt button raises): analyze_many returns a report instead of raising, starts no new image,
    stops the photo in flight at its next step (recorded as it really is) and a re-run finishes the
    rest without billing any image twice."""
    import _thread
    from collections import Counter

    def on_update(item):
        if item.outcome == "done" and not pressed.is_set():
            pressed.set()
            _thread.interrupt_main()  # KeyboardInterrupt in the main thread, inside analyze_many's wait

    pressed = threading.Event()
    ledger = Ledger(tmp_path / "study" / "ledger.sqlite")
    with skinlab.local.serve(task_duration_s=0.2) as server, _client(server) as client:
        report = analyze_many(cohort, "redness", ledger=ledger, client=client, progress=False, max_workers=1,
                              on_update=on_update)
        assert pressed.is_set()
        assert report.stopped and "interrupted (Ctrl-C)" in report.stopped and "ledger.resume" in report.stopped
        # final when analyze_many returns: the photo in flight has stopped, nothing goes on behind the report
        counts = {k: report.count(k) for k in ("done", "failed", "interrupted", "running")}
        summary = report.summary()
        assert counts["done"] >= 1 and counts["interrupted"] >= 1 and sum(counts.values()) == 7, counts
        assert "stopped early: interrupted" in summary
        assert ("left running" in summary) == bool(counts["running"])
        recorded = ledger.submissions().set_index("submission_id")
        expected = {"done": ("success",), "running": ("running",), "interrupted": ("error",), "failed": ("error",)}
        for item in report.items:
            if item.submission_id is None:
                assert item.outcome == "interrupted"  # never sent
                continue
            row = recorded.loc[item.submission_id]
            assert row.status in expected[item.outcome], (item, row.status, row.error_code)
            if item.outcome == "interrupted":
                assert row.error_code == "interrupted" and row.units_charged == 0 and pd.isna(row.task_id)
        assert set(recorded.status) <= {"success", "running", "error"}, recorded[["status", "error_code"]]
        assert set(recorded.error_code.dropna()) <= {"interrupted", "error_src_face_too_small"}
        ledger.resume(client)
        rerun = analyze_many(cohort, "redness", ledger=ledger, client=client, progress=False, max_workers=2)
        assert rerun.stopped is None and rerun.count("done") + rerun.count("reused") == 6
        billed = Counter(server.app.task(t).source_sha256 for t in server.app.task_ids()
                         if server.app.task(t).state == "success")
        assert len(billed) == 6 and max(billed.values()) == 1


def _env_without_keys():
    return {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}


#: A batch on the embedded local backend (no key: each process has its own emulator), Ctrl-C after
#: the first photo, then the process exits (as the command line and a script do).
CTRL_C_CHILD = textwrap.dedent("""
    import _thread, sys, threading
    from skinlab.batch import analyze_many

    pressed = threading.Event()

    def on_update(item):
        if item.outcome == "done" and not pressed.is_set():
            pressed.set()
            _thread.interrupt_main()

    report = analyze_many(sys.argv[2:], "redness", ledger=sys.argv[1], progress=False, max_workers=1,
                          on_update=on_update)
    assert pressed.is_set()
    print(report.summary())
""")


def test_ctrl_c_then_exit_prints_no_traceback_and_records_no_false_error(cohort, tmp_path):
    """Ctrl-C, summary, exit: the photo in flight used to go on in its worker while the interpreter
    shut down, its create refused by the embedded emulator ("RuntimeError: cannot schedule new futures
    after shutdown", a 20-line traceback after the summary) and recorded as a false error or as an
    ambiguous create. Now it stops at its next step, honestly recorded, and the next run finishes."""
    photos = [str(p) for p in sorted(cohort.glob("*_t*.jpg"))]
    db = tmp_path / "study" / "ledger.sqlite"
    proc = subprocess.run([sys.executable, "-c", CTRL_C_CHILD, str(db), *photos], capture_output=True, text=True,
                          env=_env_without_keys(), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped early: interrupted (Ctrl-C)" in proc.stdout
    assert "Traceback" not in proc.stderr and "cannot schedule new futures" not in proc.stderr, proc.stderr
    ledger = Ledger(db)
    subs = ledger.submissions()
    assert (subs.status == "success").sum() >= 1
    assert set(subs.status) <= {"success", "running", "error"}, subs[["status", "error_code", "error_message"]]
    assert set(subs.error_code.dropna()) <= {"interrupted"}, subs[["status", "error_code", "error_message"]]
    # the next run (another process, another emulator) finishes every photo, each once
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        again = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False, max_workers=2)
    assert again.count("failed") == 0 and again.count("done") + again.count("reused") == 6, again.summary()
    ok = ledger.submissions(status="success")
    assert sorted(ok.image_name) == sorted(os.path.basename(p) for p in photos)


#: One batch process on the embedded local backend, started together with others on one ledger.
BATCH_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from skinlab.batch import analyze_many
    from skinlab.client import connect

    db, go = sys.argv[1], Path(sys.argv[2])
    client = connect()                     # no key: this process's own embedded emulator
    client.balance()                       # the emulator is up and its engine loaded
    Path(sys.argv[3]).touch()              # ready
    while not go.exists():
        time.sleep(0.01)
    report = analyze_many(sys.argv[4:], "redness", ledger=db, client=client, progress=False, max_workers=2)
    print(json.dumps({"backend": client.backend, "url": client.base_url, "summary": report.summary(),
                      "outcomes": {k: report.count(k) for k in ("done", "reused", "failed", "skipped")}}))
""")


def test_two_processes_each_with_its_own_local_emulator_share_one_ledger(cohort, tmp_path):
    """Two batch processes on one ledger, each with its own embedded emulator (another port), over the
    same photos at the same time. Each used to poll the other's running tasks on its own emulator,
    which did not know them: every photo failed. Now a task running in the other process's emulator is
    waited for through the ledger and reused: no failure, one success per photo."""
    import json

    photos = [str(p) for p in sorted(cohort.glob("*_t*.jpg"))]
    db = tmp_path / "study" / "ledger.sqlite"
    Ledger(db).close()
    go = tmp_path / "go"
    procs = []
    for label, order in (("A", photos), ("B", photos)):
        ready = tmp_path / f"ready-{label}"
        cmd = [sys.executable, "-c", BATCH_CHILD, str(db), str(go), str(ready), *order]
        procs.append((label, ready, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                     env=_env_without_keys())))
    deadline = time.monotonic() + 120
    while not all(r.exists() for _, r, _ in procs) and time.monotonic() < deadline:
        assert all(p.poll() is None for _, _, p in procs), [p.communicate() for _, _, p in procs]
        time.sleep(0.02)
    go.touch()  # both start at once
    out = {}
    for label, _, proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr
        out[label] = json.loads(stdout.strip().splitlines()[-1])
    assert out["A"]["backend"] == out["B"]["backend"] == "local" and out["A"]["url"] != out["B"]["url"]
    for label in "AB":
        outcomes = out[label]["outcomes"]
        assert outcomes["failed"] == 0 and outcomes["done"] + outcomes["reused"] == 6, out[label]["summary"]
    assert out["A"]["outcomes"]["done"] + out["B"]["outcomes"]["done"] == 6  # each photo analysed once
    subs = Ledger(db).submissions()
    assert sorted(subs[subs.status == "success"].image_name) == sorted(os.path.basename(p) for p in photos)
    assert set(subs.status) == {"success"}, subs[["image_name", "status", "error_code", "error_message"]]


#: Creates local tasks in this process's own emulator without waiting for them, then dies (kill -9).
ABANDON_CHILD = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("ignore")
    from skinlab.client import Client
    from skinlab.ledger import Ledger

    client = Client.local(task_duration_s=30)
    ledger = Ledger(sys.argv[1])
    for photo in sys.argv[2:]:
        assert ledger.submit(client, photo, ["redness"], wait=False).status == "running"
    os.kill(os.getpid(), 9)
""")


def test_local_tasks_left_running_by_a_dead_process_are_analysed_again(cohort, tmp_path):
    """kill -9 left rows running whose tasks lived in the dead process's emulator; the next run used to
    poll them on its own emulator and fail them (task_lost). Now they are closed as lost (free) and
    analysed again, and the summary says why."""
    photos = [str(p) for p in sorted(cohort.glob("*_t*.jpg"))]
    db = tmp_path / "study" / "ledger.sqlite"
    child = subprocess.run([sys.executable, "-c", ABANDON_CHILD, str(db), *photos[:4]], capture_output=True,
                           text=True, env=_env_without_keys(), timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    ledger = Ledger(db)
    assert list(ledger.submissions().status) == ["running"] * 4
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        report = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False, max_workers=2)
        assert report.count("done") == 6 and report.count("failed") == 0, report.summary()
        assert len(server.app.task_ids()) == 6  # the dead emulator's task ids were never polled here
    again = [i for i in report.items if i.note]
    assert len(again) == 4 and all("another local emulator" in i.note and "analysed again (local, free)" in i.note
                                   for i in again)
    assert "analysed again 4: its task was in another local emulator" in report.summary()
    subs = ledger.submissions()
    lost = subs[subs.status == "error"]
    assert len(lost) == 4 and set(lost.error_code) == {"task_lost"} and set(lost.units_charged) == {0}
    for msg, step in zip(lost.error_message, lost.next_step):
        assert "Local tasks are free: analysed again as submission" in msg and step.startswith("Nothing to do")
    ok = subs[subs.status == "success"]
    assert sorted(ok.image_name) == sorted(os.path.basename(p) for p in photos)


def test_a_task_the_local_emulator_lost_is_analysed_again_once_and_the_message_says_it_once(cohort, tmp_path):
    photo = sorted(cohort.glob("hopper_*.jpg"))[0]
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        server.faults.invalid_task_id(1)  # as if the emulator had been restarted under the task
        report = analyze_many([photo], "redness", ledger=ledger, client=client, progress=False)
        assert report.count("done") == 1 and report.count("failed") == 0, report.summary()
        assert report.items[0].note.startswith("its task was lost by its local emulator")
        first = ledger.get(1)
        assert first.error_code == "task_lost" and "analysed again as submission 2" in first.error_message
        # lost again: reported once, its message and next step each said once
        server.faults.invalid_task_id(2)
        report = analyze_many([photo], "redness", ledger=ledger, client=client, progress=False, force=True)
        assert report.failures == {"task_lost": 1}, report.summary()
        error = report.items[0].error
        assert error.count("no longer knows this task") == 1, error
        assert "Local tasks are free" in error and "waiting for it" not in error


def test_progress_bar_is_tqdm_auto_with_widgets_and_plain_text_without(monkeypatch):
    from tqdm import std

    from skinlab import batch

    assert batch._progress(3, enabled=False) is None
    pytest.importorskip("ipywidgets")
    bar = batch._progress(3, enabled=True)
    try:
        import tqdm.auto

        assert type(bar) is tqdm.auto.tqdm  # a widget bar in a notebook kernel, text elsewhere
    finally:
        bar.close()
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if ipywidgets were not installed
    bar = batch._progress(3, enabled=True)
    try:
        assert type(bar) is std.tqdm and bar.total == 3
    finally:
        bar.close()


def test_scan_folder_skips_skinlab_result_folders_and_a_ledgers_results(tmp_path):
    """skinlab's own output is not photos: a folder holding the result.json AnalysisResult.save
    writes (with its masks and resize_image.jpg), and a ledger's results directory even where a
    folder there holds no result.json yet. A result.json of someone else's does not count."""
    import json

    from skinlab.batch import scan_folder
    from skinlab.results import AnalysisResult

    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        photo = tmp_path / "S01" / "T0.jpg"
        photo.parent.mkdir()
        sample_portrait("astronaut", "sd").save(photo, quality=92)
        result = client.analyze(photo, ["redness"])
    assert isinstance(result, AnalysisResult)
    result.save(tmp_path / "S01_T0")                      # as skinlab analyze writes it
    assert (tmp_path / "S01_T0" / "resize_image.jpg").exists()
    assert any(p.name.endswith("_output.png") for p in (tmp_path / "S01_T0").iterdir())
    Ledger(tmp_path / "study.sqlite").close()          # a ledger with another name, and its results/
    (tmp_path / "results" / "000007").mkdir(parents=True)
    (tmp_path / "results" / "000007" / "redness_output.png").write_bytes(b"x")
    (tmp_path / "mine").mkdir()                          # a result.json that is not skinlab's
    (tmp_path / "mine" / "result.json").write_text(json.dumps({"score": 3}))
    (tmp_path / "mine" / "S02.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()                     # a folder excluded by name (the CLI's ledger results)
    (tmp_path / "elsewhere" / "x.jpg").write_bytes(b"x")

    scan = scan_folder(tmp_path, recursive=True, exclude=[tmp_path / "elsewhere"])
    assert [p.relative_to(tmp_path).as_posix() for p in scan.files] == ["S01/T0.jpg", "mine/S02.jpg"]
    assert [p.name for p in scan.results] == ["S01_T0", "elsewhere", "results"]
    assert scan.skipped_line(tmp_path) == (
        f"Skipped 3 skinlab result folder(s) in {str(tmp_path)!r} (S01_T0, elsewhere, results): skinlab's own "
        "output (result.json, masks, resize_image.jpg, a ledger's results directory), not photos.")
    assert collect_images(tmp_path, recursive=True, exclude=[tmp_path / "elsewhere"]) == scan.files
    # not recursive: a result folder is not named as a subfolder holding photos
    assert [p.name for p in scan_folder(tmp_path).subfolders] == ["S01", "elsewhere", "mine"]
    # a result folder given as the folder: its images are not photos, and the error says so
    with pytest.raises(errors.InvalidParametersError, match="it is a skinlab result folder"):
        collect_images(tmp_path / "S01_T0")


def test_summary_hides_credentials_in_the_base_url():
    from skinlab._net import redact_url
    from skinlab.batch import BatchItem, BatchReport

    url = "http://me:secret@127.0.0.1:8799"
    assert redact_url(url) == "http://127.0.0.1:8799"
    assert redact_url("https://example.com/v2") == "https://example.com/v2"
    for dry in (False, True):
        report = BatchReport(items=[BatchItem(0, "a.jpg", outcome="done")], backend="local", base_url=url,
                             dry_run=dry)
        summary = report.summary()
        assert "secret" not in summary and "me:" not in summary
        assert "on the LOCAL backend (http://127.0.0.1:8799)" in summary, summary


def test_dry_run_says_a_pre_flight_failure_fails_as_the_run_records_it(cohort, tmp_path):
    """A greyscale photo with a colour concern: the run records it failed, and the dry run said so
    (it used to list it as a skip, a word the run then did not use)."""
    grey = tmp_path / "grey.jpg"
    Image.open(cohort / "astronaut_t0.jpg").convert("L").save(grey)
    photos = [grey, cohort / "hopper_t0.jpg"]
    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        plan = analyze_many(photos, "redness", ledger=ledger, client=client, dry_run=True, progress=False)
        summary = plan.summary()
        assert "would submit 1 image(s), reuse 0 recorded, fail 1 (pre-flight problems: the " \
               "run records them as failed, nothing billed)" in summary, summary
        assert "  - grey.jpg: would fail: 'grey.jpg' is a greyscale photo" in summary, summary
        report = analyze_many(photos, "redness", ledger=ledger, client=client, progress=False)
        assert [i.outcome for i in report.items] == ["failed", "done"], report.summary()


def test_tasks_left_running_by_an_earlier_run_are_reported_with_their_units(cohort, tmp_path):
    """A run stopped early leaves tasks running (units 0 in its summary); the next run collects
    them as reused. Their units, billed when they finished, used to appear in neither summary."""
    photo = cohort / "hopper_t1.jpg"
    with skinlab.local.serve(task_duration_s=0.6) as server, _client(server) as client:
        ledger = Ledger(tmp_path / "l.sqlite")
        first = ledger.submit(client, photo, ["redness"], wait=False)
        assert first.status == "running"
        report = analyze_many([photo, cohort / "hopper_t2.jpg"], "redness", ledger=ledger, client=client,
                              progress=False)
        items = {i.label: i for i in report.items}
        assert items["hopper_t1.jpg"].outcome == "reused" and items["hopper_t1.jpg"].collected_units == 9
        assert items["hopper_t2.jpg"].outcome == "done" and items["hopper_t2.jpg"].collected_units is None
        summary = report.summary()
        assert "units spent 9" in summary
        assert "finished during this run: 1 task(s) created earlier (e.g. by a run stopped early), 9 units" in summary
        again = analyze_many([photo], "redness", ledger=ledger, client=client, progress=False)
        assert again.items[0].collected_units is None and "finished during this run" not in again.summary()
        ledger.close()



def test_tags_that_differ_on_a_reused_photo_are_repeated_in_the_summary(cohort, tmp_path):
    """Two copies of one photo under different names and tags: the second keeps the first's tags,
    which a warning says amid the progress; the summary says it again, where it is read."""
    import shutil
    import warnings

    folder = tmp_path / "dup"
    folder.mkdir()
    shutil.copy(cohort / "astronaut_t0.jpg", folder / "S01_T0.jpg")
    shutil.copy(cohort / "astronaut_t0.jpg", folder / "S01_T1.jpg")
    from skinlab.tags import FilenamePattern

    with skinlab.local.serve(task_duration_s=0) as server, _client(server) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = analyze_many(folder, "redness", ledger=tmp_path / "l.sqlite", client=client, progress=False,
                                  max_workers=1, tags=FilenamePattern("{subject}_{timepoint}.jpg"))
    items = {i.label: i for i in report.items}
    assert items["S01_T1.jpg"].outcome == "reused"
    assert items["S01_T1.jpg"].tag_conflicts == ("timepoint: 'T0' recorded, 'T1' given",)
    assert ("tags differ from the recorded ones for 1 reused photo(s), which kept the recorded tags: "
            "S01_T1.jpg (timepoint: 'T0' recorded, 'T1' given)") in report.summary()
