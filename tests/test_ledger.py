"""The experiment ledger against the local emulator: recording, reuse, ambiguity, resume, tables, exports."""

import hashlib
import re
import shutil
import sqlite3
import warnings

import pandas as pd
import pytest

import skinlab
from skinlab import errors
from skinlab.actions import estimate_units
from skinlab.client import Client, PollSchedule
from skinlab.ledger import (
    DEIDENTIFIED_DROP, SCORE_COLUMNS, SUBMISSION_COLUMNS, WIDE_INDEX, Ledger, LedgerError, LedgerLocationWarning,
    LedgerReuseWarning, MixedBackendsError, location_warning,
)
from skinlab.local import LocalServer

from fakes import StaticSite

QUICK = PollSchedule(first=0.05, factor=1.5, cap=0.3, minimum=0.02)
SECRET_KEY = "sk-" + "ledger-SECRET-0123456789abcdef"  # fake; split so that secret scanners do not flag the test files


@pytest.fixture(scope="module")
def portrait():
    return skinlab.sample_portrait("astronaut", "sd")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, portrait):
    """Distinct JPEGs of the sample portrait (a coloured corner patch makes each one unique)."""
    from PIL import ImageDraw

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(8):
        img = portrait.copy()
        ImageDraw.Draw(img).rectangle([0, 0, 12, 12], fill=(20 * i, 255 - 20 * i, 90))
        path = folder / f"S{i:02d}_T0.jpg"
        img.save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server():
    """A dedicated emulator: some tests arm faults or count tasks."""
    srv = LocalServer(task_duration_s=0.0, rate_limit=None)
    srv.start()
    yield srv
    srv.stop()


def make_client(server, key=SECRET_KEY):
    return Client(api_key=key, base_url=server.url, rate_limiter=False, poll_schedule=QUICK)


def settle(server, timeout=20.0):
    """Wait until the emulator's engine has finished every task.

    The emulator runs its engine in threads of this process, and its image decoder enters
    ``warnings.catch_warnings()``, which is not thread-safe: a test that checks warnings while a
    task is being analysed in the background can lose them.
    """
    import time

    app = server.app
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with app._lock:
            if all(t.outcome is not None for t in app._tasks.values()):
                return
        time.sleep(0.02)
    raise AssertionError("the emulator did not finish its tasks")


def tasks_of(server, key):
    app = server.app
    with app._lock:
        return [t for t in app._tasks.values() if t.owner == key]


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "study" / "ledger.sqlite")
    yield led
    led.close()


# --------------------------------------------------------------------------- recording a submission


def test_submit_records_every_field_and_the_scores(ledger, server, photos):
    key = "k-record"
    client = make_client(server, key)
    path = photos[0]
    sub = ledger.submit(client, str(path), ["wrinkle", "pore", "redness", "skin_type"],
                        tags={"subject": "S00", "timepoint": "T0", "condition": "placebo", "site": "A"})
    assert sub.status == "success" and not sub.reused
    row = ledger.submissions().iloc[0]
    assert row.image_name == path.name
    assert row.image_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert row.image_size == path.stat().st_size
    assert (row.image_width, row.image_height) == (600, 800)
    assert row.source_key == f"sha256:{row.image_sha256}"
    assert row.backend == "local" and row.engine.startswith("skinlab-local")
    assert row.base_url == server.url and row.api_version == "v2.0"
    assert row.actions == "wrinkle,pore,redness,skin_type" and row.tier == "sd" and row.format == "zip"
    assert row.miniserver_args == "{}"
    assert row.task_id and row.file_id and row.task_state == "success"
    assert row.units_estimated == row.units_charged == estimate_units(["wrinkle", "pore", "redness", "skin_type"])
    assert row.created_at <= row.task_created_at <= row.completed_at
    assert row.request_ids and all(r.isdigit() for r in row.request_ids.split(","))
    assert (row.subject, row.timepoint, row.condition, row.tag_site) == ("S00", "T0", "placebo", "A")
    assert row.next_step is None and row.error_code is None
    # the emulator billed exactly the estimate, once
    assert server.app.balance(key) == server.app.config.initial_units - row.units_charged
    # results stored relative to the study folder
    assert row.result_dir == f"results/{sub.id:06d}"
    folder = ledger.root / row.result_dir
    assert {"scores.csv", "result.json", "wrinkle_output.png", "resize_image.jpg"} <= {p.name for p in folder.iterdir()}
    # the scores table holds the result's scores
    tidy = ledger.scores()
    assert len(tidy) == len(sub.result.scores) == 6  # skin type has three regions
    assert tidy["submission_id"].eq(sub.id).all()
    merged = tidy.merge(sub.result.scores, on=["action", "region"], suffixes=("", "_r"))
    assert (merged["raw_score"].fillna(-1) == merged["raw_score_r"].fillna(-1)).all()
    assert set(tidy.loc[tidy.action == "skin_type", "region"]) == {"whole", "t_zone", "u_zone"}
    assert tidy.loc[tidy.action == "skin_type", "skin_type"].notna().all()
    assert sub.result.mask("wrinkle").size == sub.result.resize_image().size


