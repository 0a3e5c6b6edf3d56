"""Kill -9 a submitting process at every step, then resume: no image billed twice, none lost.

Each child process submits one photo (with its own single action, so the emulator's tasks can be
told apart) through a ledger against the emulator running in this process, and SIGKILLs itself
right after a chosen committed state change (``Ledger._checkpoint``), or is killed from outside
while its create request is in flight. Then this process plays the next notebook session:
``resume``, submit everything again, and follow the next step of whatever is ambiguous.
"""

import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

import skinlab
from skinlab.actions import estimate_units
from skinlab.client import Client, PollSchedule
from skinlab.ledger import Ledger, LedgerReuseWarning
from skinlab.local import LocalServer

KEY = "k-crash-test"
QUICK = PollSchedule(first=0.05, factor=1.5, cap=0.2, minimum=0.02)

# point -> the action that image is analysed with (one per image, so tasks can be attributed)
POINTS = {
    "queued": "wrinkle",      # recorded, nothing sent
    "uploading": "pore",      # about to upload
    "uploaded": "texture",    # file id recorded, create not sent
    "creating": "acne",       # write-ahead 'ambiguous' committed, create not yet sent
    "created": "oiliness",    # create answered (task exists), its id not yet committed
    "running": "radiance",    # task id committed, not yet polled
    "saved": "eye_bag",       # results saved to disk, success not yet committed
}
INFLIGHT = ("inflight", "age_spot")  # killed from outside while the server is handling the create

CHILD = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("ignore")
    from skinlab.client import Client, PollSchedule
    from skinlab.ledger import Ledger, LedgerReuseWarning
    db, url, image, point, action, key = sys.argv[1:7]

    def checkpoint(self, name, sid):
        if name == point:
            os.kill(os.getpid(), 9)

    Ledger._checkpoint = checkpoint
    client = Client(api_key=key, base_url=url, rate_limiter=False,
                    poll_schedule=PollSchedule(first=0.05, factor=1.5, cap=0.2, minimum=0.02))
    Ledger(db).submit(client, image, [action], timeout=30)
    sys.exit(3)  # reaching here means the kill point was never hit
""")


@pytest.fixture(scope="module")
def server():
    srv = LocalServer(task_duration_s=0.0, rate_limit=None)
    srv.start()
    yield srv
    srv.stop()


def tasks_for(server, action):
    app = server.app
    with app._lock:
        ids = [t.task_id for t in app._tasks.values() if t.owner == KEY and t.names == (action,)]
    return [app.task(i) for i in ids]


def wait_for(predicate, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_at_every_step_then_resume(tmp_path, server):
    from PIL import ImageDraw

    study = tmp_path / "study"
    db = study / "ledger.sqlite"
    portrait = skinlab.sample_portrait("astronaut", "sd")
    images = {}
    for i, point in enumerate(list(POINTS) + [INFLIGHT[0]]):
        img = portrait.copy()
        ImageDraw.Draw(img).rectangle([0, 0, 10, 10], fill=(30 * i, 40, 200 - 20 * i))
        images[point] = study / "photos" / f"{point}.jpg"
        images[point].parent.mkdir(parents=True, exist_ok=True)
        img.save(images[point], quality=94)
    actions = dict(POINTS, **{INFLIGHT[0]: INFLIGHT[1]})
    Ledger(db).close()  # create the schema once, before the children race for it

    def spawn(point):
        return subprocess.Popen([sys.executable, "-c", CHILD, str(db), server.url, str(images[point]), point,
                                 actions[point], KEY], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # 1. the in-flight kill: the server is slow to handle the create; kill while it does
    server.faults.slow("create", 1.5, n=1)
    child = spawn("inflight")
    probe = Ledger(db)
    wait_for(lambda: (probe.submissions(status="ambiguous")["image_name"] == "inflight.jpg").any(),
             what="the in-flight create")
    time.sleep(0.3)  # the request is now in the server's hands
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    wait_for(lambda: len(tasks_for(server, "age_spot")) == 1, what="the server to create the orphan task")

    # 2. every checkpoint, in parallel (which also exercises concurrent writers)
    children = {point: spawn(point) for point in POINTS}
    for point, proc in children.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}\n{err.decode()[-2000:]}"

    # 3. the next session: resume, then submit everything again
    ledger = Ledger(db)
    client = Client(api_key=KEY, base_url=server.url, rate_limiter=False, poll_schedule=QUICK)
    before = ledger.submissions().set_index("image_name")
    assert before.loc["queued.jpg", "status"] == "queued"
    assert before.loc["uploaded.jpg", "file_id"] and before.loc["uploaded.jpg", "status"] == "uploading"
    for point in ("creating", "created", "inflight"):
        assert before.loc[f"{point}.jpg", "status"] == "ambiguous"
    assert before.loc["running.jpg", "status"] == before.loc["saved.jpg", "status"] == "running"

    with pytest.warns(UserWarning, match=r"3 submission\(s\) are ambiguous"):
        report = ledger.resume(client, timeout=30).set_index("image_name")
    for point in ("queued", "uploading", "uploaded"):
        assert (report.loc[f"{point}.jpg", "status"], report.loc[f"{point}.jpg", "error_code"]) == \
            ("error", "interrupted")
    assert report.loc["running.jpg", "status"] == report.loc["saved.jpg", "status"] == "success"
    for point in ("creating", "created", "inflight"):
        assert report.loc[f"{point}.jpg", "status"] == "ambiguous"
        assert "ledger.resolve" in report.loc[f"{point}.jpg", "next_step"]

    with pytest.warns(UserWarning):
        for point, path in images.items():
            ledger.submit(client, path, [actions[point]], timeout=30)

    def latest():
        subs = ledger.submissions()
        return subs.sort_values("submission_id").groupby("image_name").tail(1).set_index("image_name")

    final = latest()
    assert len(final) == len(images)
    for point in images:
        row = final.loc[f"{point}.jpg"]
        assert row.status in ("success", "ambiguous"), (point, row.status, row.error_message)
        if row.status == "ambiguous":
            assert "YouCam console" in row.next_step and "ledger.resolve" in row.next_step
    assert {p for p in images if final.loc[f"{p}.jpg", "status"] == "ambiguous"} == {"creating", "created",
                                                                                      "inflight"}

    def assert_never_billed_twice():
        for point, action in actions.items():
            tasks = tasks_for(server, action)
            assert len(tasks) <= 1, f"{point}: {len(tasks)} tasks created"
            assert sum(t.state == "success" for t in tasks) <= 1

    assert_never_billed_twice()
    assert tasks_for(server, "acne") == []  # killed before the create was sent: nothing exists

    # 4. follow the next step of each ambiguous row, as a user with the console would
    for point in ("creating", "created", "inflight"):
        sid = int(final.loc[f"{point}.jpg", "submission_id"])
        found = tasks_for(server, actions[point])
        if found:
            ledger.resolve(sid, task_id=found[0].task_id)
        else:
            ledger.resolve(sid, created=False)
    ledger.resume(client, timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerReuseWarning)
        for point, path in images.items():
            ledger.submit(client, path, [actions[point]], timeout=30)
    final = latest()
    assert set(final["status"]) == {"success"}
    assert_never_billed_twice()
    for point, action in actions.items():
        assert len(tasks_for(server, action)) == 1
    spent = server.app.config.initial_units - server.app.balance(KEY)
    assert spent == sum(estimate_units([a]) for a in actions.values())
    assert ledger.submissions(status="success")["units_charged"].sum() == spent
    assert len(ledger.scores()) == len(images)
    ledger.close()
    probe.close()
