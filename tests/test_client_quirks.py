"""The client against every quirk of contract §9.2, from both sides of each alternative, plus the
two retry policies (§8.1, §5.5), the shared rate limiter, the polling schedule (§8.6), expired
URL refresh (§8.5), delete / credits / feature cost (§8.3, §8.4) and the balance pre-check (§8.2).

Most tests script the service with tests/fakes.py (no sleeping: the retry policy's sleep is a
recorder); a few drive the local emulator where it can produce the situation itself. Tests that
already existed are listed in docs/contract-conformance.md; this file adds the missing sides.
"""

from __future__ import annotations

import io
import json
import random
import socket
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from urllib.parse import unquote

import pytest
import requests
from PIL import Image

import skinlab.client as client_mod
from contract import example
from fakes import ScriptedServer
from skinlab import errors
from skinlab.client import LOCAL_POLL, Client, PollSchedule, RateLimiter, RetryPolicy, unwrap
from skinlab.local import serve
from skinlab.results import AnalysisResult

KEY = "sk-" + "quirks-1234567890abcdefSECRET"  # fake; split so that secret scanners do not flag the test files
TASK = "v3JYvlWB2q3YHtlgSwxPB2ZG6MWbVc7-0rc2WoYOaq6E-d_6RY-_UoBzFrvE0owS700tbFAbgmA5H0PXmbNl4wvAYL1n8Z0v05rf-_Ph-Sl"
TASK64 = TASK[:64]
FID = "sKu1/dDKFvwQ2i6r7fPZMV9m4e/1gNdC9CQTQPphsFMnVic/sUTUk+2w7IxDtFjQ="
FAST = RetryPolicy(base=0.0, sleep=lambda s: None)
QUICK = PollSchedule(first=0.0, factor=1.0, cap=0.01, minimum=0.0)
CREATE = "/s2s/v2.0/task/skin-analysis"
POLL = f"/s2s/v2.0/task/skin-analysis/{TASK}"
CREDIT = "/s2s/v1.0/client/credit"
COST = "/s2s/v2.0/credit/feature-cost"
DELETE = "/s2s/v2.0/task/delete"
R429 = (429, {"status": 429, "error": "Too many requests"})


@pytest.fixture
def srv():
    with ScriptedServer() as s:
        yield s


def client_for(srv, **kw) -> Client:
    kw.setdefault("retry", FAST)
    kw.setdefault("poll_schedule", QUICK)
    kw.setdefault("rate_limiter", False)
    return Client(KEY, base_url=srv.url if hasattr(srv, "url") else srv, **kw)


def recording_policy(seed: int = 7, **kw):
    sleeps: list[float] = []
    return RetryPolicy(sleep=sleeps.append, rng=random.Random(seed), **kw), sleeps


def envelope(data, key: str = "data", **extra):
    return (200, {"status": 200, key: data, **extra})


def success(results, **extra):
    return envelope({"error": None, "results": results, "task_status": "success", **extra})


def image_bytes(fmt: str = "PNG", size=(60, 80), mode: str = "RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 40, 40, 120) if mode == "RGBA" else (190, 150, 130)).save(buf, fmt)
    return buf.getvalue()


def jpeg(size=(600, 800)) -> bytes:
    return image_bytes("JPEG", size, "RGB")


def zip_of(info: dict, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("skinanalysisResult/score_info.json", json.dumps(info))
        for name, data in files.items():
            zf.writestr("skinanalysisResult/" + name, data)
    return buf.getvalue()


def slot_body(srv, headers=None, **extra):
    item = {"content_type": "image/jpeg", "file_name": "x.jpg", "file_id": FID,
            "requests": [{"method": "PUT", "url": f"{srv.url}/_storage/upload/abc.jpg?X-Amz-Expires=7200",
                          "headers": headers if headers is not None else {"Content-Type": "image/jpeg"}}]}
    item.update(extra)
    return {"status": 200, "data": {"files": [item]}}


def json_entry(kind, raw=None, ui=None, region=None, url=None, **extra):
    e = {"type": kind}
    if region is not None:
        e["region"] = region
    if raw is not None:
        e.update(raw_score=raw, ui_score=ui)
    if url is not None:
        e["mask_urls"] = [url]
    e["url"] = None
    e.update(extra)
    return e


# ================================================================ §9.2 quirks

# ---- 1. results.url object or bare string, also when the URL has expired and is refreshed

@pytest.mark.parametrize("shape", ["object", "bare"])
def test_q1_expired_zip_url_refreshed_in_both_shapes(srv, shape):
    old, new = f"{srv.url}/_storage/old/r.zip", f"{srv.url}/_storage/new/r.zip"
    wrap = (lambda u: {"url": u}) if shape == "object" else (lambda u: u)
    srv.route("GET", POLL, success(wrap(old)), success(wrap(new)))
    srv.route("GET", "/_storage/old/r.zip", (403, "<Error><Code>AccessDenied</Code></Error>"))
    info = {"redness": {"raw_score": 70.5, "ui_score": 80, "output_mask_name": "redness_output.png"}}
    srv.route("GET", "/_storage/new/r.zip", (200, zip_of(info, {"redness_output.png": image_bytes()})))
    r = client_for(srv).task(TASK).wait(timeout=5)
    assert r.score("redness") == 70.5 and len(srv.calls("GET", POLL)) == 2


# ---- 2 and 3. engine error codes are an open set; error_message may be missing

@pytest.mark.parametrize("message", [None, "Engine task timeout"], ids=["no-message", "message"])
@pytest.mark.parametrize("code, cls", [
    ("error_below_min_image_size", errors.ImageTooSmallError), ("error_exceed_max_image_size", errors.ImageTooLargeError),
    ("error_src_face_out_of_bound", errors.FaceOutOfBoundError), ("exceed_max_filesize", errors.FileTooLargeError),
    ("error_download_image", errors.DownloadImageError), ("error_decode_image", errors.DecodeImageError),
    ("error_face_parsing", errors.FaceParsingError), ("unknown_internal_error", errors.InternalEngineError),
    ("error_multiple_people", errors.MultiplePeopleError), ("error_large_face_angle", errors.FaceAngleError),
    ("invalid_parameter", errors.TaskError), ("error_nsfw_content_detected", errors.TaskError),
    ("error_brand_new_2027", errors.TaskError)])
def test_q2_q3_engine_codes_open_set_message_optional(srv, code, cls, message):
    data = {"error": code, "results": None, "task_status": "error"}
    if message is not None:
        data["error_message"] = message
    srv.route("GET", POLL, envelope(data))
    with pytest.raises(errors.TaskError) as info:
        client_for(srv).task(TASK).wait(timeout=5)
    assert type(info.value) is cls and info.value.code == code and info.value.task_id == TASK
    assert (message or code) in str(info.value)                  # free text kept, or the code named


# ---- 4. error_code may be absent on any error: the class comes from the status (and the code)

@pytest.mark.parametrize("with_code", [True, False], ids=["with-code", "without-code"])
@pytest.mark.parametrize("status, code, cls", [
    (400, "InvalidParameters", errors.InvalidParametersError),
    (401, "InvalidApiKey", errors.AuthenticationError),
    (403, "Forbidden", errors.APIError),
    (404, "NotFound", errors.APIError),
    (429, "TooManyRequests", errors.RateLimitError),
    (500, "TaskTimeout", errors.ServerError),
    (503, "ServiceUnavailable", errors.ServerError)])
def test_q4_error_code_optional_on_any_error(srv, status, code, cls, with_code):
    body = {"status": status, "error": "whatever the text says"}
    if with_code:
        body["error_code"] = code
    srv.route("GET", CREDIT, (status, body))
    with pytest.raises(errors.SkinlabError) as info:
        client_for(srv).credits()
    assert type(info.value) is cls and info.value.status == status
    assert info.value.code == (code if with_code else None) and info.value.request_id == "512340987612345678"


# ---- 5. Invalid task ID: with or without error_code, v2 or v1 spelling

@pytest.mark.parametrize("text", ["Invalid task ID", "Invalid Task Id"])
@pytest.mark.parametrize("with_code", [True, False], ids=["with-code", "without-code"])
def test_q5_invalid_task_id_spellings(srv, text, with_code):
    body = {"status": 400, "error": text, **({"error_code": "InvalidTaskId"} if with_code else {})}
    srv.route("GET", POLL, (400, body))
    with pytest.raises(errors.InvalidTaskIdError):
        client_for(srv).task(TASK).wait(timeout=5)
    assert len(srv.calls("GET", POLL)) == 1                       # never retried


# ---- 6, 9, 10. repeated type keyed by (type, region); arbitrary order; region present or absent

def _hd_pore_output(order):
    entries = [json_entry("hd_pore", 40.0 + i, 60 + i, region=r, url=f"https://s.invalid/hd_pore_{r}.png")
               for i, r in enumerate(["whole", "forehead", "nose", "cheek"])]
    return [entries[i] for i in order]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2]], ids=["service-order", "shuffled"])