def test_same_submission_is_reused_across_restarts_and_force_bills_again(tmp_path, server, photos):
    key = "k-reuse"
    client = make_client(server, key)
    db = tmp_path / "ledger.sqlite"
    look = Ledger(db).lookup(client, photos[1], ["wrinkle", "pore"])
    assert look.decision == "new" and look.creates_task and look.units == estimate_units(["wrinkle", "pore"])
    assert len(Ledger(db)) == 0  # a lookup records nothing
    first = Ledger(db).submit(client, photos[1], ["wrinkle", "pore"])
    look = Ledger(db).lookup(client, photos[1], ["pore", "wrinkle"])
    assert look.reusable and look.submission_id == first.id and "reused" in look.note
    assert first.status == "success"
    n_tasks, balance = len(tasks_of(server, key)), server.app.balance(key)
    # a new process (new Ledger, new client), actions in another order: reused, nothing created
    other = make_client(server, key)
    led2 = Ledger(db)
    with pytest.warns(LedgerReuseWarning, match="reused and nothing was billed"):
        again = led2.submit(other, str(photos[1]), ["pore", "wrinkle"])
    assert again.reused and again.id == first.id and again.status == "success"
    assert again.result.score("wrinkle") == first.result.score("wrinkle")
    assert len(tasks_of(server, key)) == n_tasks and server.app.balance(key) == balance
    assert len(led2) == 1
    # a different format or argument is a different submission
    other_fmt = led2.submit(client, photos[1], ["wrinkle", "pore"], format="json")
    assert not other_fmt.reused and other_fmt.id != first.id
    assert len(tasks_of(server, key)) == n_tasks + 1
    # force=True creates (and bills) a new task
    forced = led2.submit(client, photos[1], ["wrinkle", "pore"], force=True)
    assert forced.status == "success" and not forced.reused and forced.id not in (first.id, other_fmt.id)
    assert len(tasks_of(server, key)) == n_tasks + 2
    assert server.app.balance(key) == balance - 2 * estimate_units(["wrinkle", "pore"])


@pytest.fixture(scope="module")
def photo_site(photos):
    """A plain HTTP server answering every GET with one of the test photos (for src_file_url)."""
    with StaticSite(photos[2].read_bytes()) as url:
        yield url


def test_url_and_file_id_sources_are_identified_by_url_and_id(ledger, server, photos, photo_site):
    key = "k-url-id"
    client = make_client(server, key)
    url = f"{photo_site}/study/S07_T1.jpg"
    by_url = ledger.submit(client, url, ["redness"])
    assert by_url.status == "success" and by_url.image_name == "S07_T1.jpg"
    row = ledger.submissions(ids=[by_url.id]).iloc[0]
    assert (row.source_kind, row.source_key, row.image_sha256) == ("url", f"url:{url}", None)
    n = len(tasks_of(server, key))
    with pytest.warns(LedgerReuseWarning):
        assert ledger.submit(client, url, ["redness"]).id == by_url.id  # the same URL: reused
    assert len(tasks_of(server, key)) == n
    other = ledger.submit(client, url + "?v=2", ["redness"])  # another URL (same bytes): a new task
    assert not other.reused and len(tasks_of(server, key)) == n + 1
    file_id = client.upload(photos[2])
    by_id = ledger.submit(client, file_id, ["redness"])
    row = ledger.submissions(ids=[by_id.id]).iloc[0]
    assert (row.source_kind, row.source_key, row.file_id) == ("file_id", f"file_id:{file_id}", file_id)
    with pytest.warns(LedgerReuseWarning):
        assert ledger.submit(client, file_id, ["redness"]).id == by_id.id
    assert len(tasks_of(server, key)) == n + 2
    # the bytes themselves are a third identity, neither the URL nor the file id
    by_bytes = ledger.submit(client, photos[2], ["redness"])
    assert not by_bytes.reused and by_bytes.id not in (by_url.id, other.id, by_id.id)
    assert len(tasks_of(server, key)) == n + 3


def test_failed_task_is_recorded_unbilled_and_can_be_raised(ledger, server, photos):
    key = "k-error"
    client = make_client(server, key)
    sub = ledger.submit(client, photos[2], ["wrinkle"], file_name="x__error_no_face__.jpg")
    assert sub.status == "error" and sub.error_code == "error_no_face"
    assert sub.units_charged == 0 and sub.task_id
    assert "frontal photo" in sub.next_step and "Not billed" in sub.next_step
    assert server.app.balance(key) == server.app.config.initial_units
    # a failed task does not block a new attempt (failed tasks are free); raise_on_error raises the class
    with pytest.raises(errors.NoFaceError):
        ledger.submit(client, photos[2], ["wrinkle"], file_name="y__error_no_face__.jpg", raise_on_error=True)
    assert list(ledger.submissions()["status"]) == ["error", "error"]


def test_upload_failure_is_recorded_and_raised(ledger, server, photos):
    client = make_client(server, "k-upload")
    client.retry.max_retries_5xx = 0
    server.faults.fail("storage_put", n=1, status=503)
    with pytest.raises(errors.UploadError):
        ledger.submit(client, photos[3], ["pore"])
    row = ledger.submissions().iloc[0]
    assert row.status == "error" and row.task_id is None and row.units_charged == 0
    assert "No task was created" in row.error_message
    assert ledger.submit(client, photos[3], ["pore"]).status == "success"  # the retry is allowed


def test_lost_create_answer_is_ambiguous_never_resent_and_resolvable(ledger, server, photos):
    key = "k-lost"
    client = make_client(server, key)
    server.faults.lose_create_response(n=1)
    with pytest.warns(LedgerReuseWarning, match="answer was lost"):
        sub = ledger.submit(client, photos[4], ["texture"])
    assert sub.status == "ambiguous" and sub.error_code == "create_fate_unknown" and sub.task_id is None
    assert "ledger.resolve" in sub.next_step and "YouCam console" in sub.next_step
    created = tasks_of(server, key)
    assert len(created) == 1  # the service did create it
    settle(server)
    with pytest.warns(LedgerReuseWarning, match="ambiguous, so nothing was sent"):
        again = ledger.submit(client, photos[4], ["texture"])
    assert again.reused and again.status == "ambiguous" and len(tasks_of(server, key)) == 1
    with pytest.warns(UserWarning, match="never re-sent automatically"):
        report = ledger.resume(client)
    assert report.loc[report.submission_id == sub.id, "status"].item() == "ambiguous"
    # the user finds the task in the console and attaches it
    ledger.resolve(sub.id, task_id=created[0].task_id)
    ledger.resume(client)
    done = ledger.get(sub.id)
    assert done.status == "success" and done.units_charged == estimate_units(["texture"])
    assert len(tasks_of(server, key)) == 1
    with pytest.raises(LedgerError, match="not ambiguous"):
        ledger.resolve(sub.id, created=False)


