"""The ledger and local emulators: a local task lives in one emulator, and one engine version is reused.

Each process's embedded emulator (or each ``Client.local()``) has its own port and its own tasks.
A running row whose task is in another emulator is never polled through this client's emulator:
it is waited for while its owner polls it, and analysed again (free) when its owner is gone. A
recorded local success is reused only when the current engine version is the one it was measured
with. None of this applies to the cloud.
"""

import threading
import time
import warnings

import pytest

import skinlab
from skinlab.client import Client, PollSchedule
from skinlab.ledger import Ledger, LedgerReuseWarning
from skinlab.local import LocalServer

QUICK = PollSchedule(first=0.05, factor=1.5, cap=0.2, minimum=0.02)
KEY = "k-ledger-local"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import ImageDraw

    folder = tmp_path_factory.mktemp("photos")
    portrait = skinlab.sample_portrait("astronaut", "sd")
    paths = []
    for i in range(3):
        img = portrait.copy()
        ImageDraw.Draw(img).rectangle([0, 0, 10, 10], fill=(40 * i, 200, 30))
        paths.append(folder / f"L{i}.jpg")
        img.save(paths[-1], quality=94)
    return paths


def client_of(server):
    return Client(api_key=KEY, base_url=server.url, rate_limiter=False, poll_schedule=QUICK)