def test_q6_q9_repeated_type_keyed_by_type_and_region_in_any_order(order):
    r = AnalysisResult.from_json({"results": {"output": _hd_pore_output(order)}})
    assert {reg: r.score("hd_pore", reg) for reg in ("whole", "forehead", "nose", "cheek")} == {
        "whole": 40.0, "forehead": 41.0, "nose": 42.0, "cheek": 43.0}
    df = r.scores
    assert list(df.region) == ["whole", "forehead", "nose", "cheek"]   # catalogue order whatever came in
    assert not df.duplicated(["action", "region"]).any()


def test_q9_score_info_key_order_is_irrelevant():
    info = example("score_info-hd.json")
    reversed_info = dict(reversed(list(info.items())))
    a, b = AnalysisResult.from_zip(zip_of(info, {})), AnalysisResult.from_zip(zip_of(reversed_info, {}))
    assert a.scores.equals(b.scores) and a.overall == b.overall and a.skin_age == b.skin_age


@pytest.mark.parametrize("region", [None, "whole"], ids=["no-region", "region-whole"])
@pytest.mark.parametrize("name", ["redness", "hd_redness"], ids=["sd", "hd"])
def test_q10_region_present_or_absent_on_both_tiers(name, region):
    r = AnalysisResult.from_json({"results": {"output": [json_entry(name, 71.5, 81, region=region)]}})
    assert r.score(name) == 71.5 and r.score(name, "whole") == 71.5
    assert list(r.scores.region) == ["whole"]


# ---- 7. url: null on every entry, and unknown keys anywhere in any body

def test_q7_unknown_keys_everywhere_and_url_null(srv):
    srv.route("POST", "/s2s/v2.0/file", (200, {**slot_body(srv, new_item_key=[1]), "trace": "x"}))
    srv.route("PUT", "/_storage/upload/abc.jpg", (200, b""))
    srv.route("POST", CREATE, (200, {"status": 200, "data": {"task_id": TASK, "queue": 3}, "server": "y"}))
    output = [json_entry("pore", 70.25, 80, url=f"{srv.url}/_storage/m/pore_output.png", dst_id="z", extra={}),
              {"type": "all", "score": 80, "url": None, "weight": 1.0},
              {"type": "brand_new_entry", "value": 3, "url": None}]
    srv.route("GET", POLL, (200, {"status": 200, "data": {"error": None, "results": {"output": output, "v": 2},
                                                       "task_status": "success", "eta": 0}, "meta": {}}))
    srv.route("GET", "/_storage/m/pore_output.png", (200, image_bytes(), {"Content-Type": "binary/octet-stream"}))
    r = client_for(srv).submit(jpeg(), ["pore"], format="json").wait(timeout=5)
    assert r.score("pore") == 70.25 and r.overall == 80.0 and r.mask("pore").mode == "RGBA"
    # 17: the file_id (with + / =) only ever travels inside JSON bodies, never in a URL.
    assert json.loads(srv.calls("POST", CREATE)[0]["body"])["src_file_id"] == FID
    assert not [q for q in srv.requests if FID in unquote(q["path"])]


@pytest.mark.parametrize("with_url", [True, False], ids=["url-null", "no-url-key"])
def test_q7_entries_with_or_without_the_url_key(srv, with_url):
    base = f"{srv.url}/_storage/m"
    out = [json_entry("pore", 70.25, 80, url=f"{base}/pore_output.png"),
           json_entry("skin_type", region="t_zone", skin_type="Oily", url=f"{base}/skin_type_t_zone_output.png"),
           {"type": "all", "score": 80, "url": None}, {"type": "skin_age", "score": 33, "url": None},
           json_entry("resize_image", url=f"{base}/resize_image.jpg")]
    if not with_url:
        for e in out:
            del e["url"]
    assert all(("url" in e) is with_url for e in out)
    srv.route("GET", POLL, success({"output": out}))
    srv.route("GET", "/_storage/m/pore_output.png", (200, image_bytes()))
    srv.route("GET", "/_storage/m/resize_image.jpg", (200, image_bytes("JPEG", mode="RGB")))
    r = client_for(srv).task(TASK).wait(timeout=5)
    assert r.score("pore") == 70.25 and r.overall == 80.0 and r.skin_age == 33
    assert r.skin_types == {"t_zone": "Oily"}
    assert r.mask("pore").mode == "RGBA" and r.resize_image().size == (60, 80)


# ---- 8. raw_score / all.score as integers or floats; skin_age an integer