def test_create_refused_is_an_error_not_ambiguous(ledger, server, photos):
    client = make_client(server, "k-refused")
    client.retry.max_retries_429 = 0
    server.faults.rate_limit(n=1, route="create")
    with pytest.raises(errors.RateLimitError):
        ledger.submit(client, photos[5], ["acne"])
    row = ledger.submissions().iloc[0]
    assert row.status == "error" and row.error_code is not None and row.units_charged == 0
    assert ledger.submit(client, photos[5], ["acne"]).status == "success"


def test_timeout_keeps_the_task_and_resubmit_or_resume_collect_it(tmp_path, photos):
    with LocalServer(task_duration_s=1.0, rate_limit=None) as slow:
        client = make_client(slow, "k-slow")
        led = Ledger(tmp_path / "ledger.sqlite")
        with pytest.warns(UserWarning, match="timeout"):
            sub = led.submit(client, photos[6], ["oiliness"], timeout=0.2)
        assert sub.status == "timeout" and sub.task_id and "resume" in sub.next_step
        settle(slow)
        # re-submitting waits for the same task instead of creating one
        with pytest.warns(LedgerReuseWarning, match="waiting for it"):
            again = led.submit(client, photos[6], ["oiliness"], timeout=10)
        assert again.reused and again.id == sub.id and again.status == "success"
        assert len(tasks_of(slow, "k-slow")) == 1
        # wait=False, then resume
        nowait = led.submit(client, photos[7], ["oiliness"], wait=False)
        assert nowait.status == "running"
        report = led.resume(client, timeout=10)
        assert report.set_index("submission_id").loc[nowait.id, "status"] == "success"
        assert led.get(nowait.id).result.score("oiliness") is not None
        led.close()


def test_resume_refetches_missing_results(ledger, server, photos):
    client = make_client(server, "k-refetch")
    sub = ledger.submit(client, photos[0], ["moisture"])
    score = sub.result.score("moisture")
    shutil.rmtree(sub.result_dir)
    report = ledger.resume(client)
    assert list(report.submission_id) == [sub.id] and report.status.item() == "success"
    assert (sub.result_dir / "result.json").exists()
    assert ledger.get(sub.id).result.score("moisture") == score


def test_failed_download_keeps_the_task_and_resume_fetches_fresh_urls(ledger, server, photos):
    from skinlab.client import RetryPolicy

    client = make_client(server, "k-download")
    client.retry = RetryPolicy(base=0.0, sleep=lambda s: None)
    server.faults.fail("storage_get", n=50, status=500)
    with pytest.warns(UserWarning, match="could not be downloaded"):
        sub = ledger.submit(client, photos[1], ["tear_trough"])
    server.faults.clear()
    assert sub.status == "running" and sub.error_code == "download_failed"
    assert sub.row["task_state"] == "success" and sub.units_charged == estimate_units(["tear_trough"])
    assert "billed" in sub.next_step and "fresh result URLs" in sub.next_step
    server.faults.expire_urls()  # the URLs of that poll are stale by now anyway
    report = ledger.resume(client)
    assert report.status.item() == "success" and report.before.item() == "running"
    done = ledger.get(sub.id)
    assert done.error_code is None and done.result.score("tear_trough") is not None
    assert len(tasks_of(server, "k-download")) == 1


def test_orphaned_rows_of_dead_processes_are_marked_interrupted(ledger, server, photos):
    client = make_client(server, "k-orphan")
    ledger.submit(client, photos[0], ["radiance"], wait=False)
    ledger.resume(client)
    with ledger._tx() as cur:  # a row a killed process left behind while uploading
        cur.execute("UPDATE submissions SET status='uploading', task_id=NULL, owner='%s:999999999:dead'"
                    % __import__("socket").gethostname())
    report = ledger.resume(client)
    assert report.iloc[0].status == "error" and report.iloc[0].error_code == "interrupted"
    assert "submit it again" in report.iloc[0].next_step


def test_api_key_is_never_stored(tmp_path, server, photos):
    led = Ledger(tmp_path / "ledger.sqlite")
    client = make_client(server, SECRET_KEY)
    led.submit(client, photos[1], ["eye_bag"], tags={"subject": "S1"})
    server.faults.lose_create_response(n=1)
    with pytest.warns(LedgerReuseWarning):
        led.submit(client, photos[2], ["eye_bag"])
    led.close()
    blobs = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert SECRET_KEY.encode() not in blobs
    assert SECRET_KEY[-16:].encode() not in blobs
    assert b"eye_bag" in blobs  # the grep does see the database contents


# --------------------------------------------------------------------------- tables and exports


def _fake_result(backend, engine, actions=("wrinkle", "pore"), value=50.0):
    return {"task_id": f"t-{backend}-{value}", "format": "zip", "tier": "sd", "backend": backend, "engine": engine,
            "api_version": "v2.0", "overall": value, "skin_age": 30,
            "scores": [{"action": a, "region": "whole", "raw_score": value + i, "ui_score": int(value) + i,
                        "skin_type": None} for i, a in enumerate(actions)]}