def test_a_task_running_in_another_live_emulator_is_waited_for_and_reused_never_polled_here(tmp_path, photos):
    """Two emulators in one process (as two notebooks with Client.local() each, or two batch
    processes): while A polls its task, B's resume leaves the row alone and B's submit waits for it
    through the ledger, then reuses A's success. B used to poll it on its own emulator, which did not
    know it, and closed it as lost while A was still working on it."""
    db = tmp_path / "ledger.sqlite"
    with LocalServer(task_duration_s=1.5, rate_limit=None) as server_a, \
            LocalServer(task_duration_s=0, rate_limit=None) as server_b:
        client_a, client_b = client_of(server_a), client_of(server_b)
        ledger_a, ledger_b = Ledger(db), Ledger(db)
        done = {}
        worker = threading.Thread(target=lambda: done.setdefault(
            "a", ledger_a.submit(client_a, photos[0], ["redness"], timeout=60)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LedgerReuseWarning)
            worker.start()
            end = time.monotonic() + 30
            while time.monotonic() < end and list(ledger_b.submissions().status) != ["running"]:
                time.sleep(0.02)
            assert list(ledger_b.submissions().status) == ["running"]
            report = ledger_b.resume(client_b, timeout=5)
            assert report.empty and list(ledger_b.submissions().status) == ["running"]  # not touched
            sub = ledger_b.submit(client_b, photos[0], ["redness"], timeout=60)
        worker.join(60)
        assert done["a"].status == "success" and not done["a"].reused
        assert sub.status == "success" and sub.reused and sub.id == done["a"].id, (sub, sub.note)
        assert server_b.app.task_ids() == []  # B created no task and polled none
        assert len(ledger_b) == 1
        ledger_a.close()
        ledger_b.close()


def test_resume_closes_a_running_task_of_a_gone_local_emulator_without_polling_it(tmp_path, photos):
    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(db)
    with LocalServer(task_duration_s=30, rate_limit=None) as gone:
        sub = ledger.submit(client_of(gone), photos[1], ["redness"], wait=False)
    assert sub.status == "running"  # its emulator has stopped, and this process no longer polls it
    with LocalServer(task_duration_s=0, rate_limit=None) as server:
        client = client_of(server)
        report = ledger.resume(client, timeout=5)
        row = ledger.get(sub.id)
        assert list(report.status) == ["error"] and row.error_code == "task_lost" and row.units_charged == 0
        # this process, which started that emulator, is alive: the emulator is said to be gone, not the process
        assert "which no longer answers" in row.error_message and "still running" in row.error_message
        assert "Local tasks are free" in row.next_step
        again = ledger.submit(client, photos[1], ["redness"], timeout=60)
        assert again.status == "success" and not again.reused
    ledger.close()


def test_local_success_is_reused_only_with_the_same_engine_version(tmp_path, photos, monkeypatch):
    """Offline first use records the cascade fallback ("...+cascade-fallback"); online later, a fresh
    client used to reuse those results, mixing engine versions in one study. Now they are analysed
    again (free), saying why; results of the current engine are reused."""
    from skinlab.batch import analyze_many

    db = tmp_path / "study" / "ledger.sqlite"
    old = "0.0.9+cascade-fallback; face=skimage-lbp-cascade(FALLBACK:no-landmark-model)"
    with LocalServer(task_duration_s=0, rate_limit=None) as server:
        with monkeypatch.context() as m:
            m.setattr(server.app, "engine_header", lambda: old)
            first = analyze_many(photos, "redness", ledger=db, client=client_of(server), progress=False)
        assert first.count("done") == 3
        ledger = Ledger(db)
        assert set(ledger.submissions().engine) == {f"skinlab-local {old}"}
        current = f"skinlab-local {server.app.engine_header()}"
        fresh = client_of(server)  # has not talked to the emulator yet: its engine is not known
        assert fresh.engine is None
        assert ledger.lookup(fresh, photos[0], ["redness"]).decision == "new"
        plan = analyze_many(photos, "redness", ledger=ledger, client=client_of(server), dry_run=True, progress=False)
        assert plan.count("planned") == 3 and "would analyse again 3: recorded with engine" in plan.summary()
        second = analyze_many(photos, "redness", ledger=ledger, client=client_of(server), progress=False)
        assert second.count("done") == 3 and second.count("reused") == 0, second.summary()
        why = f"recorded with engine skinlab-local {old}, current is {current}: analysed again (local, free)"
        assert {i.note for i in second.items} == {why}
        assert f"analysed again 3: {why}" in second.summary()
        with pytest.warns(LedgerReuseWarning):
            sub = ledger.submit(client_of(server), photos[0], ["redness"])
        assert sub.reused and sub.engine == current
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LedgerReuseWarning)
            new = ledger.submit(client_of(server), photos[1], ["wrinkle"])
        assert new.rerun is None and new.note == ""
        third = analyze_many(photos, "redness", ledger=ledger, client=client_of(server), progress=False)
        assert third.count("reused") == 3 and "analysed again" not in third.summary()
        assert len(server.app.task_ids()) == 7
        latest = ledger.submissions(status="success").groupby("image_name").tail(1)
        assert set(latest.engine) == {current}
        ledger.close()


def test_a_task_in_another_emulator_that_still_answers_is_left_for_it(tmp_path, photos, monkeypatch):
    """A ``skinlab serve`` emulator outlives the run that used it: when nobody polls a task in it
    any more, another client analyses the image again (free) but does not close that row as lost
    with a false "gone with process N"; resume leaves it too, and a client of that emulator
    collects it later."""
    import logging

    import skinlab.ledger as ledger_mod

    db = tmp_path / "ledger.sqlite"
    ledger = Ledger(db)
    with LocalServer(task_duration_s=0.5, rate_limit=None) as served, \
            LocalServer(task_duration_s=0, rate_limit=None) as other:
        first = ledger.submit(client_of(served), photos[2], ["redness"], wait=False)
        assert first.status == "running"
        monkeypatch.setattr(ledger_mod, "HEARTBEAT_STALE_S", 0.0)  # nobody has polled it "for long"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LedgerReuseWarning)
            caplog_records = []
            handler = logging.Handler()
            handler.emit = caplog_records.append
            logging.getLogger("skinlab").addHandler(handler)
            try:
                report = Ledger(db).resume(client_of(other), timeout=5)
            finally:
                logging.getLogger("skinlab").removeHandler(handler)
            assert report.empty and ledger.get(first.id).status == "running"
            assert any(served.url in r.getMessage() and "still answers" in r.getMessage() for r in caplog_records)
            again = ledger.submit(client_of(other), photos[2], ["redness"], timeout=60)
        assert again.status == "success" and not again.reused and again.id != first.id
        assert "left as it is" in again.note and "gone with" not in again.note, again.note
        assert ledger.get(first.id).status == "running"  # not closed as task_lost
        time.sleep(0.6)
        ledger.resume(client_of(served), timeout=10)  # a client of that emulator collects it
        assert ledger.get(first.id).status == "success"
    ledger.close()