@pytest.mark.parametrize("kind", [int, float], ids=["int", "float"])
def test_q8_scores_as_int_or_float_in_json_and_zip(kind):
    out = [json_entry("pore", kind(100), kind(99)), {"type": "all", "score": kind(99), "url": None},
           {"type": "skin_age", "score": 41, "url": None}]
    info = {"pore": {"raw_score": kind(100), "ui_score": 99, "output_mask_name": "pore_output.png"},
            "all": {"score": kind(99)}, "skin_age": 41}
    for r in (AnalysisResult.from_json({"results": {"output": out}}), AnalysisResult.from_zip(zip_of(info, {}))):
        assert r.score("pore") == 100.0 and type(r.score("pore")) is float
        assert r.overall == 99.0 and r.skin_age == 41 and type(r.skin_age) is int
        assert str(r.scores.ui_score.dtype) == "Int64" and r.scores.ui_score.iloc[0] == 99


# ---- 11. Content-Length string or number; headers object or list (the list with a number too)

@pytest.mark.parametrize("form", ["list-number", "list-string", "object-number", "object-string"])
def test_q11_upload_header_forms(srv, form):
    data = jpeg()
    length = len(data) if form.endswith("number") else str(len(data))
    pairs = {"Content-Type": "image/jpeg", "Content-Length": length}
    headers = [{"key": k, "value": v} for k, v in pairs.items()] if form.startswith("list") else pairs
    srv.route("POST", "/s2s/v2.0/file", (200, slot_body(srv, headers)))
    srv.route("PUT", "/_storage/upload/abc.jpg", (200, b""))
    assert client_for(srv).upload(data) == FID
    put = srv.calls("PUT")[0]
    assert put["headers"]["Content-Length"] == str(len(data)) and put["headers"]["Content-Type"] == "image/jpeg"
    assert put["body"] == data and "Authorization" not in put["headers"]


# ---- 12. mask names come from output_mask_name, whatever they are

def test_q12_mask_names_from_output_mask_name():
    info = {"hd_tear_trough": {"raw_score": 60.0, "ui_score": 73, "output_mask_name": "hd_tear_trough.png"},
            "hd_skin_type": {"whole": {"skin_type": "Dry", "output_mask_name": "hd_skin_type.png"}},
            "hd_pore": {"whole": {"raw_score": 50.0, "ui_score": 67, "output_mask_name": "hd_pore_output_all.png"},
                        "nose": {"raw_score": 45.0, "ui_score": 64, "output_mask_name": "hd_pore_output_nose.png"}}}
    files = {n: image_bytes() for n in ("hd_tear_trough.png", "hd_skin_type.png", "hd_pore_output_all.png",
                                        "hd_pore_output_nose.png")}
    r = AnalysisResult.from_zip(zip_of(info, files))
    assert r.mask_names == {("hd_tear_trough", "whole"): "hd_tear_trough.png",
                            ("hd_skin_type", "whole"): "hd_skin_type.png",
                            ("hd_pore", "whole"): "hd_pore_output_all.png", ("hd_pore", "nose"): "hd_pore_output_nose.png"}
    assert all(m.size == (60, 80) for m in r.masks.values())


# ---- 13. skin_age, resize_image and all: present or absent, both formats

@pytest.mark.parametrize("present", [True, False], ids=["present", "absent"])
@pytest.mark.parametrize("field", ["skin_age", "resize_image", "all"])
@pytest.mark.parametrize("fmt", ["json", "zip"])
def test_q13_optional_extras(srv, fmt, field, present):
    resize = image_bytes("JPEG", (60, 80), "RGB")
    if fmt == "json":
        out = [json_entry("pore", 70.0, 80)]
        if present:
            out.append({"skin_age": {"type": "skin_age", "score": 33, "url": None},
                        "all": {"type": "all", "score": 80.0, "url": None},
                        "resize_image": json_entry("resize_image", url=f"{srv.url}/_storage/resize_image.jpg")}[field])
        srv.route("GET", "/_storage/resize_image.jpg", (200, resize, {"Content-Type": "binary/octet-stream"}))
        srv.route("GET", POLL, success({"output": out}))
        r = client_for(srv).task(TASK).wait(timeout=5)
    else:
        info = {"pore": {"raw_score": 70.0, "ui_score": 80, "output_mask_name": "pore_output.png"}}
        files = {"pore_output.png": image_bytes()}
        if present:
            info[field] = {"skin_age": 33, "all": {"score": 80.0},
                           "resize_image": {"image_name": "resize_image.jpg"}}[field]
            if field == "resize_image":
                files["resize_image.jpg"] = resize
        r = AnalysisResult.from_zip(zip_of(info, files))
    got = {"skin_age": r.skin_age, "all": r.overall,
           "resize_image": None if r.resize_image() is None else r.resize_image().size}[field]
    assert got == ({"skin_age": 33, "all": 80.0, "resize_image": (60, 80)}[field] if present else None)
    assert r.score("pore") == 70.0


# ---- 14. masks match resize_image, not the original upload

def test_q14_masks_align_with_resize_image_not_the_original(srv):
    from skinlab.plots import overlay_mask

    base = f"{srv.url}/_storage/k"
    out = [json_entry("redness", 70.0, 80, url=f"{base}/redness_output.png"),
           json_entry("resize_image", url=f"{base}/resize_image.jpg")]
    srv.route("GET", POLL, success({"output": out}))
    srv.route("GET", "/_storage/k/redness_output.png", (200, image_bytes("PNG", (320, 640))))
    srv.route("GET", "/_storage/k/resize_image.jpg", (200, image_bytes("JPEG", (320, 640), "RGB")))
    r = client_for(srv).task(TASK).wait(timeout=5)
    mask, photo = r.mask("redness"), r.resize_image()
    assert mask.size == photo.size == (320, 640)                # the original upload was larger
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert overlay_mask(photo, mask).shape == (640, 320, 3)
    original = Image.new("RGB", (750, 1500))
    with pytest.warns(UserWarning, match="align with resize_image"):
        overlay_mask(original, mask)


# ---- 15. no polling_interval in v2; a legacy one (milliseconds) must not break anything

@pytest.mark.parametrize("present", [True, False], ids=["legacy-polling_interval", "absent"])
def test_q15_polling_interval_ignored(srv, monkeypatch, present):
    extra = {"polling_interval": 2000} if present else {}
    srv.route("POST", CREATE, (200, {"status": 200, "data": {"task_id": TASK, **extra}}))
    running = {"error": None, "results": None, "task_status": "running", **extra}
    srv.route("GET", POLL, envelope(running), success({"output": [json_entry("pore", 70.0, 80)]}, **extra))
    sleeps: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", sleeps.append)
    schedule = PollSchedule(first=1.0, factor=1.0, cap=1.0)
    r = client_for(srv, poll_schedule=schedule).submit("https://example.invalid/f.jpg", ["pore"]).wait(timeout=60)
    assert r.score("pore") == 70.0 and sleeps == [1.0, 1.0]       # the schedule, never 2000 (s or ms)