def test_columns_are_stable(ledger):
    assert SUBMISSION_COLUMNS == [
        "submission_id", "created_at", "updated_at", "status", "image_name", "image_path", "image_sha256",
        "image_size", "image_width", "image_height", "source_kind", "source_key", "preflight", "backend", "base_url",
        "api_version", "engine", "actions", "tier", "miniserver_args", "format", "pf_camera_kit", "file_id", "task_id",
        "task_created_at", "task_state", "completed_at", "last_polled_at", "error_code", "error_message", "next_step",
        "request_ids", "units_estimated", "units_charged", "result_dir", "overall", "skin_age",
        "subject", "timepoint", "condition"]
    assert SCORE_COLUMNS == [
        "submission_id", "created_at", "completed_at", "image_name", "image_sha256", "subject", "timepoint",
        "condition", "backend", "engine", "api_version", "tier", "format", "task_id",
        "action", "concern", "region", "raw_score", "ui_score", "skin_type"]
    assert WIDE_INDEX == ["submission_id", "created_at", "image_name", "image_sha256", "subject", "timepoint",
                          "condition", "backend", "engine", "tier"]
    ledger.record(_fake_result("local", "skinlab-local 1"), image_name="a.jpg", tags={"subject": "S1", "visit": "2"})
    assert list(ledger.submissions().columns) == SUBMISSION_COLUMNS + ["tag_visit"]
    assert list(ledger.scores().columns) == SCORE_COLUMNS + ["tag_visit"]
    wide = ledger.wide()
    assert list(wide.columns) == WIDE_INDEX + ["tag_visit", "overall", "skin_age", "wrinkle", "pore"]
    # empty selections keep the columns
    assert list(ledger.submissions(status="running").columns)[:len(SUBMISSION_COLUMNS)] == SUBMISSION_COLUMNS
    assert list(ledger.scores(subject="nobody").columns)[:len(SCORE_COLUMNS)] == SCORE_COLUMNS
    # the module docstring documents every column
    doc = skinlab.ledger.__doc__
    for col in SUBMISSION_COLUMNS + SCORE_COLUMNS:
        assert col in doc, col


def test_filters(ledger):
    ledger.record(_fake_result("local", "e1", value=10), image_name="a.jpg",
                  tags={"subject": "S1", "timepoint": "T0", "site": "A"})
    ledger.record(_fake_result("local", "e1", value=20), image_name="b.jpg",
                  tags={"subject": "S1", "timepoint": "T1", "site": "B"})
    ledger.record(_fake_result("local", "e1", value=30), image_name="c.jpg", tags={"subject": "S2", "timepoint": "T0"})
    assert list(ledger.submissions(subject="S1").image_name) == ["a.jpg", "b.jpg"]
    assert list(ledger.submissions(timepoint=["T1"]).image_name) == ["b.jpg"]
    assert list(ledger.submissions(tags={"site": "B"}).image_name) == ["b.jpg"]
    assert list(ledger.submissions(tags={"site": ["A", "B"]}).image_name) == ["a.jpg", "b.jpg"]
    assert len(ledger.submissions(status="success", backend="local")) == 3
    assert len(ledger.submissions(status="error")) == 0
    assert len(ledger.submissions(since="2000-01-01", until=pd.Timestamp.now(tz="UTC") + pd.Timedelta("1h"))) == 3
    assert len(ledger.submissions(since=pd.Timestamp.now(tz="UTC") + pd.Timedelta("1h"))) == 0
    tidy = ledger.scores(subject="S2")
    assert set(tidy["raw_score"]) == {30.0, 31.0} and set(tidy["concern"]) == {"wrinkle", "pore"}
    assert tidy["ui_score"].dtype == "Int64" and str(tidy["created_at"].dtype).startswith("datetime64")
    assert set(ledger.scores(actions="pore")["action"]) == {"pore"} and len(ledger.scores(actions=["pore"])) == 3
    with pytest.raises(LedgerError, match="Unknown action or concern"):
        ledger.scores(actions=["wrinkles"])
    full, compact = ledger.scores(), ledger.scores(compact=True)
    assert isinstance(compact["action"].dtype, pd.CategoricalDtype) and compact["subject"].dtype == "category"
    assert compact["raw_score"].tolist() == full["raw_score"].tolist()
    assert compact["subject"].astype(str).tolist() == full["subject"].tolist()
    with pytest.raises(LedgerError, match="Unknown filter"):
        ledger.submissions(colour="red")
    with pytest.raises(LedgerError, match="Unknown status"):
        ledger.submissions(status="done")
    # a typo in a closed set is an error naming the values, never an empty table
    with pytest.raises(LedgerError, match=r"Unknown backend \['lcoal'\]; the backend values are cloud, local"):
        ledger.scores(backend="lcoal")
    with pytest.raises(LedgerError, match="Unknown tier"):
        ledger.submissions(tier=["sd", "HD"])
    with pytest.raises(LedgerError, match="Unknown format"):
        ledger.wide(format="png")
    assert len(ledger.submissions(tier=[None, "sd", "hd"])) == len(ledger.submissions())  # None: rows without one
    everything = ledger.submissions()
    assert len(everything) and len(ledger.submissions(backend=["local", "cloud"])) == len(everything)


def test_local_and_cloud_scores_are_never_pooled_silently(ledger):
    ledger.record(_fake_result("local", "skinlab-local 0.1.0; face=x", value=10), image_name="a.jpg")
    ledger.record(_fake_result("cloud", "youcam-skin-analysis v2.0", value=70), image_name="a.jpg")
    with pytest.raises(MixedBackendsError, match="backend='cloud' or backend='local'"):
        ledger.scores()
    with pytest.raises(MixedBackendsError):
        ledger.wide()
    assert set(ledger.scores(backend="local")["backend"]) == {"local"}
    assert set(ledger.wide(backend="cloud")["wrinkle"]) == {70.0}
    both = ledger.scores(allow_mixed=True)
    assert set(both["backend"]) == {"local", "cloud"} and len(both) == 4
    ledger.record(_fake_result("local", "skinlab-local 0.2.0; face=y", value=12), image_name="b.jpg")
    with pytest.warns(UserWarning, match="2 engine versions"):
        ledger.scores(backend="local")


