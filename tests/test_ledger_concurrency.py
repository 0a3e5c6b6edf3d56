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


def _open_fresh_worker(paths, label, barrier, queue):
    """For each fresh path: wait for the others, then open the new ledger and record one row."""
    import traceback

    for path in paths:
        try:
            barrier.wait(60)
        except BaseException as exc:  # pragma: no cover - a broken barrier: report and stop
            queue.put((label, path, repr(exc)))
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # e.g. "could not use WAL mode"
                led = Ledger(path)
            led.record_many([dict(result={"backend": "local", "engine": "e", "scores": [
                {"action": "wrinkle", "region": "whole", "raw_score": 1.0}]}, image_name=f"{label}.jpg")])
            led.close()
            queue.put((label, path, None))
        except BaseException as exc:
            where = traceback.format_exc().splitlines()[-3].strip()  # the failing line
            queue.put((label, path, f"{type(exc).__name__}: {exc} at {where}"))


def test_processes_opening_a_brand_new_ledger_at_once_all_succeed(tmp_path):
    """Several processes create the same ledger file at the same moment (a barrier releases them
    together), in several rounds: each opening succeeds and every process's row is kept. Setting
    WAL mode and creating the schema race for the write lock, which SQLite may refuse at once
    ("database is locked") instead of waiting: without the retry, this test failed on every run
    tried (one opening in 50 to 100 raised)."""
    n_procs, rounds = 4, 40
    ctx = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / f"round{r}" / "ledger.sqlite") for r in range(rounds)]
    barrier = ctx.Barrier(n_procs)
    queue = ctx.Queue()
    labels = [f"P{i}" for i in range(n_procs)]
    procs = [ctx.Process(target=_open_fresh_worker, args=(paths, label, barrier, queue)) for label in labels]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=180) for _ in range(n_procs * rounds)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    problems = [o for o in outcomes if o[2] is not None]
    assert not problems, problems
    for path in paths:
        led = Ledger(path)
        assert sorted(led.submissions().image_name) == [f"{label}.jpg" for label in labels], path
        assert led.schema_version == skinlab.ledger.SCHEMA_VERSION
        led.close()