# ---- 16. one fault, two texts: the class comes from the status and error_code, never the text

@pytest.mark.parametrize("with_code", [True, False], ids=["with-code", "without-code"])
@pytest.mark.parametrize("text", ["Not available dst_action hd_x", "0 is not one of the accepted values."],
                         ids=["documented-text", "index-text"])
def test_q16_bad_action_in_either_text(srv, text, with_code):
    body = {"status": 400, "error": text, **({"error_code": "InvalidParameters"} if with_code else {})}
    srv.route("POST", CREATE, (400, body))
    with pytest.raises(errors.SkinlabError) as info:
        client_for(srv).submit(FID, ["pore"])
    assert type(info.value) is errors.InvalidParametersError
    assert info.value.code == ("InvalidParameters" if with_code else None) and text in str(info.value)
    assert len(srv.calls("POST", CREATE)) == 1


@pytest.mark.parametrize("text, code, cls", [
    ("Not available dst_action pore", "CreditInsufficiency", errors.InsufficientCreditsError),
    ("Insufficient units to run this task", "InvalidParameters", errors.InvalidParametersError)],
    ids=["units-code", "params-code"])
def test_q16_error_code_not_text_decides(srv, text, code, cls):
    srv.route("POST", CREATE, (400, {"status": 400, "error": text, "error_code": code}))
    with pytest.raises(errors.SkinlabError) as info:
        client_for(srv).submit(FID, ["pore"])
    assert type(info.value) is cls and info.value.code == code


# ---- 17. task ids of 64 or 107 characters

@pytest.mark.parametrize("task_id", [TASK64, TASK], ids=["64", "107"])
def test_q17_task_id_of_any_length(srv, task_id):
    srv.route("POST", CREATE, envelope({"task_id": task_id}))
    srv.route("GET", f"/s2s/v2.0/task/skin-analysis/{task_id}", success({"output": [json_entry("pore", 70.0, 80)]}))
    task = client_for(srv).submit(FID, ["pore"], format="json")
    assert task.task_id == task_id and task.wait(timeout=5).task_id == task_id
    assert srv.calls("GET")[0]["path"].rsplit("/", 1)[1] == task_id


@pytest.mark.parametrize("file_id", [FID, "sKu1dDKFvwQ2i6r7fPZMV9m4e1gNdC9CQTQPphsFMnVic0sUTUk02w7IxDtFjQ"],
                         ids=["plus-slash-equals", "plain"])
def test_q17_file_id_with_or_without_base64_specials(srv, file_id):
    srv.route("POST", "/s2s/v2.0/file", (200, slot_body(srv, file_id=file_id)))
    srv.route("PUT", "/_storage/upload/abc.jpg", (200, b""))
    srv.route("POST", CREATE, envelope({"task_id": TASK}))
    c = client_for(srv)
    assert c.upload(jpeg()) == file_id                            # kept exactly, no decoding or quoting
    c.submit(file_id, ["pore"])                                   # and sent back as a file_id
    assert json.loads(srv.calls("POST", CREATE)[0]["body"])["src_file_id"] == file_id
    assert not [q for q in srv.requests if file_id in unquote(q["path"])]   # never in a URL


# ---- 18. 429 from any endpoint, with no Retry-After

def _scripted_ok(srv):
    srv.route("POST", "/s2s/v2.0/file", (200, slot_body(srv)))
    srv.route("PUT", "/_storage/upload/abc.jpg", (200, b""))
    srv.route("POST", CREATE, envelope({"task_id": TASK}))
    srv.route("GET", POLL, success({"output": [json_entry("pore", 70.0, 80)]}))
    srv.route("POST", DELETE, (200, {"status": 200}))
    srv.route("GET", CREDIT, (200, example("credit-response.json")))
    srv.route("GET", COST, (200, {"status": 200, "result": {"next_token": None, "skus": [{"amount": 9}]}}))
    srv.route("GET", "/_storage/results/r.zip", (200, zip_of({"all": {"score": 1.0}}, {})))


ENDPOINTS = {
    "upload-slot": (("POST", "/s2s/v2.0/file"), lambda c, s: c.upload(jpeg())),
    "upload-put": (("PUT", "/_storage/upload/abc.jpg"), lambda c, s: c.upload(jpeg())),
    "create": (("POST", CREATE), lambda c, s: c.submit(FID, ["pore"])),
    "poll": (("GET", POLL), lambda c, s: c.task(TASK).status()),
    "delete": (("POST", DELETE), lambda c, s: c.task(TASK).delete()),
    "credit": (("GET", CREDIT), lambda c, s: c.credits()),
    "feature-cost": (("GET", COST), lambda c, s: c.feature_cost()),
    "download": (("GET", "/_storage/results/r.zip"), lambda c, s: c.download(f"{s.url}/_storage/results/r.zip")),
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_q18_429_on_every_endpoint_is_retried(srv, endpoint):
    (method, path), call = ENDPOINTS[endpoint]
    _scripted_ok(srv)
    ok = srv.routes[(method, path)][0]
    srv.route(method, path, R429, R429, ok)
    policy, sleeps = recording_policy()
    call(client_for(srv, retry=policy), srv)
    assert len(srv.calls(method, path)) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("retry_after", [None, "3600"], ids=["no-retry-after", "retry-after"])
def test_q18_backoff_is_the_same_with_or_without_retry_after(srv, retry_after):
    _scripted_ok(srv)
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    limited = (429, {"status": 429, "error": "Too many requests"}, headers)
    srv.route("GET", CREDIT, limited, limited, (200, example("credit-response.json")))
    policy, sleeps = recording_policy(seed=3)
    assert client_for(srv, retry=policy).balance() == pytest.approx(269.5)
    rng = random.Random(3)
    assert sleeps == [rng.uniform(0, cap) for cap in (1, 2)]      # the policy's backoff, no header needed
    assert len(srv.calls("GET", CREDIT)) == 3


# ---- 19. HTTP 500 TaskTimeout on a poll; 500 or 404 when the upload was skipped

def test_q19_poll_500_task_timeout_gives_up_after_three_retries(srv):
    body = {"status": 500, "error": "Task execution timed out", "error_code": "TaskTimeout"}
    srv.route("GET", POLL, (500, body))
    with pytest.raises(errors.ServerError) as info:
        client_for(srv).task(TASK).wait(timeout=5)
    assert info.value.code == "TaskTimeout" and len(srv.calls("GET", POLL)) == 4


@pytest.mark.parametrize("answer, cls, polls", [
    ((404, {"status": 404, "error": "Not Found"}), errors.APIError, 1),
    ((500, {"status": 500, "error": "unknown_internal_error"}), errors.ServerError, 4),
    ((200, {"status": 200, "data": {"error": "unknown_internal_error", "results": None, "task_status": "error"}}),
     errors.InternalEngineError, 1)], ids=["404", "500", "task-error"])
def test_q19_skipped_upload_surfaces_as_an_error(srv, answer, cls, polls):
    srv.route("GET", POLL, answer)
    with pytest.raises(errors.SkinlabError) as info:
        client_for(srv).task(TASK).wait(timeout=5)
    assert type(info.value) is cls and len(srv.calls("GET", POLL)) == polls


@pytest.mark.parametrize("answer, cls", [((404, {"status": 404, "error": "Not Found"}), errors.APIError),
                                         ((500, {"status": 500, "error": "unknown_internal_error"}),
                                          errors.TaskFateUnknownError)], ids=["404", "500"])
def test_q19_skipped_upload_at_create(srv, answer, cls):
    srv.route("POST", CREATE, answer, envelope({"task_id": TASK}))
    with pytest.raises(errors.SkinlabError) as info:
        client_for(srv).submit(FID, ["pore"])
    assert type(info.value) is cls and len(srv.calls("POST", CREATE)) == 1   # never re-sent


# ---- 20. slow connections: 20 s connect, 60 s read, 300 s for the PUT; read timeouts

class SpySession(requests.Session):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str, object]] = []

    def request(self, method, url, **kw):
        self.seen.append((method, url.split("?")[0], kw.get("timeout")))
        return super().request(method, url, **kw)