def test_wide_pivot_regions_and_skin_type(ledger):
    result = _fake_result("cloud", "youcam-skin-analysis v2.0", actions=("hd_wrinkle",), value=40)
    result["tier"] = "hd"
    result["scores"] += [{"action": "hd_wrinkle", "region": "forehead", "raw_score": 41.5, "ui_score": 41},
                         {"action": "hd_skin_type", "region": "whole", "skin_type": "Oily"},
                         {"action": "hd_skin_type", "region": "t_zone", "skin_type": "Dry"}]
    ledger.record(result, image_name="hd.jpg", tags={"subject": "S9"})
    wide = ledger.wide()
    row = wide.iloc[0]
    assert (row.hd_wrinkle, row.hd_wrinkle_forehead) == (40.0, 41.5)
    assert (row.hd_skin_type, row.hd_skin_type_t_zone) == ("Oily", "Dry")
    assert row.subject == "S9" and row.overall == 40 and row.skin_age == 30
    assert ledger.wide(value="ui_score").iloc[0].hd_wrinkle_forehead == 41


def test_exports_and_deidentification(tmp_path, ledger, server, photos):
    pytest.importorskip("pyarrow")
    client = make_client(server, "k-export")
    # an image inside the study folder is stored by relative path
    inside = ledger.root / "photos" / "Alice_Smith_T0.jpg"
    inside.parent.mkdir()
    shutil.copy(photos[3], inside)
    ledger.submit(client, inside, ["firmness"], tags={"subject": "P01"})
    assert ledger.submissions().image_path.item() == "photos/Alice_Smith_T0.jpg"
    csv = ledger.export(tmp_path / "out" / "scores.csv")
    back = pd.read_csv(csv)
    assert list(back.columns) == SCORE_COLUMNS and back.image_name.item() == "Alice_Smith_T0.jpg"
    pq = ledger.export(tmp_path / "out" / "subs.parquet", "submissions")
    assert list(pd.read_parquet(pq).columns) == SUBMISSION_COLUMNS
    sha = ledger.submissions().image_sha256.item()
    for name in ("submissions", "scores", "wide"):
        for suffix in ("csv", "parquet"):
            out = ledger.export(tmp_path / "deid" / f"{name}.{suffix}", name, deidentify=True, salt="pepper")
            blob = out.read_bytes()
            assert b"Alice" not in blob and b"photos/" not in blob and str(ledger.root).encode() not in blob
            assert sha.encode() not in blob
            df = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
            assert not (set(DEIDENTIFIED_DROP) - {"image_sha256"}) & set(df.columns)  # salted: the keyed hash
            assert "P01" in set(df["subject"])
    size = str(ledger.submissions().image_size.item())
    for name in ("submissions", "scores", "wide"):
        # without a salt, nothing leads back to the photo: no SHA-256 (anyone with the photos can hash
        # them), no byte size (as telling), no names, paths or service ids
        out = ledger.export(tmp_path / "plain" / f"{name}.csv", name, deidentify=True)
        df = pd.read_csv(out)
        assert not set(DEIDENTIFIED_DROP) & set(df.columns), df.columns
        assert {"image_sha256", "image_size", "image_name", "task_id"}.isdisjoint(df.columns)
        assert sha.encode() not in out.read_bytes() and "P01" in set(df["subject"])
        if name == "submissions":
            assert size not in set(df.astype(str).to_numpy().ravel())
    unsalted = ledger.table("submissions", deidentify=True)
    assert "image_sha256" not in unsalted.columns and "image_size" not in unsalted.columns
    assert "task_id" not in unsalted.columns and "base_url" not in unsalted.columns
    salted = ledger.table("submissions", deidentify=True, salt="pepper")
    assert salted.image_sha256.item() not in (sha, ledger.table("submissions", deidentify=True, salt="other")
                                              .image_sha256.item())
    assert "image_sha256" in DEIDENTIFIED_DROP and "image_size" in DEIDENTIFIED_DROP
    assert "image_sha256" in skinlab.ledger.__doc__.split("De-identified exports")[1]
    with pytest.raises(LedgerError, match="csv or .parquet"):
        ledger.export(tmp_path / "x.xlsx")


def test_study_folder_can_be_moved(tmp_path, server, photos):
    study = tmp_path / "study"
    led = Ledger(study / "ledger.sqlite")
    sub = led.submit(make_client(server, "k-move"), photos[4], ["age_spot"])
    score = sub.result.score("age_spot")
    led.close()
    moved = tmp_path / "elsewhere" / "study2"
    moved.parent.mkdir()
    shutil.move(str(study), str(moved))
    led2 = Ledger(moved / "ledger.sqlite")
    assert led2.get(sub.id).result_dir == moved / f"results/{sub.id:06d}"
    assert led2.result(sub.id).score("age_spot") == score
    led2.close()


def test_schema_version_and_migrations(tmp_path):
    db = tmp_path / "ledger.sqlite"
    led = Ledger(db)
    assert led.schema_version == skinlab.ledger.SCHEMA_VERSION == 1
    led.record(_fake_result("local", "e"), image_name="a.jpg")
    led.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in con.execute("SELECT version FROM schema_migrations")] == [1]
    assert con.execute("SELECT action, region, raw_score FROM score_rows ORDER BY action").fetchall() == [
        ("pore", "whole", 51.0), ("wrinkle", "whole", 50.0)]
    con.close()
    assert len(Ledger(db)) == 1  # reopening migrates nothing and keeps the rows
    con = sqlite3.connect(db)
    con.execute("INSERT INTO schema_migrations VALUES (7, 'from the future', 0, '9.9')")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="newer than this skinlab"):
        Ledger(db)


