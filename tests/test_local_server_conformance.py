"""Rows of contract §9.1 that test_local_server.py and test_local_server_account.py leave open.

Plain `requests` against :class:`skinlab.local.LocalServer`; no skinlab client code. The few
checks that look inside the emulator (the settings defaults, the JSON number rule) use only
``skinlab.local`` itself. The full map of §9.1 to tests is docs/contract-conformance.md; the last
test here checks that every test the map cites still exists.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image, PngImagePlugin

from contract import example
from skinlab.local import LocalServer, ServerConfig, serve
from test_local_server import FID, Api, assert_task_error, error_body, jpeg_bytes, png_bytes, portrait, xml_code
from test_local_server_account import FakeClock, balance, engine_done

RATE_HEADERS = re.compile(r"(?i)^(retry-after|x-ratelimit)")


def assert_api_headers(resp: requests.Response) -> None:
    """§2.5: every API-host answer has an 18-digit x-request-id, CORS *, JSON, no rate-limit headers."""
    assert re.fullmatch(r"[1-9]\d{17}", resp.headers.get("x-request-id", "")), (resp.status_code, resp.url)
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["Content-Type"] == "application/json"
    assert not [h for h in resp.headers if RATE_HEADERS.match(h)]
    assert resp.json()["status"] == resp.status_code        # the envelope repeats the HTTP status


# ----------------------------------------------------------------------------------------------
# §2.5: x-request-id, CORS and no rate-limit headers on every API answer, errors included
# ----------------------------------------------------------------------------------------------

def test_every_api_answer_has_request_id_cors_and_no_rate_headers():
    with serve(task_duration_s=0, max_body_bytes=300) as srv:
        api = Api(srv.url, "headers-everywhere")
        slot = {"files": [{"content_type": "image/png", "file_name": "a.png", "file_size": 3}]}
        answers = {
            "upload 200": api.post("/s2s/v2.0/file", slot),
            "upload 400": api.post("/s2s/v2.1/file/skin-analysis", {"files": []}),
            "create 200": api.create({"src_file_id": FID, "dst_actions": ["redness"]}, "v2.1"),
            "create 400": api.create({"src_file_id": FID}),
            "create 413": api.create({"src_file_id": FID, "dst_actions": ["redness"] * 40}),
            "poll 400": api.poll("nope", "v2.1"),
            "delete 400": api.post("/s2s/v2.0/task/delete", {}),
            "feature-cost 200": api.get("/s2s/v2.0/credit/feature-cost"),
            "feature-cost 400": api.get("/s2s/v2.0/credit/feature-cost?page_size=0"),
            "credit 200": api.get("/s2s/v1.0/client/credit"),
            "401": api.get("/s2s/v1.0/client/credit", headers={"Authorization": "Bearer <KEY>"}),
            "404": api.get("/s2s/v3.0/nothing"),
            "405": requests.delete(srv.url + "/s2s/v2.0/file", timeout=10),
        }
        tid = answers["create 200"].json()["data"]["task_id"]
        answers["poll 200"] = api.poll(tid)
        srv.faults.fail("poll", status=503)
        answers["poll 503"] = api.poll(tid)
        srv.faults.rate_limit(route="feature_cost")
        answers["429"] = api.get("/s2s/v2.0/credit/feature-cost")
        srv.faults.lose_create_response(status=502)
        answers["create 502"] = api.create({"src_file_id": FID, "dst_actions": ["redness"]})
    expected = {"upload 200": 200, "upload 400": 400, "create 200": 200, "create 400": 400, "create 413": 413,
                "poll 400": 400, "delete 400": 400, "feature-cost 200": 200, "feature-cost 400": 400,
                "credit 200": 200, "401": 401, "404": 404, "405": 405, "poll 200": 200, "poll 503": 503,
                "429": 429, "create 502": 502}
    assert {k: r.status_code for k, r in answers.items()} == expected
    ids = []
    for resp in answers.values():
        assert_api_headers(resp)
        ids.append(resp.headers["x-request-id"])
    assert len(set(ids)) == len(ids)                          # unique per response
    assert answers["429"].json() == example("error-429.json")


# ----------------------------------------------------------------------------------------------
# §4.4: the steps around the body checks: auth (1), rate limit (2) first; units (10) last
# ----------------------------------------------------------------------------------------------

def test_create_order_rate_limit_before_body_and_units_after_it():
    bad_body = {"src_file_id": FID, "dst_actions": ["redness"], "format": "png"}
    with serve(task_duration_s=0, rate_limit=1) as srv:
        api = Api(srv.url, "order-rate")
        assert api.get("/s2s/v1.0/client/credit").status_code == 200
        resp = api.create(bad_body)                               # step 2 answers before step 7
        assert resp.status_code == 429 and resp.json() == example("error-429.json")
        assert api.post("/s2s/v2.0/task/skin-analysis", data=b"garbage",
                        headers={"Authorization": "Bearer <KEY>"}).status_code == 401   # step 1 before 2
    with serve(task_duration_s=0, initial_units=0) as srv:
        api = Api(srv.url, "order-units")
        resp = api.create(bad_body)                               # step 7 answers before step 10
        assert resp.json() == error_body(400, "Not available format png", "InvalidParameters")
        resp = api.create({"src_file_id": FID, "dst_actions": ["hd_redness"], "pf_camera_kit": "x"}, "v2.1")
        assert resp.json() == error_body(400, "pf_camera_kit must be a boolean", "InvalidParameters")  # 9 before 10
        resp = api.create({"src_file_id": FID, "dst_actions": ["redness"]})
        assert resp.json() == error_body(400, "Insufficient units to run this task", "CreditInsufficiency")
        assert srv.app.task_ids() == []                           # nothing was created


# ----------------------------------------------------------------------------------------------
# §2.2: a file_id from any upload path works with either task version
# ----------------------------------------------------------------------------------------------

def test_file_id_from_any_upload_path_works_with_either_version(local_server):
    api = Api(local_server.url, "any-path-any-version")
    data = jpeg_bytes(portrait("astronaut", "sd"))
    for path in ("/s2s/v2.1/file/skin-analysis", "/s2s/v2.0/file/skin-analysis"):
        slot = api.slot(len(data), path=path)
        put = slot["requests"][0]
        assert requests.put(put["url"], data=data, headers=put["headers"], timeout=30).status_code == 200
        for version in ("v2.0", "v2.1"):
            tid = api.start(slot["file_id"], ["redness"], version=version)
            other = "v2.1" if version == "v2.0" else "v2.0"
            assert api.wait(tid, other)["task_status"] == "success"   # polled on the other prefix too


# ----------------------------------------------------------------------------------------------
# §5.4 checks 6-11 over HTTP (the engine's own tests pin the thresholds)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gate_server():
    """Default gates, except a 0.30 face-width rule so two side-by-side faces reach check 10."""
    with serve(task_duration_s=0, min_face_width_fraction=0.3) as srv:
        yield srv


def test_image_checks_out_of_bound_dark_two_faces_over_http(gate_server):
    from skinlab.local import engine

    api = Api(gate_server.url, "gates")
    img = np.asarray(portrait("astronaut", "sd"))
    face = engine.check_image(img).faces[0]
    cases = {
        "error_src_face_out_of_bound": img[: int(face.top + 0.95 * face.height)],         # chin cut off
        "error_lighting_dark": (img.astype(np.float32) * 0.25).astype(np.uint8),
        "error_multiple_people": np.concatenate([img, img[:, ::-1]], axis=1),
    }
    messages = {"error_src_face_out_of_bound": "The face area in the uploaded image is out of bound",
                "error_lighting_dark": "The lighting in the uploaded image is too dark",
                "error_multiple_people": None}
    for code, pixels in cases.items():
        fid = api.upload(png_bytes(Image.fromarray(pixels)), name="case.png", ctype="image/png")
        assert_task_error(api.run(fid, ["redness"]), code, messages[code])
    fid = api.upload(png_bytes(portrait("astronaut", "sd")), name="ok.png", ctype="image/png")
    assert api.run(fid, ["redness"])["task_status"] == "success"          # the uncut original passes


def test_image_check_head_angle_over_http(gate_server):
    api = Api(gate_server.url, "angle")
    engine_header = api.get("/s2s/v1.0/client/credit").headers["x-skinlab-engine"]
    if "face=mediapipe" not in engine_header:
        pytest.skip(f"head angle needs the landmark backend; engine is {engine_header}")
    upright = portrait("astronaut", "sd", face_fraction=0.55)
    tilted = upright.rotate(30, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
    fid = api.upload(png_bytes(tilted), name="tilted.png", ctype="image/png")
    assert_task_error(api.run(fid, ["redness"]), "error_large_face_angle", None)
    fid = api.upload(png_bytes(upright), name="upright.png", ctype="image/png")
    assert api.run(fid, ["redness"])["task_status"] == "success"


# ----------------------------------------------------------------------------------------------
# §6.4: scores come from the pixels (not constant, not a hash of the bytes)
# ----------------------------------------------------------------------------------------------

def test_scores_depend_on_pixels_not_on_bytes(local_server):
    api = Api(local_server.url, "pixels-not-bytes")
    face = portrait("astronaut", "sd")
    plain = png_bytes(face)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Comment", "same pixels, different bytes")
    buf = io.BytesIO()
    face.save(buf, "PNG", pnginfo=meta)
    tagged = buf.getvalue()
    assert tagged != plain

    def scores(data: bytes) -> dict:
        fid = api.upload(data, name="face.png", ctype="image/png")
        out = api.run(fid, ["redness", "wrinkle", "oiliness", "pore"])["results"]["output"]
        return {e["type"]: e.get("raw_score", e.get("score")) for e in out if e["type"] != "resize_image"}

    first = scores(plain)
    assert scores(tagged) == first                                     # same pixels: same scores
    other = scores(png_bytes(portrait("grace_hopper", "sd")))
    assert other != first                                              # another face: other scores
    assert len({v for k, v in first.items() if k not in ("all", "skin_age")}) > 1   # not one constant


# ----------------------------------------------------------------------------------------------
# §6.2: whole numbers are JSON integers in format=json, floats in score_info.json
# ----------------------------------------------------------------------------------------------

def test_whole_number_scores_are_integers_in_json_and_floats_in_score_info():
    from skinlab.local.results import build_results

    def measured(score: float):
        return SimpleNamespace(scores={"whole": score}, masks={}, skin_types={})

    analysis = SimpleNamespace(concerns={"redness": measured(100.0), "acne": measured(62.5)}, skin_age=41)
    image = np.zeros((8, 6, 3), np.uint8)
    res = build_results(("redness", "acne"), analysis, image, task_id="t", miniserver_args={},
                        ui_score=lambda raw: 99 if raw >= 100 else 75, render_masks=False)
    by_type = {e["type"]: e for e in res.entries}
    assert type(by_type["redness"]["raw_score"]) is int and by_type["redness"]["raw_score"] == 100
    assert type(by_type["acne"]["raw_score"]) is float and by_type["acne"]["raw_score"] == 62.5
    assert type(by_type["all"]["score"]) is int and by_type["all"]["score"] == 87      # mean(99, 75)
    assert type(by_type["skin_age"]["score"]) is int
    assert "region" not in by_type["redness"]                                          # SD: no region
    assert type(res.score_info["redness"]["raw_score"]) is float and res.score_info["redness"]["raw_score"] == 100.0
    assert type(res.score_info["all"]["score"]) is float
    hd = build_results(("hd_redness",), SimpleNamespace(concerns={"redness": measured(50.5)}, skin_age=30), image,
                       task_id="t", miniserver_args={}, ui_score=lambda raw: 67, render_masks=False)
    assert hd.entries[0]["region"] == "whole"                                          # HD single region: whole


# ----------------------------------------------------------------------------------------------
# §9.1 settings table: defaults, and the settings no other test varies
# ----------------------------------------------------------------------------------------------

def test_settings_table_defaults():
    cfg = ServerConfig()
    expected = {"public_base_url": None, "api_keys": None, "initial_units": 1000, "task_duration_s": 5.0,
                "task_ttl_s": 86400, "file_ttl_s": 2592000, "upload_url_ttl_s": 7200, "result_url_ttl_s": 7200,
                "unpolled_expiry_s": None, "rate_limit": 250, "rate_window_s": 300, "strict_max_long_side": False,
                "upload_headers_as_list": False, "webhook_url": None, "webhook_secret": None}
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.max_long_side is None and dataclasses.replace(cfg, strict_max_long_side=True).max_long_side == 4096


def test_default_server_over_http():
    """A server with no settings: bound-address URLs, 1000 units, 5 s tasks, object headers."""
    clock = FakeClock()
    with LocalServer(clock=clock) as srv:
        api = Api(srv.url, "defaults")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", srv.url)
        put = api.slot(3)["requests"][0]
        assert put["url"].startswith(srv.url + "/_storage/upload/") and "X-Amz-Expires=7200" in put["url"]
        assert put["headers"] == {"Content-Length": "3", "Content-Type": "image/jpeg"}
        assert balance(api) == 1000
        tid = api.start(FID, ["redness"])                       # never uploaded: ends in error after 5 s
        engine_done(srv, tid)
        clock.advance(4.99)
        assert api.poll(tid).json()["data"]["task_status"] == "running"
        clock.advance(0.01)
        assert api.poll(tid).json()["data"]["error"] == "unknown_internal_error"


def test_upload_url_ttl_is_configurable():
    clock = FakeClock()
    with serve(task_duration_s=0, clock=clock, upload_url_ttl_s=60) as srv:
        put = Api(srv.url, "put-ttl").slot(3)["requests"][0]
        assert "X-Amz-Expires=60" in put["url"]
        clock.advance(61)
        resp = requests.put(put["url"], data=b"abc", headers=put["headers"], timeout=10)
        assert resp.status_code == 403 and xml_code(resp) == "AccessDenied"


def test_strict_max_long_side_alone_and_check_order():
    flat = {size: jpeg_bytes(Image.new("RGB", size, (180, 150, 130)), quality=70)
            for size in ((480, 4097), (480, 4096), (400, 4200))}
    with serve(task_duration_s=0, strict_max_long_side=True) as srv:
        api = Api(srv.url, "strict-long-side")
        assert_task_error(api.run(api.upload(flat[480, 4097]), ["redness"]), "error_exceed_max_image_size",
                          "Input image resolution is too large")
        assert api.run(api.upload(flat[480, 4096]), ["redness"])["error"] == "error_no_face"     # at the limit
        assert api.run(api.upload(flat[400, 4200]), ["redness"])["error"] == "error_below_min_image_size"  # 4 before 5
    with serve(task_duration_s=0, strict_max_long_side=5000) as srv:
        api = Api(srv.url, "custom-long-side")
        assert api.run(api.upload(flat[480, 4097]), ["redness"])["error"] == "error_no_face"
    with serve(task_duration_s=0) as srv:                          # off by default
        api = Api(srv.url, "no-long-side")
        assert api.run(api.upload(flat[480, 4097]), ["redness"])["error"] == "error_no_face"


# ----------------------------------------------------------------------------------------------
# §7.5: ZIP masks at the resized size when the upload's long side is over 2560 px
# ----------------------------------------------------------------------------------------------

def test_zip_masks_at_the_resized_size(local_server):
    import zipfile

    api = Api(local_server.url, "zip-resized")
    big = portrait("astronaut", "hd").resize((2000, 2667), Image.LANCZOS)   # as test_resize_to_2560_long_side
    fid = api.upload(jpeg_bytes(big, quality=85))
    data = api.run(fid, ["redness"], "zip")
    assert data["task_status"] == "success", data
    zf = zipfile.ZipFile(io.BytesIO(requests.get(data["results"]["url"], timeout=30).content))
    expected = (round(2000 * 2560 / 2667), 2560)
    sizes = {n.split("/")[1]: Image.open(io.BytesIO(zf.read(n))).size for n in zf.namelist() if not n.endswith(".json")}
    assert set(sizes) == {"redness_output.png", "resize_image.jpg"} and set(sizes.values()) == {expected}


# ----------------------------------------------------------------------------------------------
# §4.4: the whole validation ladder, each step fixed in turn while every later fault stays
# ----------------------------------------------------------------------------------------------

def test_create_validation_ladder_every_step_in_order():
    five_hd = ["hd_redness", "hd_acne", "hd_pore", "hd_wrinkle", "hd_texture"]        # 16 units
    with serve(task_duration_s=0, initial_units=12, rate_limit=None) as srv:
        api = Api(srv.url, "ladder")
        body = {"zzz": 1, "dst_actions": None, "format": "png", "miniserver_args": [], "pf_camera_kit": "x"}
        srv.faults.rate_limit(route="create")
        resp = api.post("/s2s/v2.1/task/skin-analysis", body, headers={"Authorization": "Bearer <KEY>"})
        assert resp.json() == example("error-401.json")                                   # step 1 before 2
        resp = api.create(body, "v2.1")
        assert resp.json() == example("error-429.json")                                   # step 2 before 3
        assert api.post("/s2s/v2.1/task/skin-analysis", data=b"[1]").json() == error_body(
            400, "Request body must be a JSON object", "InvalidParameters")               # step 3
        rungs = [
            ({}, "src_file_id is required but wasn't included in your request", "InvalidParameters"),     # 4a
            ({"src_file_id": FID, "src_file_url": "https://a.test/x.jpg"},
             "src_file_id and src_file_url cannot both be set", "InvalidParameters"),                      # 4b
            ({"src_file_url": None, "src_file_id": ""}, "src_file_id must be a non-empty string",
             "InvalidParameters"),                                                                         # 4c
            ({"src_file_id": FID}, "Unexpected request parameter zzz", "BadRequest"),                      # 5
            ({"zzz": None}, "dst_actions is required but wasn't included in your request", "InvalidParameters"),
            ({"dst_actions": "hd_redness"}, "dst_actions must be an array of strings", "InvalidParameters"),
            ({"dst_actions": []}, "dst_actions must not be empty", "InvalidParameters"),                   # 6c
            ({"dst_actions": ["nope"] + five_hd + ["redness"]}, "Not available dst_action nope",
             "InvalidParameters"),                                                                         # 6d
            ({"dst_actions": five_hd + ["redness"]}, "cannot mix HD and SD dst_actions", "InvalidParameters"),
            ({"dst_actions": five_hd}, "Not available format png", "InvalidParameters"),                   # 7
            ({"format": "json"}, "miniserver_args must be an object", "InvalidParameters"),                # 8
            ({"miniserver_args": {"enable_mask_overlay": "yes"}},
             "Invalid value for miniserver_args.enable_mask_overlay", "InvalidParameters"),                # 8
            ({"miniserver_args": {}}, "pf_camera_kit must be a boolean", "InvalidParameters"),             # 9
            ({"pf_camera_kit": True}, "Insufficient units to run this task", "CreditInsufficiency"),       # 10
        ]
        for fix, error, code in rungs:
            for name, value in fix.items():
                if value is None:
                    body.pop(name, None)
                else:
                    body[name] = value
            resp = api.create(body, "v2.1")
            assert (resp.status_code, resp.json()) == (400, error_body(400, error, code)), (fix, resp.text)
        assert srv.app.task_ids() == []
        body["dst_actions"] = five_hd[:4]                                                  # 12 units: enough
        resp = api.create(body, "v2.1")
        assert resp.status_code == 200 and len(srv.app.task_ids()) == 1                   # step 11


# ----------------------------------------------------------------------------------------------
# §3.4: the order of the storage PUT checks, and a PUT with no Content-Length at all
# ----------------------------------------------------------------------------------------------

def test_storage_put_check_order_and_missing_content_length():
    import http.client
    from urllib.parse import urlsplit

    clock = FakeClock()
    with serve(task_duration_s=0, clock=clock) as srv:
        api = Api(srv.url, "put-order")
        put = api.slot(3)["requests"][0]
        url, headers = put["url"], put["headers"]
        wrong_type = {"Authorization": "Bearer k", "Content-Type": "image/png"}
        resp = requests.put(url, data=b"abc", headers=wrong_type, timeout=10)
        assert (resp.status_code, xml_code(resp)) == (400, "InvalidArgument")          # Authorization before type
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.putrequest("PUT", f"{parts.path}?{parts.query}", skip_accept_encoding=True)
        conn.putheader("Content-Type", "image/jpeg")                                     # no Content-Length
        conn.endheaders()
        raw = conn.getresponse()
        text = raw.read().decode()
        conn.close()
        assert raw.status == 403 and "<Code>SignatureDoesNotMatch</Code>" in text
        clock.advance(7201)
        resp = requests.put(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), data=b"abc", headers=headers,
                            timeout=10)
        assert (resp.status_code, xml_code(resp)) == (403, "SignatureDoesNotMatch")    # signature before expiry
        resp = requests.put(url, data=b"abcd", headers=wrong_type, timeout=10)
        assert (resp.status_code, xml_code(resp)) == (403, "AccessDenied")              # expiry before the rest
        assert "Request has expired" in resp.text


# ----------------------------------------------------------------------------------------------
# §8.1: the key bucket and the IP bucket are separate (a second loopback address as another IP)
# ----------------------------------------------------------------------------------------------

def test_rate_limit_key_and_ip_buckets_are_separate():
    import http.client

    with serve(task_duration_s=0, rate_limit=2) as srv:
        def call(key: str, source_ip: str):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10, source_address=(source_ip, 0))
            conn.request("GET", "/s2s/v1.0/client/credit", headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            return resp.status, body

        assert [call("key-a", "127.0.0.1")[0] for _ in range(2)] == [200, 200]
        status, body = call("key-a", "127.0.0.2")               # fresh IP, but key-a has spent its 2
        assert status == 429 and json.loads(body) == example("error-429.json")
        assert call("key-b", "127.0.0.2")[0] == 200              # the 429 was not counted for 127.0.0.2
        assert call("key-c", "127.0.0.1")[0] == 429              # fresh key, but 127.0.0.1 has spent its 2
        assert call("key-b", "127.0.0.2")[0] == 200
        assert call("key-d", "127.0.0.2")[0] == 429              # 127.0.0.2 spent: key-b twice


# ----------------------------------------------------------------------------------------------
# §5.4: checks 6-11 in order, each over HTTP with two faults at once
# ----------------------------------------------------------------------------------------------

def test_image_check_order_with_two_faults_at_once(local_server, gate_server):
    from skinlab.local import engine

    img = np.asarray(portrait("astronaut", "sd"))
    face = engine.check_image(img).faces[0]
    cut = img[: int(face.top + 0.95 * face.height)]
    pad = np.full((cut.shape[0], 250, 3), 128, np.uint8)

    def dark(a):
        return (a.astype(np.float32) * 0.25).astype(np.uint8)

    def pair(a):
        return np.concatenate([a, a[:, ::-1]], axis=1)

    def outcome(srv, pixels) -> str:
        api = Api(srv.url, "gate-order")
        fid = api.upload(png_bytes(Image.fromarray(pixels)), name="case.png", ctype="image/png")
        return api.run(fid, ["redness"])["error"]

    narrow_cut = np.concatenate([pad, cut, pad], axis=1)           # face < 0.5 of the width, chin cut off
    assert outcome(local_server, narrow_cut) == "error_src_face_too_small"        # 7 before 8
    assert outcome(gate_server, narrow_cut) == "error_src_face_out_of_bound"      # (8 alone, with the 0.3 rule)
    assert outcome(local_server, pair(img)) == "error_src_face_too_small"         # 7 before 10
    assert outcome(local_server, dark(cut)) == "error_src_face_out_of_bound"      # 8 before 9
    assert outcome(gate_server, pair(cut)) == "error_src_face_out_of_bound"       # 8 before 10
    assert outcome(gate_server, dark(pair(img))) == "error_lighting_dark"         # 9 before 10
    engine_header = Api(gate_server.url).get("/s2s/v1.0/client/credit").headers["x-skinlab-engine"]
    if "face=mediapipe" in engine_header:                          # check 11 needs the landmark backend
        tilted = np.asarray(portrait("astronaut", "sd", face_fraction=0.55).rotate(
            30, resample=Image.BICUBIC, fillcolor=(128, 128, 128)))
        assert outcome(gate_server, dark(tilted)) == "error_lighting_dark"        # 9 before 11
        assert outcome(gate_server, pair(tilted)) == "error_multiple_people"      # 10 before 11


# ----------------------------------------------------------------------------------------------
# §6.4: the SD and HD forms of a concern share one measurement
# ----------------------------------------------------------------------------------------------

def test_sd_and_hd_forms_share_one_measurement(local_server):
    api = Api(local_server.url, "sd-hd-shared")
    fid = api.upload(jpeg_bytes(portrait("astronaut", "hd")))          # 1080x1440: both tiers accept it
    pairs = [("redness", "hd_redness"), ("oiliness", "hd_oiliness"), ("age_spot", "hd_age_spot"),
             ("pore", "hd_pore"), ("wrinkle", "hd_wrinkle")]
    sd = api.run(fid, [s for s, _ in pairs])["results"]["output"]
    hd = api.run(fid, [h for _, h in pairs])["results"]["output"]
    sd_scores = {e["type"]: (e["raw_score"], e["ui_score"]) for e in sd if "raw_score" in e}
    hd_scores = {e["type"]: (e["raw_score"], e["ui_score"]) for e in hd
                 if "raw_score" in e and e.get("region") == "whole"}
    assert {s: sd_scores[s] for s, _ in pairs} == {s: hd_scores[h] for s, h in pairs}
    assert len({v for v in sd_scores.values()}) > 1


# ----------------------------------------------------------------------------------------------
# §5.2: the whole success envelope, both formats (key order included)
# ----------------------------------------------------------------------------------------------

def test_success_envelopes_exact_in_both_formats(local_server):
    api = Api(local_server.url, "success-envelopes")
    fid = api.upload(jpeg_bytes(portrait("astronaut", "sd")))
    for fmt, results_keys in (("json", ["output"]), ("zip", ["url"])):
        tid = api.start(fid, ["redness"], fmt)
        api.wait(tid)
        body = api.poll(tid).json()
        assert list(body) == ["status", "data"] and body["status"] == 200
        assert list(body["data"]) == ["error", "results", "task_status"]          # no error_message here
        assert body["data"]["error"] is None and body["data"]["task_status"] == "success"
        assert list(body["data"]["results"]) == results_keys


# ----------------------------------------------------------------------------------------------
# §8.4: failed tasks can be deleted, expired ones cannot, and deleting is free
# ----------------------------------------------------------------------------------------------

def test_delete_failed_and_expired_tasks_and_deletion_is_free():
    clock = FakeClock()
    with serve(task_duration_s=0, clock=clock, initial_units=100) as srv:
        api = Api(srv.url, "delete-more")
        failed = api.start(FID, ["redness"])                             # never uploaded: ends in error
        assert api.wait(failed)["task_status"] == "error"
        resp = api.post("/s2s/v2.0/task/delete", {"task_id": failed})
        assert resp.status_code == 200 and resp.json() == {"status": 200}
        assert api.poll(failed).json() == example("error-400-invalid-task-id.json")
        fid = api.upload(jpeg_bytes(portrait("astronaut", "sd")))
        done = api.start(fid, ["redness"])
        assert api.wait(done)["task_status"] == "success"
        assert balance(api) == 91
        assert api.post("/s2s/v2.0/task/delete", {"task_id": done}).status_code == 200
        assert balance(api) == 91                                         # no charge, no refund
        old = api.start(fid, ["redness"])
        assert api.wait(old)["task_status"] == "success"
        clock.advance(86400)                                              # 24 h after completion
        resp = api.post("/s2s/v2.0/task/delete", {"task_id": old})
        assert resp.json() == error_body(400, "Invalid task ID", "InvalidTaskId")


# ----------------------------------------------------------------------------------------------
# docs/contract-conformance.md cites only tests that exist, and has a row for every item
# ----------------------------------------------------------------------------------------------

def test_conformance_map_cites_only_existing_tests():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "contract-conformance.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(cited) >= 100, "the map's test ids are not in the `tests/file.py::name` form any more"
    defined: dict[str, set[str]] = {}
    for path in sorted({p for p, _ in cited}):
        assert (root / path).is_file(), f"{path} is cited but does not exist"
        tree = ast.parse((root / path).read_text(encoding="utf-8"))
        defined[path] = {node.name for node in ast.walk(tree)
                         if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}
    missing = sorted(f"{p}::{name}" for p, name in cited if name not in defined[p])
    assert not missing, f"docs/contract-conformance.md cites tests that do not exist: {missing}"
    # Bare names in the prose (the "added in this pass" list) must exist somewhere too.
    every = set().union(*defined.values())
    bare = set(re.findall(r"`(test_\w+)`", text))
    assert not sorted(bare - every), f"unknown test names: {sorted(bare - every)}"
    # Every §9.1 item (15) and every §9.2 quirk (22) has a row that cites at least one test.
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (9\.1-\d+|\d+) \|(.*)$", text, re.M)}
    assert {f"9.1-{i}" for i in range(1, 16)} | {str(i) for i in range(1, 23)} <= set(rows)
    assert all("::test_" in row for row in rows.values())