def test_q20_default_timeouts_are_sent(srv):
    _scripted_ok(srv)
    spy = SpySession()
    c = client_for(srv, session=spy)
    assert c.timeout == (20.0, 60.0) and c.put_timeout == 300.0
    c.submit(jpeg(), ["pore"]).status()
    c.download(f"{srv.url}/_storage/results/r.zip")
    timeouts = {(m, u.replace(srv.url, "")): t for m, u, t in spy.seen}
    assert timeouts == {("POST", "/s2s/v2.0/file"): (20.0, 60.0), ("PUT", "/_storage/upload/abc.jpg"): (20.0, 300.0),
                        ("POST", CREATE): (20.0, 60.0), ("GET", POLL): (20.0, 60.0),
                        ("GET", "/_storage/results/r.zip"): (20.0, 60.0)}


@contextmanager
def silent_server():
    """Accepts connections and reads, but never answers: every request ends in a read timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.05)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except socket.timeout:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", conns
    finally:
        stop.set()
        thread.join()
        for c in conns:
            c.close()
        sock.close()


def test_q20_read_timeout_retried_on_poll_but_never_on_create():
    with silent_server() as (url, conns):
        c = client_for(url, timeout=(2.0, 0.15))
        with pytest.raises(errors.TaskFateUnknownError, match="may exist"):
            c.submit(FID, ["pore"])
        time.sleep(0.05)
        assert len(conns) == 1                                    # the create was sent once
        with pytest.raises(errors.SkinlabConnectionError):
            c.task(TASK).status()
        time.sleep(0.05)
        assert len(conns) == 1 + 4                                # a poll is retried 3 times


def test_q20_slow_emulator_answers_survive():
    with serve(task_duration_s=0) as srv:
        assert client_for(srv).balance() == 1000                  # the emulator's first answer is slow (warm-up)
        c = client_for(srv, timeout=(2.0, 0.3))
        srv.faults.slow("credit", 0.2)
        assert c.balance() == 1000                                # slow but within the read timeout
        srv.faults.slow("credit", 0.6)
        assert c.balance() == 1000                                # timed out once, retried (safe call)
        assert srv.faults.pending() == 0


# ---- 21. downloads are binary/octet-stream: the type comes from the bytes

@pytest.mark.parametrize("ctype", ["binary/octet-stream", "image/png"])
def test_q21_mask_type_detected_from_bytes(srv, ctype):
    # an overlay JPEG behind a .png name, and a PNG: both identified by their bytes
    out = [json_entry("redness", 70.0, 80, url=f"{srv.url}/_storage/m/redness_output.png"),
           json_entry("acne", 60.0, 75, url=f"{srv.url}/_storage/m/acne_output.png")]
    srv.route("GET", POLL, success({"output": out}))
    srv.route("GET", "/_storage/m/redness_output.png", (200, image_bytes("JPEG", mode="RGB"), {"Content-Type": ctype}))
    srv.route("GET", "/_storage/m/acne_output.png", (200, image_bytes("PNG"), {"Content-Type": ctype}))
    r = client_for(srv).task(TASK).wait(timeout=5)
    assert r.mask("redness").format == "JPEG" and r.mask("acne").format == "PNG"


@pytest.mark.parametrize("ctype", ["binary/octet-stream", "application/zip", "text/plain"])
def test_q21_zip_detected_from_bytes(srv, ctype):
    srv.route("GET", POLL, success({"url": f"{srv.url}/_storage/r/x"}))
    info = {"pore": {"raw_score": 70.0, "ui_score": 80, "output_mask_name": "pore_output.png"}}
    srv.route("GET", "/_storage/r/x", (200, zip_of(info, {"pore_output.png": image_bytes()}), {"Content-Type": ctype}))
    assert client_for(srv).task(TASK).wait(timeout=5).score("pore") == 70.0


# ---- 22. envelopes: data, then result, then results

def test_q22_unwrap_order():
    assert unwrap({"status": 200, "data": {"a": 1}, "result": {"b": 2}, "results": [3]}) == {"a": 1}
    assert unwrap({"status": 200, "result": {"b": 2}, "results": [3]}) == {"b": 2}
    assert unwrap({"status": 200, "results": [3]}) == [3]
    with pytest.raises(errors.ResultFormatError):
        unwrap({"status": 200, "payload": {}})


def test_q22_legacy_result_wrapper_on_create_and_poll(srv):
    srv.route("POST", CREATE, envelope({"task_id": TASK}, key="result"))
    srv.route("GET", POLL, envelope({"status": "running", "error": None, "polling_interval": 2000}, key="result"),
              envelope({"task_status": "success", "error": None,
                        "results": {"output": [json_entry("pore", 70.0, 80)]}}, key="result"))
    task = client_for(srv).submit(FID, ["pore"], format="json")
    assert task.status().state == "running"                      # the v1 "status" key is understood
    assert task.wait(timeout=5).score("pore") == 70.0


# ================================================================ retry policies (§8.1, §5.5)

SAFE_CALLS = {
    "poll": (("GET", POLL), lambda c, s: c.task(TASK).status()),
    "upload-slot": (("POST", "/s2s/v2.0/file"), lambda c, s: c.upload(jpeg())),
    "upload-put": (("PUT", "/_storage/upload/abc.jpg"), lambda c, s: c.upload(jpeg())),
    "download": (("GET", "/_storage/results/r.zip"), lambda c, s: c.download(f"{s.url}/_storage/results/r.zip")),
}


@pytest.mark.parametrize("fault", ["drop", "429", "503"])
@pytest.mark.parametrize("call", list(SAFE_CALLS))
def test_safe_calls_retry_connection_errors_429_and_5xx(srv, call, fault):
    (method, path), run = SAFE_CALLS[call]
    _scripted_ok(srv)
    bad = {"drop": "drop", "429": R429, "503": (503, {"status": 503, "error": "Service Unavailable"})}[fault]
    srv.route(method, path, bad, srv.routes[(method, path)][0])
    policy, sleeps = recording_policy()
    run(client_for(srv, retry=policy), srv)
    assert len(srv.calls(method, path)) == 2 and len(sleeps) == 1


def test_backoff_is_exponential_with_full_jitter(srv):
    srv.route("GET", CREDIT, R429)
    policy, sleeps = recording_policy(seed=11)
    with pytest.raises(errors.RateLimitError):
        client_for(srv, retry=policy).credits()
    assert len(srv.calls("GET", CREDIT)) == 6                     # 1 + 5 retries (§8.1)
    rng = random.Random(11)
    assert sleeps == [rng.uniform(0, cap) for cap in (1, 2, 4, 8, 16)]   # uniform(0, base * 2**n)
    p = RetryPolicy(rng=random.Random(0))
    draws = [p.delay(20) for _ in range(200)]
    assert max(draws) <= 60 and min(draws) >= 0 and max(draws) - min(draws) > 30   # capped, jittered


def test_poll_5xx_retried_three_times_within_2_4_8_s(srv):
    srv.route("GET", POLL, (502, "<html>bad gateway</html>"))
    policy, sleeps = recording_policy(seed=5)
    with pytest.raises(errors.ServerError):
        client_for(srv, retry=policy).task(TASK).status()
    rng = random.Random(5)
    assert sleeps == [rng.uniform(0, cap) for cap in (2, 4, 8)] and len(srv.calls("GET", POLL)) == 4


def test_create_with_emulator_lost_answers_is_never_resent():
    with serve(task_duration_s=0) as srv:
        c = client_for(srv)
        srv.faults.lose_create_response()                         # task made, connection dropped
        with pytest.raises(errors.TaskFateUnknownError, match="may exist"):
            c.submit(FID, ["redness"])
        assert len(srv.app.task_ids()) == 1
        srv.faults.lose_create_response(status=502)               # task made, 502 answered
        with pytest.raises(errors.TaskFateUnknownError) as info:
            c.submit(FID, ["redness"])
        assert info.value.status == 502 and not info.value.retry_safe
        assert len(srv.app.task_ids()) == 2                       # one task per submit: none re-sent
        srv.faults.rate_limit(n=2, route="create")                # 429: no task exists, safe to retry
        c.submit(FID, ["redness"])
        assert len(srv.app.task_ids()) == 3


# ================================================================ the client-side rate limiter

def test_default_limiter_is_shared_per_key_and_under_250_per_300s():
    a = Client("sk-limiter-key-1", base_url="https://api.example.invalid")
    b = Client("sk-limiter-key-1", base_url="https://api.example.invalid")
    other = Client("sk-limiter-key-2", base_url="https://api.example.invalid")
    assert a.rate_limiter is b.rate_limiter and a.rate_limiter is not other.rate_limiter
    assert a.rate_limiter.limit <= 250 and a.rate_limiter.window == 300.0


def test_limiter_holds_across_threads():
    limiter = RateLimiter(limit=4, window=0.25)
    stamps: list[float] = []
    lock = threading.Lock()

    def work():
        for _ in range(3):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    assert len(stamps) == 12
    assert all(stamps[i + 4] - stamps[i] >= 0.25 - 0.005 for i in range(len(stamps) - 4))   # <= 4 per window


def test_limiter_counts_api_calls_only(srv):
    _scripted_ok(srv)
    srv.route("GET", POLL, success({"url": f"{srv.url}/_storage/results/r.zip"}))
    limiter = RateLimiter(limit=1000, window=300)
    client_for(srv, rate_limiter=limiter).submit(jpeg(), ["pore"]).wait(timeout=5)
    assert len(limiter._times) == 3                               # slot, create, poll; not PUT or download
    assert len(srv.requests) == 5


# ================================================================ the polling schedule (§8.6)

class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self):
        return self.now

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_default_schedules():
    cloud = Client(KEY, base_url="https://api.example.invalid", rate_limiter=False)
    assert cloud.poll_schedule == PollSchedule()
    first, *rest = [d for d, _ in zip(PollSchedule().delays(), range(6))]
    assert 5.0 <= first <= 7.0                                     # about the typical 5-7 s task
    assert rest == sorted(rest) and max(rest) == 10.0             # backs off to a cap, polls at least every 10 s
    local = Client(base_url="http://127.0.0.1:9", rate_limiter=False)
    assert local.poll_schedule == LOCAL_POLL and LOCAL_POLL.first < 1


def test_schedule_spends_few_polls(srv, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(client_mod, "time", fake)
    running = envelope({"error": None, "results": None, "task_status": "running"})
    srv.route("GET", POLL, running, running, success({"output": [json_entry("pore", 70.0, 80)]}))
    Client(KEY, base_url=srv.url, rate_limiter=False, retry=FAST, poll_schedule=PollSchedule()).task(TASK).wait(60)
    assert fake.sleeps == [7.0, 10.0, 10.0] and len(srv.calls("GET", POLL)) == 3   # the sample's 2 s: 14 polls


def test_deadline_wins(srv, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(client_mod, "time", fake)
    srv.route("GET", POLL, envelope({"error": None, "results": None, "task_status": "running"}))
    start = fake.now
    with pytest.raises(errors.TaskTimeoutError) as info:
        client_for(srv, poll_schedule=PollSchedule()).task(TASK).wait(timeout=12)
    assert info.value.task_id == TASK and "do not submit again" in str(info.value)
    assert fake.now - start <= 12.0                               # no sleep, and so no poll, past the deadline
    assert fake.sleeps[0] == 7.0 and 2 <= len(srv.calls("GET", POLL)) <= 3


PERSISTENT = {"429": R429, "503": (503, {"status": 503, "error": "Service Unavailable"})}


class ClockedSession(requests.Session):
    """Records the (possibly fake) monotonic time at which each request is sent."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.sent = clock, []

    def request(self, method, url, **kw):
        self.sent.append((self.clock(), kw.get("timeout")))
        return super().request(method, url, **kw)