def test_location_warning(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/export /mnt/lab nfs4 rw 0 0\n"
                      "//nas/share /mnt/my\\040share cifs rw 0 0\n")
    assert "nfs4" in location_warning("/mnt/lab/study/ledger.sqlite", mounts_file=str(mounts))
    assert "cifs" in location_warning("/mnt/my share/ledger.sqlite", mounts_file=str(mounts))
    assert location_warning("/home/me/study/ledger.sqlite", mounts_file=str(mounts)) is None
    assert "cloud-synced" in location_warning("/Users/me/Library/CloudStorage/OneDrive-Lab/x.sqlite")
    assert "cloud-synced" in location_warning("C:/Users/me/Dropbox/study/ledger.sqlite")
    with pytest.warns(LedgerLocationWarning, match="cloud-synced"):
        Ledger(tmp_path / "Google Drive" / "study" / "ledger.sqlite").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ledger(tmp_path / "plain" / "ledger.sqlite").close()


def test_record_and_submission_objects(ledger, tmp_path):
    img = tmp_path / "x.jpg"
    img.write_bytes(b"\xff\xd8fake")
    sub = ledger.record(_fake_result("local", "e"), image=img, tags={"subject": "S3", "arm": "B"})
    assert sub.status == "success" and sub.image_sha256 == hashlib.sha256(b"\xff\xd8fake").hexdigest()
    assert sub.tags == {"subject": "S3", "arm": "B"}
    assert "success" in repr(sub) and "1 success" in repr(ledger)
    ledger.tag(sub.id, timepoint="T2", arm=None)
    assert ledger.get(sub.id).tags == {"subject": "S3", "timepoint": "T2"}
    summary = ledger.summary()
    assert summary.to_dict("records") == [{"backend": "local", "status": "success", "submissions": 1,
                                           "units_charged": 9}]
    with pytest.raises(LedgerError, match="no saved result"):
        ledger.result(sub.id)  # recorded from a dict: scores only, no results folder
    with pytest.raises(LedgerError, match="No submission 999"):
        ledger.get(999)


def test_ledger_displays_as_html_in_a_notebook(ledger):
    assert "No submissions yet" in ledger._repr_html_()
    for i in range(24):
        ledger.record(_fake_result("local", "skinlab-local 1", value=10 + i), image_name=f"private_name_{i}.jpg",
                      tags={"subject": f"S{i % 3}", "condition": "<b>arm</b>" if i == 23 else "A", "visit": str(i)})
    ledger.record(_fake_result("cloud", "youcam-skin-analysis v2.0", value=90), image_name="cloud.jpg")
    page = ledger._repr_html_()
    assert "Submissions</th><td style='text-align:left'>25" in page
    assert "Status</th><td style='text-align:left'>success: 25" in page
    assert "local: 24, cloud: 1" in page and "mixes backends (cloud, local)" in page
    assert "The 20 most recent of 25 rows" in page
    listed = page.split("most recent")[1]
    ids = [int(x) for x in re.findall(r"<tr>\s*<td>(\d+)</td>", listed)]
    assert ids == list(range(6, 26))  # the 20 most recent, oldest first; 1-5 are only counted
    assert "tag_visit" in listed and "units_charged" in listed and "90.0" in listed  # the listed rows in full
    assert "&lt;b&gt;arm&lt;/b&gt;" in page and "<b>arm" not in page
    assert "private_name" not in page and "<img" not in page  # no file names, no faces
    assert ledger._repr_html_(max_rows=3).count("<tr>") < page.count("<tr>")
    ledger.close()
    assert ledger._repr_html_() is None  # a broken display falls back to the text repr instead of raising


def test_a_create_in_flight_in_another_thread_is_waited_for_not_repeated(ledger, server, photos):
    import threading
    import time

    key = "k-inflight"
    server.faults.slow("create", 1.0, n=1)
    first = {}
    worker = threading.Thread(target=lambda: first.update(
        sub=ledger.submit(make_client(server, key), photos[6], ["droopy_upper_eyelid"])))
    worker.start()
    end = time.monotonic() + 10
    while ledger.submissions(status="ambiguous").empty and time.monotonic() < end:
        time.sleep(0.02)
    row = ledger.submissions().iloc[0]
    assert row.status == "ambiguous" and row.error_code == "create_unconfirmed"
    assert row.next_step.startswith("A create request is being sent")
    assert ledger.resume(make_client(server, key)).empty  # an in-flight create is not listed as ambiguous
    other = Ledger(ledger.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerReuseWarning)
        second = other.submit(make_client(server, key), photos[6], ["droopy_upper_eyelid"], timeout=20)
    worker.join(20)
    assert first["sub"].status == "success" and not first["sub"].reused
    assert second.reused and second.status == "success" and second.id == first["sub"].id
    assert len(tasks_of(server, key)) == 1
    other.close()


def test_submit_many_records_each_and_skips_bad_files(ledger, server, photos, tmp_path):
    client = make_client(server, "k-many")
    missing = tmp_path / "nope" / "missing.jpg"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = ledger.submit_many(client, [photos[2], missing, photos[3], photos[2]], ["redness"],
                                   tags=skinlab.tags.FilenamePattern("{subject}_{timepoint}.jpg"))
    assert list(table["status"]) == ["success", "success"]  # the repeat is the same submission
    assert list(table["subject"]) == ["S02", "S03"]
    texts = [str(w.message) for w in caught]
    assert any("skipped missing.jpg" in t for t in texts)
    assert any("reused and nothing was billed" in t for t in texts)
    assert len(tasks_of(server, "k-many")) == 2


