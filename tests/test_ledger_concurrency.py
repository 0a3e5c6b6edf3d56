"""Two processes writing one ledger at once: no errors, no lost rows, one task per image."""

import multiprocessing
import warnings

import skinlab
from skinlab.client import Client, PollSchedule
from skinlab.ledger import Ledger, LedgerReuseWarning
from skinlab.local import LocalServer

KEY = "k-concurrency"
N_RECORDS = 150


def _record_worker(db, label, n, queue):
    """Record ``n`` results one transaction at a time, reading the tables in between."""
    try:
        led = Ledger(db)
        ids = []
        for i in range(n):
            result = {"backend": "local", "engine": "e", "scores": [
                {"action": "wrinkle", "region": "whole", "raw_score": float(i)},
                {"action": "pore", "region": "whole", "raw_score": float(i) + 0.5}]}
            ids += led.record_many([dict(result=result, image_name=f"{label}-{i}.jpg", tags={"subject": label})])
            if i % 25 == 0:
                led.scores(subject=label)
        led.close()
        queue.put((label, ids, None))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put((label, [], repr(exc)))


def _submit_worker(db, url, paths, label, queue):
    """Submit the same photos as the other process (in its own order) and wait for each."""
    try:
        warnings.simplefilter("ignore", LedgerReuseWarning)
        led = Ledger(db)
        client = Client(api_key=KEY, base_url=url, rate_limiter=False,
                        poll_schedule=PollSchedule(first=0.05, factor=1.5, cap=0.2, minimum=0.02))
        out = [(p, led.submit(client, p, ["wrinkle", "redness"], timeout=60).status) for p in paths]
        led.close()
        queue.put((label, out, None))
    except BaseException as exc:  # pragma: no cover
        queue.put((label, [], repr(exc)))


def _collect(procs, queue, n):
    results = {}
    for _ in range(n):
        label, value, err = queue.get(timeout=120)
        assert err is None, f"{label}: {err}"
        results[label] = value
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


def test_two_processes_record_at_once_without_losing_rows(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    db = str(tmp_path / "ledger.sqlite")
    Ledger(db).close()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_record_worker, args=(db, label, N_RECORDS, queue)) for label in ("A", "B")]
    for p in procs:
        p.start()
    results = _collect(procs, queue, 2)
    led = Ledger(db)
    subs = led.submissions()
    assert len(subs) == 2 * N_RECORDS
    assert sorted(subs.submission_id) == sorted(results["A"] + results["B"])
    assert subs.groupby("subject").size().to_dict() == {"A": N_RECORDS, "B": N_RECORDS}
    assert len(led.scores()) == 4 * N_RECORDS
    led.close()


def test_two_processes_submitting_the_same_photos_create_one_task_each(tmp_path):
    from PIL import ImageDraw

    portrait = skinlab.sample_portrait("astronaut", "sd")
    paths = []
    for i in range(3):
        img = portrait.copy()
        ImageDraw.Draw(img).rectangle([0, 0, 8, 8], fill=(60 * i, 10, 10))
        path = tmp_path / f"p{i}.jpg"
        img.save(path, quality=93)
        paths.append(str(path))
    ctx = multiprocessing.get_context("spawn")
    db = str(tmp_path / "ledger.sqlite")
    Ledger(db).close()
    with LocalServer(task_duration_s=0.3, rate_limit=None) as server:
        queue = ctx.Queue()
        procs = [ctx.Process(target=_submit_worker, args=(db, server.url, order, label, queue))
                 for label, order in (("A", paths), ("B", paths[::-1]))]
        for p in procs:
            p.start()
        results = _collect(procs, queue, 2)
        with server.app._lock:
            tasks = [t for t in server.app._tasks.values() if t.owner == KEY]
    assert len(tasks) == len(paths)  # each photo was created (and billed) exactly once
    for label in "AB":
        assert [status for _, status in results[label]] == ["success"] * len(paths)
    led = Ledger(db)
    subs = led.submissions()
    assert len(subs) == len(paths) and set(subs.status) == {"success"}
    assert len(led.scores()) == 2 * len(paths)
    led.close()