@pytest.mark.parametrize("fault", list(PERSISTENT))
def test_deadline_wins_over_poll_retries(srv, monkeypatch, fault):
    """The deadline bounds each poll's own retries: backoff cut to the time left, no request at or
    after it, and TaskTimeoutError with the task id, not the 429/5xx error (audit: 16 s and 6 s)."""
    fake = FakeTime()
    monkeypatch.setattr(client_mod, "time", fake)
    srv.route("GET", POLL, PERSISTENT[fault])
    policy = RetryPolicy(sleep=fake.sleep, rng=random.Random(1))       # the default backoff, on the fake clock
    session = ClockedSession(fake.monotonic)
    start = fake.now
    with pytest.raises(errors.TaskTimeoutError) as info:
        client_for(srv, retry=policy, session=session, poll_schedule=PollSchedule(first=0.2)).task(TASK).wait(1.0)
    assert fake.now - start == pytest.approx(1.0)                  # slept up to the deadline, not past it
    assert sum(fake.sleeps) == pytest.approx(1.0) and fake.sleeps[0] == 0.2
    assert all(at < start + 1.0 for at, _ in session.sent) and len(session.sent) >= 2
    assert all(t[1] <= start + 1.0 - at + 1e-9 for at, t in session.sent[1:])   # read timeouts cut to the time left
    exc = info.value
    assert exc.task_id == TASK and exc.status == int(fault)
    assert f"client.task({TASK!r}).wait()" in str(exc) and f"HTTP {fault}" in str(exc)