def test_a_ledger_locked_for_longer_than_the_timeout_says_what_to_do(tmp_path):
    import time

    from skinlab.ledger import LedgerLockedError

    db = tmp_path / "ledger.sqlite"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    t0 = time.monotonic()
    try:
        with pytest.raises(LedgerLockedError, match="another process kept it locked") as caught:
            Ledger(db, timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert isinstance(caught.value, LedgerError)
    assert "Close other notebooks or batch runs" in str(caught.value) and "timeout=" in str(caught.value)
    assert time.monotonic() - t0 < 10  # retried with backoff until the timeout (at least 1 s), not forever
    led = Ledger(db)  # once the lock is gone the same file opens normally
    assert led.schema_version == skinlab.ledger.SCHEMA_VERSION and len(led) == 0
    led.close()


def test_location_warning_follows_symbolic_links(tmp_path):
    """A link from a local folder into a cloud-synced folder or onto a network mount is caught."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/export /mnt/lab nfs4 rw 0 0\n")
    synced = tmp_path / "Dropbox" / "study"
    synced.mkdir(parents=True)
    (tmp_path / "study").symlink_to(synced, target_is_directory=True)
    why = location_warning(tmp_path / "study" / "ledger.sqlite", mounts_file=str(mounts))
    assert why and "cloud-synced" in why and "a link to" in why and "Dropbox" in why
    (tmp_path / "lab").symlink_to("/mnt/lab/project", target_is_directory=True)  # dangling here: resolved anyway
    why = location_warning(tmp_path / "lab" / "ledger.sqlite", mounts_file=str(mounts))
    assert why and "nfs4" in why and "/mnt/lab" in why
    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "plain-link").symlink_to(plain, target_is_directory=True)
    assert location_warning(tmp_path / "plain-link" / "ledger.sqlite", mounts_file=str(mounts)) is None
    with pytest.warns(LedgerLocationWarning, match="a link to .*Dropbox"):
        Ledger(tmp_path / "study" / "ledger.sqlite").close()


def test_a_new_schema_version_migrates_a_v1_file_and_keeps_its_rows(tmp_path, monkeypatch):
    """A v2 step (a new column) applied to a v1 file holding rows: the rows and scores are kept,
    version 2 is recorded in schema_migrations and user_version, and reopening applies nothing."""
    from skinlab import ledger as ledger_mod

    assert ledger_mod.SCHEMA_VERSION == max(v for v, _, _ in ledger_mod._MIGRATIONS)
    db = tmp_path / "study" / "ledger.sqlite"
    led = Ledger(db)
    first = led.record(_fake_result("local", "e", value=40), image_name="a.jpg", tags={"subject": "S1"})
    led.record(_fake_result("local", "e", value=60), image_name="b.jpg", tags={"subject": "S2", "arm": "B"})
    before_subs = led.submissions().drop(columns=["next_step"])
    before_scores = led.scores()
    assert led.schema_version == 1
    led.close()

    applied = []

    def backfill(cur):
        applied.append(True)
        cur.execute("UPDATE submissions SET reviewer = 'nobody yet'")

    v2 = (2, "test: a reviewer column", ["ALTER TABLE submissions ADD COLUMN reviewer TEXT", backfill])
    monkeypatch.setattr(ledger_mod, "_MIGRATIONS", ledger_mod._MIGRATIONS + [v2])
    monkeypatch.setattr(ledger_mod, "SCHEMA_VERSION", 2)
    led = Ledger(db)
    assert applied == [True] and led.schema_version == 2
    pd.testing.assert_frame_equal(led.submissions().drop(columns=["next_step"]), before_subs)
    pd.testing.assert_frame_equal(led.scores(), before_scores)
    assert led.get(first.id).row["reviewer"] == "nobody yet"
    sub = led.record(_fake_result("local", "e", value=70), image_name="c.jpg")  # new rows still recorded
    assert len(led) == 3 and led.get(sub.id).row["reviewer"] is None
    led.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    assert [r[0:2] for r in con.execute("SELECT version, description FROM schema_migrations ORDER BY version")] == [
        (1, "initial schema: submissions, scores"), (2, "test: a reviewer column")]
    con.close()
    Ledger(db).close()  # reopening applies nothing (a second ADD COLUMN would fail)
    assert applied == [True]


def test_a_failing_migration_changes_nothing(tmp_path, monkeypatch):
    from skinlab import ledger as ledger_mod

    db = tmp_path / "ledger.sqlite"
    led = Ledger(db)
    led.record(_fake_result("local", "e"), image_name="a.jpg")
    led.close()
    broken = (2, "test: broken", ["ALTER TABLE submissions ADD COLUMN fine TEXT", "ALTER TABLE nowhere ADD COLUMN x"])
    monkeypatch.setattr(ledger_mod, "_MIGRATIONS", ledger_mod._MIGRATIONS + [broken])
    with pytest.raises(LedgerError, match=r"schema version 2 \(test: broken\) failed.*not changed \(still version 1;"):
        Ledger(db)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [r[0] for r in con.execute("SELECT version FROM schema_migrations")] == [1]
    assert "fine" not in [r[1] for r in con.execute("PRAGMA table_info(submissions)")]
    assert con.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 1
    con.close()


def test_submission_displays_as_html_without_any_image(ledger, server, photos):
    client = make_client(server, "k-html")
    sub = ledger.submit(client, photos[4], ["wrinkle", "pore"], tags={"subject": "S04", "visit": "<2>"})
    page = sub._repr_html_()
    assert page.startswith("<div") and f"skinlab Submission {sub.id}: success" in page
    assert "success" in page and "local" in page and sub.engine in page  # status, backend, engine
    assert "Wrinkles" in page and "Pores" in page and "raw_score" in page  # the score table
    assert "S04" in page and "tag_visit" in page and "&lt;2&gt;" in page and "<2>" not in page
    assert "<img" not in page and "data:image" not in page  # never a face
    assert photos[4].name not in page and str(photos[4].parent) not in page  # nor the file name or path
    failed = ledger.submit(client, photos[5], ["wrinkle"], file_name="x__error_no_face__.jpg")
    page = failed._repr_html_()
    assert "error_no_face" in page and "Not billed" in page and "AnalysisResult" not in page
    with pytest.warns(LedgerReuseWarning):
        reused = ledger.submit(client, photos[4], ["wrinkle", "pore"])
    page = reused._repr_html_()
    assert "(reused, nothing billed)" in page and "it was reused and nothing was billed" in page
    recorded = ledger.record(_fake_result("local", "e"), image_name="secret_name.jpg")
    page = recorded._repr_html_()
    assert "without a results folder" in page and "secret_name" not in page


def test_opening_a_missing_path_says_a_new_ledger_was_created(tmp_path, caplog):
    """A mistyped path (stduy/ for study/) used to give an empty ledger silently."""
    import logging

    study = tmp_path / "study"
    Ledger(study / "ledger.sqlite").record(_fake_result("local", "e"), image_name="a.jpg")
    typo = tmp_path / "stduy" / "ledger.sqlite"
    with caplog.at_level(logging.INFO, logger="skinlab.ledger"):
        led = Ledger(typo)
    assert led.created is True
    (msg,) = [r.getMessage() for r in caplog.records if "new, empty ledger" in r.getMessage()]
    assert str(typo) in msg and "check the path" in msg
    assert caplog.records[-1].levelno == logging.INFO
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skinlab.ledger"):
        assert led.scores().empty
    assert any("holds no submissions at all" in r.getMessage() and "check the" in r.getMessage()
               for r in caplog.records)
    led.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="skinlab.ledger"):
        again, existing = Ledger(typo), Ledger(study / "ledger.sqlite")
        assert not existing.scores(backend="local").empty
    assert again.created is False and existing.created is False
    told = [r for r in caplog.records if "new, empty ledger" in r.getMessage() or "no submissions" in r.getMessage()]
    assert not told
    again.close()
    existing.close()


def test_message_parts_join_as_sentences_without_saying_a_hint_twice():
    from skinlab.ledger import sentences

    hint = "Face the camera straight on, head level."
    joined = sentences(f"The head is turned too far. {hint}", f"{hint} Not billed; fix the cause and submit again.")
    assert joined == f"The head is turned too far. {hint} Not billed; fix the cause and submit again."
    assert sentences("No face detected on source image", "Use a frontal photo.") == \
        "No face detected on source image. Use a frontal photo."
    assert sentences(None, " ", "") == ""


def test_close_leaves_no_wal_or_shm_files_and_works_as_a_context_manager(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        led._conn.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
        led._conn.execute("INSERT INTO scratch VALUES (1)")
        assert (tmp_path / "ledger.sqlite-wal").exists()
    assert not (tmp_path / "ledger.sqlite-wal").exists() and not (tmp_path / "ledger.sqlite-shm").exists()
    led.close()  # twice: harmless
    with Ledger(path) as again:
        assert again._conn.execute("SELECT x FROM scratch").fetchall()[0][0] == 1


@pytest.mark.parametrize("url, local", [
    ("http://127.0.0.1:40000", True), ("http://localhost:8765/", True), ("http://[::1]:9/", True),
    ("http://127.3.4.5:1", True), ("https://127.0.0.1.example.com", False), ("https://yce-api-01.makeupar.com", False),
])
def test_backend_key_calls_only_this_machine_local(url, local):
    """A cloud host named like a loopback address must never be treated as the free local
    emulator (whose lost tasks are re-run): that would bill an image twice."""
    from skinlab.client import _is_loopback
    from skinlab.ledger import _backend_key

    assert (_backend_key(url) == "local") is local
    assert _is_loopback(url) is local       # the client and the ledger agree


def test_a_path_that_is_no_ledger_is_a_ledger_error_and_is_left_untouched(tmp_path):
    """skinlab.Ledger() on a photo or a folder raised raw sqlite3 errors; now LedgerError (in the
    one exception tree), naming the path and the fix, and the file is not changed."""
    photo = tmp_path / "victim.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + b"not a database" * 100)
    before = photo.read_bytes()
    with pytest.raises(LedgerError, match=r"victim.jpg' is not a skinlab ledger: it is not an SQLite database"):
        Ledger(photo)
    assert photo.read_bytes() == before
    with pytest.raises(LedgerError, match=r"is a folder, not a ledger file"):
        Ledger(tmp_path)


def test_another_programs_sqlite_file_is_refused_untouched(tmp_path):
    """A ledger path that names another program's SQLite database used to get skinlab's tables
    (and WAL mode) added to it; it is refused and its bytes stay the same."""
    import sqlite3

    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(LedgerError, match=r"other.db' is not a skinlab ledger: it is another program's SQLite "
                                          r"database \(tables: notes\).*left untouched"):
        Ledger(other)
    assert other.read_bytes() == before and not (tmp_path / "other.db-wal").exists()
    fresh = Ledger(tmp_path / "empty.sqlite")  # a new file still becomes a ledger, and opens again
    fresh.close()
    Ledger(tmp_path / "empty.sqlite").close()
