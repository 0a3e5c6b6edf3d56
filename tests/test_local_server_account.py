"""The emulator's account and lifecycle features over real HTTP, with an injectable clock:
rate limits (§8.1), units and costs (§8.2, §8.3), deletion (§8.4), retention (§8.5), timing
(§5.6), webhooks (§8.7), list-form upload headers (§3.3), strict mode (§5.4) and fault injection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from PIL import Image

from contract import example
from skinlab.actions import HD_ACTIONS, SD_ACTIONS, UNIT_TIERS
from skinlab.local import LatencyModel, serve
from test_local_server import FID, Api, assert_task_error, error_body, jpeg_bytes, portrait, portrait_jpeg, xml_code

HOUR, DAY = 3600.0, 86400.0


class FakeClock:
    """A settable clock for ServerConfig.clock."""

    def __init__(self, start: float = 1_767_225_600.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock():
    return FakeClock()


def credit(api: Api) -> dict:
    resp = api.get("/s2s/v1.0/client/credit")
    assert resp.status_code == 200
    return resp.json()


def balance(api: Api) -> float:
    return credit(api)["results"][0]["amount_dec"]


def engine_done(srv, *task_ids: str, timeout: float = 60) -> None:
    """Wait (real time) until the engine has finished these tasks; the fake clock stands still."""
    deadline = time.monotonic() + timeout
    while not all(srv.app.task(t) is None or srv.app.task(t).outcome is not None for t in task_ids):
        assert time.monotonic() < deadline
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# Rate limits (§8.1)
# ----------------------------------------------------------------------------------------------

def test_rate_limit_250_per_300s_per_key(clock):
    with serve(task_duration_s=0, clock=clock) as srv:
        api = Api(srv.url, "rate-key")
        for _ in range(5):   # authentication failures are not counted
            assert api.get("/s2s/v1.0/client/credit", headers={"Authorization": "Bearer <x>"}).status_code == 401
        codes = [api.get("/s2s/v1.0/client/credit").status_code for _ in range(250)]
        assert codes == [200] * 250
        resp = api.post("/s2s/v2.0/task/skin-analysis", {"src_file_id": FID, "dst_actions": ["wrinkle"]})
        assert resp.status_code == 429 and resp.json() == example("error-429.json")
        assert "Retry-After" not in resp.headers and not any(h.lower().startswith("x-ratelimit") for h in resp.headers)
        assert re.fullmatch(r"\d{18}", resp.headers["x-request-id"])
        assert api.get("/s2s/v2.0/task/skin-analysis/x").status_code == 429   # every API route counts
        clock.advance(300)
        assert api.get("/s2s/v1.0/client/credit").status_code == 200


def test_rate_limit_sliding_window_429s_not_counted_and_per_ip(clock):
    with serve(task_duration_s=0, clock=clock, rate_limit=2, rate_window_s=300) as srv:
        a, b = Api(srv.url, "key-a"), Api(srv.url, "key-b")
        assert a.get("/s2s/v1.0/client/credit").status_code == 200      # t=0
        clock.advance(200)
        assert a.get("/s2s/v1.0/client/credit").status_code == 200      # t=200
        clock.advance(50)
        assert a.get("/s2s/v1.0/client/credit").status_code == 429      # t=250, not counted
        assert b.get("/s2s/v1.0/client/credit").status_code == 429      # same IP bucket is full
        clock.advance(51)                                               # t=301: the t=0 request left
        assert b.get("/s2s/v1.0/client/credit").status_code == 200


def test_storage_routes_are_not_rate_limited(clock):
    with serve(task_duration_s=0, clock=clock, rate_limit=1) as srv:
        api = Api(srv.url, "storage-rate")
        slot = api.slot(3)
        put = slot["requests"][0]
        for _ in range(3):
            assert requests.put(put["url"], data=b"abc", headers=put["headers"]).status_code == 200
        assert api.get("/s2s/v1.0/client/credit").status_code == 429


# ----------------------------------------------------------------------------------------------
# Units, balance and costs (§8.2, §8.3)
# ----------------------------------------------------------------------------------------------

def test_balance_endpoint_shape(clock):
    with serve(task_duration_s=0, clock=clock, initial_units=57.5) as srv:
        body = credit(Api(srv.url, "bal"))
    assert list(body) == ["status", "results"] and body["status"] == 200 and len(body["results"]) == 1
    lot = body["results"][0]
    assert list(lot) == ["id", "type", "amount", "amount_dec", "expiry"]
    assert lot["type"] == "ApiPaygToken" and lot["amount"] == 57 and lot["amount_dec"] == 57.5
    assert type(lot["id"]) is int and lot["id"] > 10**15
    assert lot["expiry"] == int((clock.t + 365 * DAY) * 1000)


@pytest.mark.parametrize("count", [1, 4, 5, 8, 9, 12, 13, 16])
@pytest.mark.parametrize("tier", ["sd", "hd"])
def test_unit_tiers_at_create(tier, count):
    """A task is accepted exactly when the balance covers the §8.2 tier price."""
    row = next(r for r in UNIT_TIERS if count <= r[0])
    cost = row[2] if tier == "hd" else row[1]
    names = list(HD_ACTIONS if tier == "hd" else SD_ACTIONS)[:count]
    body = {"src_file_id": FID, "dst_actions": names + names[:1]}   # a duplicate counts once
    with serve(task_duration_s=0, initial_units=cost - 1) as srv:
        resp = Api(srv.url, "tiers").create(body)
        assert resp.status_code == 400
        assert resp.json() == error_body(400, "Insufficient units to run this task", "CreditInsufficiency")
    with serve(task_duration_s=0, initial_units=cost) as srv:
        assert Api(srv.url, "tiers").create(body).status_code == 200


def test_units_charged_on_success_only_even_unpolled(clock):
    with serve(task_duration_s=10, clock=clock, initial_units=100) as srv:
        api = Api(srv.url, "units")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        tid = api.start(fid, ["wrinkle", "pore", "acne", "redness", "oiliness"])   # 5 concerns: 12 units
        engine_done(srv, tid)                 # the engine is done, the clock has not moved
        assert api.poll(tid).json()["data"]["task_status"] == "running"
        assert balance(api) == 100
        clock.advance(10)
        assert balance(api) == 88             # charged at completion, before any poll
        assert api.wait(tid)["task_status"] == "success"
        assert balance(api) == 88             # polling is free and does not charge twice
        failed = api.upload(portrait_jpeg("astronaut", "sd"), name="f__error_no_face__.jpg")
        engine_done(srv, api.start(failed, ["wrinkle"]), api.start(FID, ["wrinkle"]))  # FID: never uploaded
        clock.advance(10)
        assert balance(api) == 88
        other = Api(srv.url, "units-other")   # balances are per key
        assert balance(other) == 100


def test_charge_never_goes_below_zero(clock):
    with serve(task_duration_s=5, clock=clock, initial_units=12) as srv:
        api = Api(srv.url, "zero")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        first, second = api.start(fid, ["redness"]), api.start(fid, ["acne"])   # both pass the 9-unit check
        assert api.create({"src_file_id": fid, "dst_actions": list(SD_ACTIONS)}).json()["error_code"] == "CreditInsufficiency"
        clock.advance(5)
        assert api.wait(first)["task_status"] == "success" and api.wait(second)["task_status"] == "success"
        lot = credit(api)["results"][0]
        assert lot["amount"] == 0 and lot["amount_dec"] == 0
        resp = api.create({"src_file_id": fid, "dst_actions": ["redness"]})
        assert resp.json()["error_code"] == "CreditInsufficiency"


def test_feature_cost_paging(api_base_server):
    api = Api(api_base_server.url, "costs")
    first = api.get("/s2s/v2.0/credit/feature-cost?page_size=4").json()
    expected = json.loads(json.dumps(example("feature-cost-response.json")).replace("https://example.invalid", api.base))
    assert first == expected
    second = api.get(f"/s2s/v2.0/credit/feature-cost?page_size=4&starting_token={first['result']['next_token']}").json()
    assert second["result"]["next_token"] is None
    assert [s["description"] for s in second["result"]["skus"]] == [
        "AI Skin Analysis for HD 1~4 concerns", "AI Skin Analysis for HD 5~8 concerns",
        "AI Skin Analysis for HD 9~12 concerns", "AI Skin Analysis for HD 13~16 concerns"]
    assert [s["amount"] for s in second["result"]["skus"]] == [12, 16, 20, 22]
    everything = api.get("/s2s/v2.0/credit/feature-cost").json()["result"]
    assert len(everything["skus"]) == 8 and everything["next_token"] is None
    three = api.get("/s2s/v2.0/credit/feature-cost?page_size=3").json()["result"]
    assert three["next_token"] == "Mw"    # base64("3") unpadded
    rest = api.get("/s2s/v2.0/credit/feature-cost?page_size=20&starting_token=Mw").json()["result"]
    assert [s["amount"] for s in three["skus"] + rest["skus"]] == [9, 12, 14, 16, 12, 16, 20, 22]
    for query in ("page_size=0", "page_size=21", "page_size=x", "starting_token=%%%", "starting_token=OTk"):
        resp = api.get("/s2s/v2.0/credit/feature-cost?" + query)
        assert resp.status_code == 400 and resp.json()["error_code"] == "InvalidParameters", query


@pytest.fixture(scope="module")
def api_base_server():
    with serve(task_duration_s=0) as srv:
        yield srv


# ----------------------------------------------------------------------------------------------
# Delete (§8.4)
# ----------------------------------------------------------------------------------------------

def test_delete_rules(clock):
    with serve(task_duration_s=60, clock=clock) as srv:
        api = Api(srv.url, "deleter")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        tid = api.start(fid, ["redness"])

        def delete(body, who=api):
            return who.post("/s2s/v2.0/task/delete", body)

        for body in ({}, {"task_id": None}, {"task_id": ""}, []):
            resp = delete(body)
            assert resp.json() == error_body(400, "task_id is required but wasn't included in your request",
                                             "InvalidParameters")
        assert delete({"task_id": fid}).json() == error_body(400, "Operation not supported", "OperationNotSupport")
        assert delete({"task_id": tid}).json() == error_body(400, "Task is not finished", "OperationInvalid")
        assert delete({"task_id": "nope"}).json() == error_body(400, "Invalid task ID", "InvalidTaskId")
        clock.advance(60)
        data = api.wait(tid)
        mask_url = data["results"]["output"][0]["mask_urls"][0]
        assert requests.get(mask_url).status_code == 200
        assert delete({"task_id": tid}, Api(srv.url, "someone-else")).json()["error_code"] == "InvalidTaskId"
        resp = delete({"task_id": tid})
        assert resp.status_code == 200 and resp.json() == {"status": 200}
        assert api.poll(tid).json() == example("error-400-invalid-task-id.json")
        gone = requests.get(mask_url)
        assert gone.status_code == 404 and xml_code(gone) == "NoSuchKey"
        assert delete({"task_id": tid}).json()["error_code"] == "InvalidTaskId"
        again = api.start(fid, ["redness"])                              # the file_id itself survives
        clock.advance(60)
        assert api.wait(again)["task_status"] == "success"


# ----------------------------------------------------------------------------------------------
# Retention (§8.5)
# ----------------------------------------------------------------------------------------------

def test_upload_url_expires_after_2h(clock):
    with serve(task_duration_s=0, clock=clock) as srv:
        api = Api(srv.url, "up-expiry")
        put = api.slot(3)["requests"][0]
        clock.advance(7200)
        assert requests.put(put["url"], data=b"abc", headers=put["headers"]).status_code == 200
        clock.advance(1.5)
        resp = requests.put(put["url"], data=b"abc", headers=put["headers"])
        assert resp.status_code == 403 and xml_code(resp) == "AccessDenied" and "Request has expired" in resp.text


def test_result_urls_2h_fresh_on_each_poll_and_task_24h(clock):
    with serve(task_duration_s=0, clock=clock) as srv:
        api = Api(srv.url, "retention")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        tid = api.start(fid, ["redness"], fmt="zip")
        first = api.wait(tid)["results"]["url"]
        clock.advance(7200)
        assert requests.get(first).status_code == 200
        clock.advance(1.5)
        expired = requests.get(first)
        assert expired.status_code == 403 and xml_code(expired) == "AccessDenied"
        fresh = api.wait(tid)["results"]["url"]
        assert fresh != first and requests.get(fresh).status_code == 200
        assert requests.get(first).status_code == 403              # old URLs stay expired
        clock.advance(DAY - 7201.5 - 1)                              # 1 s before the task expires
        late = api.wait(tid)["results"]["url"]
        clock.advance(1)
        assert api.poll(tid).json() == example("error-400-invalid-task-id.json")
        gone = requests.get(late)                                    # signature still valid, task gone
        assert gone.status_code == 404 and xml_code(gone) == "NoSuchKey"


def test_file_id_lives_30_days(clock):
    with serve(task_duration_s=0, clock=clock) as srv:
        api = Api(srv.url, "file-ttl")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        clock.advance(30 * DAY - 1)
        assert api.run(fid, ["redness"])["task_status"] == "success"
        clock.advance(1)
        assert api.run(fid, ["redness"])["error"] == "unknown_internal_error"


def test_configurable_ttls(clock):
    with serve(task_duration_s=0, clock=clock, task_ttl_s=100, result_url_ttl_s=10, file_ttl_s=50) as srv:
        api = Api(srv.url, "ttls")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        tid = api.start(fid, ["redness"])
        url = api.wait(tid)["results"]["output"][0]["mask_urls"][0]
        assert "X-Amz-Expires=10" in url
        clock.advance(11)
        assert requests.get(url).status_code == 403
        clock.advance(40)
        assert api.run(fid, ["redness"])["error"] == "unknown_internal_error"
        clock.advance(50)
        assert api.poll(tid).status_code == 400


def test_unpolled_task_is_dropped_but_charged(clock):
    with serve(task_duration_s=30, clock=clock, unpolled_expiry_s=10, initial_units=100) as srv:
        api = Api(srv.url, "unpolled")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        kept = api.start(fid, ["redness"])
        dropped = api.start(fid, ["acne"])
        engine_done(srv, kept, dropped)
        for _ in range(6):                       # poll "kept" every 8 s until it completes
            clock.advance(8)
            assert api.poll(kept).status_code == 200
        assert api.poll(dropped).json() == example("error-400-invalid-task-id.json")
        assert api.wait(kept)["task_status"] == "success"
        assert balance(api) == 100 - 9 - 9       # the dropped task succeeded too, and is charged


def test_unpolled_expiry_is_off_by_default(clock):
    with serve(task_duration_s=30, clock=clock) as srv:
        api = Api(srv.url, "unpolled-off")
        tid = api.start(FID, ["redness"])
        clock.advance(3 * HOUR)
        assert api.wait(tid)["error"] == "unknown_internal_error"


def test_force_expire_urls(clock):
    with serve(task_duration_s=0, clock=clock) as srv:
        api = Api(srv.url, "force-expire")
        put = api.slot(3)["requests"][0]
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        tid = api.start(fid, ["redness"], fmt="zip")
        url = api.wait(tid)["results"]["url"]
        srv.faults.expire_urls()
        assert xml_code(requests.get(url)) == "AccessDenied"
        assert xml_code(requests.put(put["url"], data=b"abc", headers=put["headers"])) == "AccessDenied"
        assert requests.get(api.wait(tid)["results"]["url"]).status_code == 200


# ----------------------------------------------------------------------------------------------
# Timing (§5.6)
# ----------------------------------------------------------------------------------------------

def test_task_duration_with_clock(clock):
    with serve(task_duration_s=5, clock=clock) as srv:
        api = Api(srv.url, "timing")
        fid = api.upload(portrait_jpeg("astronaut", "sd"))
        tid = api.start(fid, ["redness"])
        engine_done(srv, tid)
        clock.advance(4.9)
        assert api.poll(tid).json()["data"]["task_status"] == "running"
        clock.advance(0.1)
        assert api.poll(tid).json()["data"]["task_status"] == "success"


def test_latency_model_is_seeded_and_scaled():
    model = LatencyModel(time_scale=0.001)

    def durations(seed):
        with serve(latency_model=model, seed=seed) as srv:
            api = Api(srv.url, "latency")
            ids = [api.start(FID, ["redness"]) for _ in range(40)]
            return [srv.app.task(t).duration for t in ids], ids

    first, ids_a = durations(7)
    second, ids_b = durations(7)
    assert first == second and ids_a == ids_b                # repeatable with the same seed
    assert all(0.005 <= d <= 0.007 or 0.030 <= d <= 0.060 for d in first)
    assert sum(d <= 0.007 for d in first) >= 30               # mostly 5-7 s (scaled)
    assert durations(8)[0] != first


# ----------------------------------------------------------------------------------------------
# List-form upload headers (§3.3), strict mode (§5.4), pf_camera_kit (§4.1)
# ----------------------------------------------------------------------------------------------

def test_upload_headers_as_list():
    with serve(task_duration_s=0, upload_headers_as_list=True) as srv:
        api = Api(srv.url, "list-headers")
        put = api.slot(3, name="a.png", ctype="image/png")["requests"][0]
        assert put["headers"] == [{"key": "Content-Length", "value": "3"}, {"key": "Content-Type", "value": "image/png"}]
        headers = {h["key"]: h["value"] for h in put["headers"]}
        assert requests.put(put["url"], data=b"abc", headers=headers).status_code == 200


def test_strict_mode_long_side_and_face_width():
    import numpy as np

    from skinlab.local import engine
    from test_local_server import png_bytes

    # A crop whose face the engine measures between 0.50 and 0.60 of the image width.
    for fraction in (0.6, 0.62, 0.65, 0.58, 0.55):
        loose = portrait("astronaut", "sd", face_fraction=fraction)
        measured = engine.check_image(np.asarray(loose)).face_width_fraction
        if measured is not None and 0.5 <= measured < 0.6:
            break
    else:
        pytest.fail("no crop with a face width between 0.50 and 0.60 of the image")
    tall = jpeg_bytes(Image.new("RGB", (3000, 4100), (180, 150, 130)))
    results = {}
    for strict in (False, True):
        with serve(task_duration_s=0, strict=strict) as srv:
            api = Api(srv.url, "strict")
            loose_id = api.upload(png_bytes(loose), name="loose.png", ctype="image/png")
            results[strict] = (api.run(api.upload(tall), ["hd_redness"]), api.run(loose_id, ["redness"]))
    assert results[False][0]["error"] == "error_no_face"            # no 4096 limit by default
    assert_task_error(results[True][0], "error_exceed_max_image_size", "Input image resolution is too large")
    assert results[False][1]["task_status"] == "success"             # >= 0.50 passes by default
    assert results[True][1]["error"] == "error_src_face_too_small"   # strict: the documented 0.60
    with serve(task_duration_s=0, min_face_width_fraction=measured + 0.01) as srv:
        api = Api(srv.url, "threshold")
        assert api.run(api.upload(png_bytes(loose), ctype="image/png"), ["redness"])["error"] == "error_src_face_too_small"


# ----------------------------------------------------------------------------------------------
# Webhooks (§8.7)
# ----------------------------------------------------------------------------------------------

def test_webhooks_standard_signature():
    received = []
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()
            if len(received) >= 2:
                done.set()

        def log_message(self, *args):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    secret_bytes = b"0123456789abcdef0123456789abcdef"
    secret = "whsec_" + base64.b64encode(secret_bytes).decode()
    try:
        with serve(task_duration_s=0, webhook_url=f"http://127.0.0.1:{hook.server_address[1]}/hook",
                   webhook_secret=secret) as srv:
            api = Api(srv.url, "webhooks")
            fid = api.upload(portrait_jpeg("astronaut", "sd"))
            ok = api.start(fid, ["redness"])
            bad = api.start(FID, ["redness"])
            assert done.wait(20), "webhooks not received"
    finally:
        hook.shutdown()
        hook.server_close()
    statuses = {}
    for headers, body in received:
        headers = {k.lower(): v for k, v in headers.items()}
        msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
        signed = f"{msg_id}.{stamp}.".encode() + body
        expected = base64.b64encode(hmac.new(secret_bytes, signed, hashlib.sha256).digest()).decode()
        assert headers["webhook-signature"] == f"v1,{expected}"
        payload = json.loads(body)
        assert set(payload) == {"created_at", "data"} and type(payload["created_at"]) is int
        statuses[payload["data"]["task_id"]] = payload["data"]["task_status"]
    assert statuses == {ok: "success", bad: "error"}


# ----------------------------------------------------------------------------------------------
# Fault injection (per server)
# ----------------------------------------------------------------------------------------------

def test_faults():
    with serve(task_duration_s=0) as srv:
        api = Api(srv.url, "faults")
        srv.faults.fail("poll", n=2, status=503)
        tid = api.start(FID, ["redness"])
        assert [api.poll(tid).status_code for _ in range(3)] == [503, 503, 200]
        assert api.poll(tid).json()["status"] == 200

        srv.faults.rate_limit(n=2)
        assert [api.get("/s2s/v1.0/client/credit").status_code for _ in range(3)] == [429, 429, 200]

        srv.faults.drop("credit")
        with pytest.raises(requests.ConnectionError):
            api.get("/s2s/v1.0/client/credit")
        assert api.get("/s2s/v1.0/client/credit").status_code == 200

        srv.faults.slow("credit", 0.5)
        started = time.monotonic()
        assert api.get("/s2s/v1.0/client/credit").status_code == 200
        assert time.monotonic() - started >= 0.5

        before = len(srv.app.task_ids())
        srv.faults.lose_create_response()
        with pytest.raises(requests.ConnectionError):
            api.create({"src_file_id": FID, "dst_actions": ["redness"]})
        assert len(srv.app.task_ids()) == before + 1          # the task exists although the answer was lost
        srv.faults.lose_create_response(status=502)
        assert api.create({"src_file_id": FID, "dst_actions": ["redness"]}).status_code == 502
        assert len(srv.app.task_ids()) == before + 2

        srv.faults.fail("storage_put")
        put = api.slot(3)["requests"][0]
        resp = requests.put(put["url"], data=b"abc", headers=put["headers"])
        assert resp.status_code == 500 and xml_code(resp) == "InternalError"
        assert srv.faults.pending() == 0


def test_fault_invalid_task_id_for_a_live_task():
    """``Faults.invalid_task_id``: the exact §5.5 body (``error-400-invalid-task-id.json``) for a live
    task, ``n`` times, then the task answers again, unharmed; on poll by default, delete on request."""
    with serve(task_duration_s=0) as srv:
        api = Api(srv.url, "faults-invalid-task-id")
        tid = api.start(FID, ["redness"])
        assert api.wait(tid)["error"] == "unknown_internal_error"     # a live (finished) task
        srv.faults.invalid_task_id(n=2)
        for _ in range(2):
            resp = api.poll(tid)
            assert resp.status_code == 400 and resp.json() == example("error-400-invalid-task-id.json")
        assert api.poll(tid).status_code == 200 and srv.faults.pending() == 0
        assert srv.app.task(tid) is not None                          # the task itself was not touched

        srv.faults.invalid_task_id(route="delete")
        assert api.poll(tid).status_code == 200                       # polls are not affected
        resp = api.post("/s2s/v2.0/task/delete", {"task_id": tid})
        assert resp.status_code == 400 and resp.json() == example("error-400-invalid-task-id.json")
        assert api.post("/s2s/v2.0/task/delete", {"task_id": tid}).status_code == 200

        srv.faults.invalid_task_id(route="*")
        assert api.get("/s2s/v1.0/client/credit").status_code == 200  # only poll and delete answer it
        assert api.poll("unknown").json() == example("error-400-invalid-task-id.json")
        assert srv.faults.pending() == 0
        with pytest.raises(ValueError, match="poll.*delete"):
            srv.faults.invalid_task_id(route="create")
        with pytest.raises(ValueError, match="unknown route 'pol'"):
            srv.faults.fail("pol")
        with pytest.raises(ValueError, match="at least 1"):
            srv.faults.invalid_task_id(n=0)


def test_faults_are_per_server():
    with serve(task_duration_s=0) as one, serve(task_duration_s=0) as two:
        one.faults.fail("*", n=1)
        assert Api(two.url).get("/s2s/v1.0/client/credit").status_code == 200
        assert Api(one.url).get("/s2s/v1.0/client/credit").status_code == 500


def test_body_size_limits():
    with serve(task_duration_s=0, max_body_bytes=200, max_upload_bytes=1000) as srv:
        api = Api(srv.url, "limits")
        resp = api.create({"src_file_id": FID, "dst_actions": ["redness"] * 40})
        assert resp.status_code == 413 and resp.json()["status"] == 413
        assert api.create({"src_file_id": FID, "dst_actions": ["redness"]}).status_code == 200
        put = api.slot(5000)["requests"][0]
        resp = requests.put(put["url"], data=b"x" * 5000, headers=put["headers"])
        assert resp.status_code == 400 and xml_code(resp) == "EntityTooLarge"


# ----------------------------------------------------------------------------------------------
# `skinlab serve` options: argv -> ServerConfig and Faults (in-process; the CLI test in
# test_end_to_end.py sees one over HTTP)
# ----------------------------------------------------------------------------------------------

def serve_config(*argv: str):
    from skinlab import cli

    return cli._serve_config(cli.build_parser().parse_args(["serve", *argv]))


WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_serve_options_map_onto_server_config_and_faults():
    from skinlab.local import ServerConfig

    plain, default = serve_config(), ServerConfig()
    same = ("task_duration_s", "latency_model", "seed", "rate_limit", "rate_window_s", "upload_headers_as_list",
            "webhook_url", "webhook_secret", "initial_units", "strict", "api_keys", "allow_remote_bind")
    assert {k: getattr(plain, k) for k in same} == {k: getattr(default, k) for k in same}
    assert plain.faults.pending() == 0

    cfg = serve_config(
        "--latency-model", "realistic", "--seed", "7", "--time-scale", "0.01", "--rate-limit", "10/60",
        "--upload-headers-as-list", "--webhook-url", "http://127.0.0.1:9/hook", "--webhook-secret", WHSEC,
        "--units", "50", "--api-key", "a", "--api-key", "b",
        "--fault", "429:3", "--fault", "5xx:poll:2", "--fault", "503:create", "--fault", "drop:create:1",
        "--fault", "slow:poll:2.5", "--fault", "slow:0.5:4", "--fault", "lose-create:1",
        "--fault", "lose-create:2:502", "--fault", "invalid-task-id:1", "--fault", "invalid-task-id:delete:2")
    assert cfg.latency_model == LatencyModel(time_scale=0.01) and cfg.seed == 7
    assert (cfg.rate_limit, cfg.rate_window_s) == (10, 60)
    assert cfg.upload_headers_as_list is True
    assert (cfg.webhook_url, cfg.webhook_secret) == ("http://127.0.0.1:9/hook", WHSEC)
    assert cfg.initial_units == 50 and cfg.api_keys == frozenset({"a", "b"})
    assert cfg.faults._armed == [
        {"kind": "429", "route": "*", "n": 3},
        {"kind": "fail", "route": "poll", "n": 2, "status": 500, "body": None},
        {"kind": "fail", "route": "create", "n": 1, "status": 503, "body": None},
        {"kind": "drop", "route": "create", "n": 1},
        {"kind": "slow", "route": "poll", "n": 1, "seconds": 2.5},
        {"kind": "slow", "route": "*", "n": 4, "seconds": 0.5},
        {"kind": "lose", "route": "create", "n": 1, "status": None},
        {"kind": "lose", "route": "create", "n": 2, "status": 502},
        {"kind": "invalid_task_id", "route": "poll", "n": 1},
        {"kind": "invalid_task_id", "route": "delete", "n": 2},
    ]

    assert serve_config("--latency-model", "5-7").latency_model == LatencyModel(slow_share=0.0)
    assert serve_config("--latency-model", "4-6:0.1:20-40").latency_model == LatencyModel(
        low_s=4, high_s=6, slow_share=0.1, slow_low_s=20, slow_high_s=40)
    assert serve_config("--task-duration", "0").task_duration_s == 0
    assert serve_config("--rate-limit", "off").rate_limit is None
    assert (serve_config("--rate-limit", "40").rate_limit, serve_config("--rate-limit", "40").rate_window_s) == (40, 300)
    two = serve_config("--webhook-url", "http://a.test/h", "--webhook-url", "https://b.test/h", "--webhook-secret", WHSEC)
    assert two.webhook_url == ["http://a.test/h", "https://b.test/h"]


@pytest.mark.parametrize("argv, says", [
    (["--fault", "expire-urls"], "call LocalServer.faults.expire_urls() from Python"),
    (["--fault", "teapot"], "unknown fault 'teapot'"),
    (["--fault", "429:pol:2"], "unknown route 'pol'"),
    (["--fault", "429:0"], "N must be a whole number at least 1"),
    (["--fault", "599:poll"], "not an HTTP status from 500 to 599"),
    (["--fault", "slow:poll"], "slow needs SECONDS"),
    (["--fault", "lose-create:create"], "lose-create always applies to create"),
    (["--fault", "invalid-task-id:create"], "poll, delete or *"),
    (["--rate-limit", "fast"], "use N/SECONDS (e.g. 250/300), N (per 300 s) or off"),
    (["--latency-model", "7-5"], "LOW-HIGH:SHARE:SLOW_LOW-SLOW_HIGH"),
    (["--latency-model", "5-7:2:30-60"], "fraction from 0 to 1"),
    (["--time-scale", "0"], "--time-scale must be a number above 0"),
    (["--time-scale", "0.1"], "add --latency-model"),
    (["--latency-model", "realistic", "--task-duration", "1"], "not both"),
    (["--webhook-url", "ftp://x/hook", "--webhook-secret", WHSEC], "http:// or https:// URL"),
    (["--webhook-url", "http://x/hook", "--webhook-secret", "secret"], "whsec_ followed by base64"),
    (["--webhook-url", "http://x/hook"], "both --webhook-url and --webhook-secret"),
])
def test_serve_options_refuse_bad_values(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        serve_config(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "skinlab serve: error:" in err and says in err, err
    if argv[0] == "--fault":
        assert "Accepted forms: 429[:ROUTE][:N]" in err and "invalid-task-id[:poll|delete|*][:N]" in err


def test_serve_reads_its_keys_from_an_environment_variable(monkeypatch, capsys):
    """Keys on the command line are visible to every user in the process list; --api-keys-from
    names a variable instead, and a missing or empty one is a clear usage error."""
    monkeypatch.setenv("SKINLAB_SERVE_KEYS", " k-one, k-two ,")
    cfg = serve_config("--api-keys-from", "SKINLAB_SERVE_KEYS", "--api-key", "k-zero")
    assert sorted(cfg.api_keys) == ["k-one", "k-two", "k-zero"]
    monkeypatch.delenv("SKINLAB_SERVE_KEYS")
    with pytest.raises(SystemExit) as info:
        serve_config("--api-keys-from", "SKINLAB_SERVE_KEYS")
    assert info.value.code == 2
    assert "--api-keys-from SKINLAB_SERVE_KEYS: that environment variable is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_config("--api-keys-from", "k-literal-" + "SECRET9")  # a key where the variable's name belongs
    err = capsys.readouterr().err
    assert "takes the name of an environment variable" in err and "SECRET9" not in err
    monkeypatch.setenv("SKINLAB_SERVE_KEYS", " , ")
    with pytest.raises(SystemExit):
        serve_config("--api-keys-from", "SKINLAB_SERVE_KEYS")
    assert "the variable holds no key" in capsys.readouterr().err