@pytest.mark.parametrize("fault", list(PERSISTENT))
def test_deadline_wins_over_poll_retries_on_the_real_clock(srv, fault):
    # the default policy (base 1 s): a persistent 429 would sleep up to 1+2+4+8+16 s, a 5xx up to 2+4+8 s
    srv.route("GET", POLL, PERSISTENT[fault])
    client = client_for(srv, retry=RetryPolicy(rng=random.Random(1)))
    start = time.monotonic()
    with pytest.raises(errors.TaskTimeoutError) as info:
        client.task(TASK).wait(timeout=1.0)
    assert time.monotonic() - start < 1.6
    assert info.value.task_id == TASK and info.value.status == int(fault)


def test_deadline_wins_over_the_rate_limiter(srv, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(client_mod, "time", fake)
    srv.route("GET", POLL, envelope({"error": None, "results": None, "task_status": "running"}))
    limiter = RateLimiter(limit=1, window=300, clock=fake.monotonic, sleep=fake.sleep)
    limiter.acquire()                                              # the key's budget is spent for 300 s
    start = fake.now
    with pytest.raises(errors.TaskTimeoutError, match="rate limiter") as info:
        client_for(srv, rate_limiter=limiter).task(TASK).wait(timeout=5)
    assert fake.now - start <= 5.0 and srv.calls("GET", POLL) == [] and info.value.task_id == TASK
    assert len(limiter._times) == 1                               # no slot taken for the poll never sent
    with pytest.raises(TimeoutError):
        limiter.acquire(max_wait=0.5)
    assert limiter.acquire(max_wait=300) > 0                      # a slot within the wait is still given


def test_deadline_cuts_a_hanging_poll():
    with silent_server() as (url, conns):
        start = time.monotonic()
        with pytest.raises(errors.TaskTimeoutError) as info:
            client_for(url).task(TASK).wait(timeout=0.5)           # read timeout 60 s, cut to the time left
        assert time.monotonic() - start < 1.5 and info.value.task_id == TASK


def test_schedule_is_tunable(srv, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(client_mod, "time", fake)
    running = envelope({"error": None, "results": None, "task_status": "running"})
    srv.route("GET", POLL, running, running, running, running, success({"output": [json_entry("pore", 70.0, 80)]}))
    client_for(srv).task(TASK).wait(timeout=None, schedule=PollSchedule(first=1, factor=2, cap=4))
    assert fake.sleeps == [1, 2, 4, 4, 4]


# ================================================================ expired URLs, delete, account (§8.2-§8.5)

@pytest.fixture(scope="module")
def face_jpeg():
    from skinlab.samples import sample_portrait

    buf = io.BytesIO()
    sample_portrait("astronaut", "sd").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_expired_urls_refreshed_against_the_emulator(face_jpeg):
    with serve(task_duration_s=0) as srv:
        c = client_for(srv)
        r = c.submit(face_jpeg, ["redness"], format="json").wait(timeout=30)
        srv.faults.expire_urls()
        stale = next(e.mask for e in r.entries if e.action == "redness")
        assert requests.get(stale, timeout=10).status_code == 403
        assert r.mask("redness").size == r.resize_image().size      # both fetched through a fresh poll
        task = c.submit(face_jpeg, ["redness"])                     # zip
        while not (status := task.status()).done:
            time.sleep(0.02)
        srv.faults.expire_urls()
        assert requests.get(status.results["url"], timeout=10).status_code == 403
        assert AnalysisResult.from_status(status, task=task).score("redness") == r.score("redness")


def test_delete_uses_the_v20_path_and_maps_errors(srv):
    srv.route("POST", DELETE, (200, {"status": 200}),
              (400, {"status": 400, "error": "Task is not finished", "error_code": "OperationInvalid"}),
              (400, {"status": 400, "error": "Invalid task ID", "error_code": "InvalidTaskId"}))
    task = client_for(srv, api_version="v2.1").task(TASK)
    assert task.delete() is None
    with pytest.raises(errors.APIError) as info:
        task.delete()
    assert info.value.code == "OperationInvalid"
    with pytest.raises(errors.InvalidTaskIdError):
        task.delete()
    assert [json.loads(r["body"]) for r in srv.calls("POST", DELETE)] == [{"task_id": TASK}] * 3


def test_delete_against_the_emulator(face_jpeg):
    with serve(task_duration_s=0) as srv:
        c = client_for(srv)
        task = c.submit(face_jpeg, ["redness"], format="json")
        r = task.wait(timeout=30)
        task.delete()
        with pytest.raises(errors.InvalidTaskIdError):
            task.status()
        assert requests.get(next(e.mask for e in r.entries), timeout=10).status_code == 404


@pytest.mark.parametrize("end", ["missing", "null", "empty"])
def test_feature_cost_pages_until_the_token_ends(srv, end):
    last = {"skus": [{"amount": 22}]}
    if end != "missing":
        last["next_token"] = None if end == "null" else ""
    srv.route("GET", COST, (200, {"status": 200, "result": {"next_token": "NA", "skus": [{"amount": 9}]}}),
              (200, {"status": 200, "result": last}))
    assert [s["amount"] for s in client_for(srv).feature_cost()] == [9, 22]
    calls = srv.calls("GET", COST)
    assert len(calls) == 2


def test_credits_and_feature_cost_against_the_emulator():
    with serve(task_duration_s=0, initial_units=57.5) as srv:
        c = client_for(srv)
        lots = c.credits()
        assert lots[0]["type"] == "ApiPaygToken" and c.balance() == 57.5
        skus = c.feature_cost()
        assert [s["amount"] for s in skus] == [9, 12, 14, 16, 12, 16, 20, 22]


@pytest.mark.parametrize("names, units", [(["pore"], 9), (["wrinkle", "pore", "acne", "redness", "oiliness"], 12),
                                          (["hd_pore"] * 3, 12), ("all_hd", 22)])
def test_estimate_tiers(names, units):
    from skinlab.actions import HD_ACTIONS

    c = Client(KEY, base_url="https://api.example.invalid", rate_limiter=False)
    names = list(HD_ACTIONS) if names == "all_hd" else names
    if len(set(names)) < len(names):
        with pytest.warns(UserWarning, match="Duplicate actions dropped"):     # duplicates count once
            assert c.estimate(names) == units
    else:
        assert c.estimate(names) == units


def test_estimate_refuses_on_low_balance_against_the_emulator(face_jpeg):
    with serve(task_duration_s=0, initial_units=9) as srv:
        c = client_for(srv)
        assert c.estimate(["redness"], check_balance=True) == 9    # exactly enough
        c.submit(face_jpeg, ["redness"], check_balance=True).wait(timeout=30)
        assert c.balance() == 0
        with pytest.raises(errors.InsufficientCreditsError, match="costs 9 units but the balance is 0"):
            c.submit(face_jpeg, ["redness"], check_balance=True)
        assert len(srv.app.task_ids()) == 1
        with pytest.raises(errors.InsufficientCreditsError) as info:  # without the pre-check: the 400 from create
            c.submit(face_jpeg, ["redness"])
        assert info.value.code == "CreditInsufficiency" and info.value.status == 400


# ================================================================ credentials from the environment (§2.3)

@pytest.fixture
def netrc_trap(tmp_path, monkeypatch):
    """A netrc with an entry for 127.0.0.1 and a ``default`` one, as $NETRC (requests reads it)."""
    path = tmp_path / "netrc"
    path.write_text("machine 127.0.0.1 login netrc-user password netrc-pass\n"
                    "default login anyone password anything\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    assert requests.utils.get_netrc_auth("http://127.0.0.1:1/x") == ("netrc-user", "netrc-pass")   # armed
    assert requests.utils.get_netrc_auth("http://localhost:1/x") == ("anyone", "anything")
    return path


def test_netrc_never_replaces_the_bearer_nor_reaches_storage(srv, netrc_trap):
    storage = srv.url.replace("127.0.0.1", "localhost")             # the `default` entry's host
    _scripted_ok(srv)
    slot = slot_body(srv)
    slot["data"]["files"][0]["requests"][0]["url"] = f"{storage}/_storage/upload/abc.jpg?X-Amz-Expires=7200"
    srv.route("POST", "/s2s/v2.0/file", (200, slot))
    c = client_for(srv)
    assert c.session.trust_env                                       # proxies etc. still come from the environment
    c.submit(jpeg(), ["pore"]).wait(timeout=5)
    c.download(f"{storage}/_storage/results/r.zip")
    c.credits()
    api = [r for r in srv.requests if not r["path"].startswith("/_storage/")]
    storage_calls = srv.calls("PUT", "/_storage/") + srv.calls("GET", "/_storage/")
    assert len(api) == 4 and len(storage_calls) == 2
    assert {r["headers"].get("Authorization") for r in api} == {f"Bearer {KEY}"}
    assert all("Authorization" not in r["headers"] for r in storage_calls)


def test_netrc_ignored_against_the_emulator(netrc_trap, face_jpeg):
    with serve(task_duration_s=0, api_keys=[KEY]) as srv:           # an allow-list: a Basic header would be a 401
        c = client_for(srv)
        task = c.submit(face_jpeg, ["redness"])                   # the PUT answers 400 if Authorization is sent
        assert task.wait(timeout=30).score("redness") is not None  # the ZIP downloaded, its GET without it
        assert zipfile.is_zipfile(io.BytesIO(c.download(task.status().results["url"])))


def test_environment_proxies_still_used(srv, netrc_trap, monkeypatch):
    target = "http://api.skinlab-proxy-test.invalid"                 # no such host: only the proxy answers
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, srv.url)
    srv.route("GET", f"{target}{CREDIT}", (200, example("credit-response.json")))
    assert client_for(target, allow_insecure_http=True).balance() == pytest.approx(269.5)
    (call,) = srv.requests
    assert call["path"] == f"{target}{CREDIT}" and call["headers"]["Authorization"] == f"Bearer {KEY}"


DEAD_PROXY = "http://127.0.0.1:9"                                     # nothing listens there


def _proxy_environment(monkeypatch, no_proxy):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        if no_proxy is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, no_proxy)
    assert requests.utils.get_environ_proxies("http://127.0.0.1:1/x", no_proxy=None) or no_proxy  # armed


@pytest.mark.parametrize("no_proxy", [None, "", "example.com"])
def test_loopback_never_goes_through_a_proxy(monkeypatch, face_jpeg, no_proxy):
    """The embedded emulator and its storage URLs are reached directly, whatever the proxy variables
    and no_proxy say, and whatever proxies the session was given."""
    _proxy_environment(monkeypatch, no_proxy)
    with serve(task_duration_s=0) as srv:
        c = client_for(srv)
        c.session.proxies = {"http": DEAD_PROXY, "all": DEAD_PROXY}
        assert c.balance() > 0
        task = c.submit(face_jpeg, ["redness"])                     # upload slot, storage PUT, create
        assert task.wait(timeout=30).score("redness") is not None  # polls and the ZIP download
        assert zipfile.is_zipfile(io.BytesIO(c.download(task.status().results["url"])))
    with Client.local(rate_limit=None) as c:                       # Client.local() too
        assert c.balance() > 0


def test_only_loopback_urls_bypass_proxies():
    from skinlab.client import _proxies_for

    assert _proxies_for("https://yce-api-01.makeupar.com/s2s/v1.0/client/credit") is None
    assert _proxies_for("https://127.0.0.1.example.com/x") is None
    for url in ("http://127.0.0.1:8765/x", "http://localhost:1/y", "http://[::1]:2/z", "http://127.8.9.1/"):
        direct = _proxies_for(url)
        assert direct and set(direct.values()) == {None} and {"http", "https", "all"} <= set(direct)
    assert _proxies_for("http://127.0.0.1:1/") is not _proxies_for("http://127.0.0.1:1/")  # requests writes into it