def test_cloud_reuse_and_cloud_running_rows_are_unchanged(tmp_path):
    """The engine check and the emulator check are for the local backend only."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    base = dict(id=1, engine="youcam-skin-analysis v2.0", base_url="https://yce-api-01.makeupar.com", owner=None,
                updated_at=0.0, task_id="t1", error_code=None)
    success = dict(base, status="success")
    assert ledger._decide([success], "youcam-skin-analysis v2.1", "https://yce-api-01.makeupar.com", False,
                          "https://yce-api-01.makeupar.com")[0] == "reuse"
    running = dict(base, status="running")  # no live owner, another base URL: still polled (valid 24 h)
    assert ledger._decide([running], None, "https://yce-api-01.makeupar.com", False, "https://other")[0] == "attach"
    local_running = dict(running, base_url="http://127.0.0.1:1")
    decision, _, stale, why = ledger._decide([local_running], None, "local", False, "http://127.0.0.1:2")
    assert decision == "new" and stale == [local_running] and why[0] == 1
    ledger.close()


def test_an_owner_is_alive_only_while_it_polls(tmp_path):
    """Another process's running local row is waited for only while that process is alive and its
    heartbeat fresh: a process that stopped polling (wait=False, Ctrl-C) or died is not waited for."""
    import os
    import socket
    import subprocess
    import sys

    from skinlab.ledger import HEARTBEAT_STALE_S

    ledger = Ledger(tmp_path / "ledger.sqlite")
    alive = f"{socket.gethostname()}:{os.getppid()}:feedbeef"  # a live process that is not this one
    row = dict(id=1, status="running", owner=alive, updated_at=time.time())
    assert ledger._working_elsewhere(row)
    assert not ledger._working_elsewhere(dict(row, updated_at=time.time() - HEARTBEAT_STALE_S - 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not ledger._working_elsewhere(dict(row, owner=f"{socket.gethostname()}:{int(dead.stdout)}:feedbeef"))
    assert ledger._working_elsewhere(dict(row, owner="another-host:1:feedbeef"))  # fresh heartbeat
    assert not ledger._working_elsewhere(dict(row, owner=None))  # written by an older skinlab
    ledger.close()


def test_the_heartbeat_is_refreshed_between_polls(tmp_path, photos, monkeypatch):
    from skinlab import ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "HEARTBEAT_S", 0.05)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with LocalServer(task_duration_s=1.5, rate_limit=None) as server:
        slow = Client(api_key=KEY, base_url=server.url, rate_limiter=False,
                      poll_schedule=PollSchedule(first=1.2, factor=1.0, cap=1.2))
        worker = threading.Thread(target=ledger.submit, args=(slow, photos[2], ["redness"]), kwargs={"timeout": 60})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worker.start()
            end = time.monotonic() + 30
            while time.monotonic() < end and ledger.submissions().status.tolist() != ["running"]:
                time.sleep(0.01)
            first = ledger.get(1).row["updated_at"]
            time.sleep(0.4)  # no poll in between: the first one comes 1.2 s after the create
            assert ledger.get(1).row["updated_at"] > first + 0.2
            assert ledger.get(1).row["last_polled_at"] is None
            worker.join(60)
    assert ledger.get(1).status == "success"
    ledger.close()
