"""Conformance of the local emulator with api-contract.md, over real HTTP with plain `requests`.

No skinlab client code is used here: this is the independent check that the emulator speaks the
contract. Account features (rate limit, units, deletion, retention, webhooks, faults) are in
test_local_server_account.py.
"""

from __future__ import annotations

import functools
import io
import json
import re
import statistics
import time
import zipfile

import pytest
import requests
from PIL import Image

from contract import example
from fakes import StaticSite
from skinlab.actions import CATALOGUE, HD_ACTIONS, SD_ACTIONS

KEY = "conformance-key"          # any token without whitespace or <> is a valid key
XML = "application/xml"


# ----------------------------------------------------------------------------------------------
# A small driver over plain requests
# ----------------------------------------------------------------------------------------------

class Api:
    """Plain-`requests` calls to one emulator with one API key."""

    def __init__(self, base: str, key: str = KEY):
        self.base = base
        self.key = key

    def headers(self, **extra) -> dict:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.base + path, headers=kw.pop("headers", self.headers()), timeout=30, **kw)

    def post(self, path: str, body=None, *, data=None, headers=None) -> requests.Response:
        if body is not None:
            data = json.dumps(body)
        return requests.post(self.base + path, data=data, headers=self.headers() if headers is None else headers,
                             timeout=30)

    def slot(self, size: int, name: str = "face.jpg", ctype: str = "image/jpeg", path: str = "/s2s/v2.0/file") -> dict:
        resp = self.post(path, {"files": [{"content_type": ctype, "file_name": name, "file_size": size}]})
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]["files"][0]

    def upload(self, data: bytes, name: str = "face.jpg", ctype: str = "image/jpeg") -> str:
        slot = self.slot(len(data), name, ctype)
        put = slot["requests"][0]
        resp = requests.put(put["url"], data=data, headers=put["headers"], timeout=30)
        assert resp.status_code == 200, resp.text
        return slot["file_id"]

    def create(self, body: dict, version: str = "v2.0") -> requests.Response:
        return self.post(f"/s2s/{version}/task/skin-analysis", body)

    def start(self, source: str, actions, fmt: str = "json", version: str = "v2.0", **extra) -> str:
        field = "src_file_url" if source.startswith(("http:", "https:", "ftp:")) else "src_file_id"
        resp = self.create({field: source, "dst_actions": list(actions), "format": fmt, **extra}, version)
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]["task_id"]

    def poll(self, task_id: str, version: str = "v2.0") -> requests.Response:
        return self.get(f"/s2s/{version}/task/skin-analysis/{task_id}")

    def wait(self, task_id: str, version: str = "v2.0", timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            resp = self.poll(task_id, version)
            assert resp.status_code == 200, resp.text
            data = resp.json()["data"]
            if data["task_status"] != "running":
                return data
            assert time.monotonic() < deadline, "task did not finish"
            time.sleep(0.05)

    def run(self, source: str, actions, fmt: str = "json", **kw) -> dict:
        return self.wait(self.start(source, actions, fmt, **kw))


def jpeg_bytes(img: Image.Image, quality: int = 95, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def portrait(name: str = "astronaut", tier: str = "sd", crop: bool = True, face_fraction: float = 0.7) -> Image.Image:
    """A bundled public-domain portrait, cropped (face ~0.7 of the width, 3:4) and Lanczos-upscaled
    to SD 600x800 or HD 1080x1440; or the uncropped original."""
    from skinlab.samples import sample_portrait

    return sample_portrait(name, tier, crop=crop, face_fraction=face_fraction)


@functools.lru_cache(maxsize=None)
def portrait_jpeg(name: str = "astronaut", tier: str = "sd", crop: bool = True) -> bytes:
    return jpeg_bytes(portrait(name, tier, crop))


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def storage_get(url: str, **kw) -> requests.Response:
    return requests.get(url, timeout=30, **kw)


def error_body(status: int, error: str, code: str | None = None) -> dict:
    body = {"status": status, "error": error}
    if code is not None:
        body["error_code"] = code
    return body


def xml_code(resp: requests.Response) -> str:
    match = re.search(r"<Code>([^<]+)</Code>", resp.text)
    return match.group(1) if match else ""


@pytest.fixture
def api(local_server, request) -> Api:
    # One key per test: balances are per key on the shared server.
    return Api(local_server.url, key="k-" + re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60])


# ----------------------------------------------------------------------------------------------
# Routing, headers, CORS (§2.2, §2.5)
# ----------------------------------------------------------------------------------------------

def test_unknown_path_is_404_and_wrong_method_405(api):
    resp = api.get("/s2s/v2.0/nothing-here")
    assert resp.status_code == 404 and resp.json() == {"status": 404, "error": "Not Found"}
    assert resp.headers["Content-Type"] == "application/json"
    resp = api.get("/s2s/v2.0/file")
    assert resp.status_code == 405 and resp.json() == {"status": 405, "error": "Method Not Allowed"}
    assert api.get("/s2s/v2.1/task/delete").status_code == 404  # delete has no v2.1 path
    assert api.post("/s2s/v2.0/task/skin-analysis/abc", {}).status_code == 405


def test_every_route_answers(api):
    """All API routes of §2.2 exist (not 404/405) with a valid key."""
    for path in ("/s2s/v2.0/file", "/s2s/v2.0/file/skin-analysis", "/s2s/v2.1/file/skin-analysis"):
        assert api.post(path, {"files": [{"content_type": "image/png", "file_name": "a.png", "file_size": 3}]}).status_code == 200
    for version in ("v2.0", "v2.1"):
        assert api.create({}, version).status_code == 400
        assert api.poll("unknown", version).status_code == 400
    assert api.post("/s2s/v2.0/task/delete", {}).status_code == 400
    assert api.get("/s2s/v2.0/credit/feature-cost").status_code == 200
    assert api.get("/s2s/v1.0/client/credit").status_code == 200


def test_api_headers_request_id_cors_and_backend_labels(api):
    ids = []
    for _ in range(5):
        resp = api.get("/s2s/v1.0/client/credit")
        rid = resp.headers["x-request-id"]
        assert re.fullmatch(r"[1-9]\d{17}", rid)
        ids.append(int(rid))
        assert resp.headers["access-control-allow-origin"] == "*"
        assert resp.headers["Content-Type"] == "application/json"
        assert "Retry-After" not in resp.headers and not any(h.lower().startswith("x-ratelimit") for h in resp.headers)
        assert resp.headers["x-skinlab-backend"] == "local"
        assert re.fullmatch(r"\S+; face=\S+", resp.headers["x-skinlab-engine"])
    assert ids == sorted(ids) and len(set(ids)) == 5
    # Error responses and 404s carry them too.
    for resp in (api.get("/nope"), requests.get(api.base + "/s2s/v1.0/client/credit")):
        assert re.fullmatch(r"\d{18}", resp.headers["x-request-id"])
        assert resp.headers["x-skinlab-backend"] == "local"


def test_options_preflight(api):
    resp = requests.options(api.base + "/s2s/v2.0/task/skin-analysis", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.status_code == 204 and resp.content == b""
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    assert re.fullmatch(r"\d{18}", resp.headers["x-request-id"])


# ----------------------------------------------------------------------------------------------
# Authentication (§2.3)
# ----------------------------------------------------------------------------------------------

BAD_AUTH = [None, "Basic abc", "Bearer", "Bearer ", "Bearer <KEY>", "Bearer <sk-abc>", "Bearer two words",
            "Bearer  leading-space", "Token abc", "abc"]


@pytest.mark.parametrize("header", BAD_AUTH)
def test_bad_authorization_gives_401_variant_b(api, header):
    headers = {} if header is None else {"Authorization": header}
    resp = api.post("/s2s/v2.0/task/skin-analysis", {"src_file_id": "x", "dst_actions": ["wrinkle"]}, headers=headers)
    assert resp.status_code == 401
    assert resp.json() == example("error-401.json")
    assert re.fullmatch(r"\d{18}", resp.headers["x-request-id"])


def test_401_on_every_api_route(api):
    calls = [("POST", "/s2s/v2.0/file"), ("POST", "/s2s/v2.1/file/skin-analysis"),
             ("POST", "/s2s/v2.0/task/skin-analysis"), ("GET", "/s2s/v2.1/task/skin-analysis/abc"),
             ("POST", "/s2s/v2.0/task/delete"), ("GET", "/s2s/v2.0/credit/feature-cost"),
             ("GET", "/s2s/v1.0/client/credit")]
    for method, path in calls:
        resp = requests.request(method, api.base + path, headers={"Authorization": "Bearer <YOUR_KEY>"}, timeout=10)
        assert resp.status_code == 401, path
        assert resp.json()["error_code"] == "InvalidApiKey"


def test_any_well_formed_key_is_accepted_case_insensitive_scheme(api):
    for header in ("Bearer any-key", "bearer no_prefix_at_all", "BEARER sk-abc", "Bearer x"):
        assert api.get("/s2s/v1.0/client/credit", headers={"Authorization": header}).status_code == 200


def test_allow_list():
    from skinlab.local import serve

    with serve(task_duration_s=0, api_keys=["sk-good"]) as srv:
        ok = requests.get(srv.url + "/s2s/v1.0/client/credit", headers={"Authorization": "Bearer sk-good"})
        bad = requests.get(srv.url + "/s2s/v1.0/client/credit", headers={"Authorization": "Bearer sk-other"})
    assert ok.status_code == 200
    assert bad.status_code == 401 and bad.json() == example("error-401.json")


# ----------------------------------------------------------------------------------------------
# File API (§3.2, §3.3)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/s2s/v2.0/file", "/s2s/v2.0/file/skin-analysis", "/s2s/v2.1/file/skin-analysis"])
def test_upload_slot_shape(api, path):
    request = example("upload-slot-request.json")
    resp = api.post(path, request)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == 200 and list(body["data"]) == ["files"]
    slot = body["data"]["files"][0]
    assert set(slot) == {"content_type", "file_name", "file_id", "requests"}
    assert slot["content_type"] == "image/jpeg" and slot["file_name"] == "front_selfie_2026-03-15.jpg"
    fid = slot["file_id"]
    assert len(fid) == 64 and "+" in fid and "/" in fid and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", fid)
    assert len(slot["requests"]) == 1
    put = slot["requests"][0]
    assert put["method"] == "PUT"
    assert put["headers"] == {"Content-Length": "2483117", "Content-Type": "image/jpeg"}
    url = put["url"]
    assert url.startswith(api.base + "/_storage/")
    assert url.split("?")[0].endswith(".jpg")
    assert "X-Amz-Expires=7200" in url and "X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost" in url
    assert fid not in url and requests.utils.quote(fid, safe="") not in url


def test_upload_several_items_and_accepted_types(api):
    items = [{"content_type": ct, "file_name": f"f{i}.{ext}", "file_size": 10 + i, "extra": True}
             for i, (ct, ext) in enumerate([("image/jpeg", "jpeg"), ("image/jpg", "JPG"), ("image/png", "png")])]
    slots = api.post("/s2s/v2.0/file", {"files": items}).json()["data"]["files"]
    assert [s["file_name"] for s in slots] == ["f0.jpeg", "f1.JPG", "f2.png"]
    assert [s["requests"][0]["headers"]["Content-Type"] for s in slots] == ["image/jpeg", "image/jpg", "image/png"]
    assert slots[1]["requests"][0]["url"].split("?")[0].endswith(".JPG")
    assert len({s["file_id"] for s in slots}) == 3


@pytest.mark.parametrize("body", [
    None, [], {}, {"files": []}, {"files": {}}, {"files": "x"},
    {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg"}]},
    {"files": [{"content_type": "image/jpeg", "file_size": 5}]},
    {"files": [{"file_name": "a.jpg", "file_size": 5}]},
    {"files": [{"content_type": "image/gif", "file_name": "a.gif", "file_size": 5}]},
    {"files": [{"content_type": "image/jpeg", "file_name": "", "file_size": 5}]},
    {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": 0}]},
    {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": -1}]},
    {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": True}]},
    {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": 5.0}]},
    {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": "5"}]},
    {"files": [{"content_type": "image/jpeg", "file_name": 3, "file_size": 5}]},
    {"files": ["a.jpg"]},
    {"files": [{"content_type": "image/jpeg", "file_name": f"{i}.jpg", "file_size": 5} for i in range(11)]},
])
def test_upload_slot_invalid(api, body):
    resp = api.post("/s2s/v2.0/file", data=b"" if body is None else json.dumps(body))
    assert resp.status_code == 400
    assert resp.json() == error_body(400, "Invalid parameter value", "InvalidParameters")


# ----------------------------------------------------------------------------------------------
# Storage PUT (§3.4) and GET
# ----------------------------------------------------------------------------------------------

def test_storage_put_rules(api):
    data = b"0123456789"
    slot = api.slot(len(data))
    put = slot["requests"][0]
    url, headers = put["url"], put["headers"]

    def check(resp, status, code):
        assert resp.status_code == status, resp.text
        assert resp.headers["Content-Type"] == XML and xml_code(resp) == code
        assert resp.text.startswith("<?xml") and "<Error>" in resp.text and "<Message>" in resp.text
        assert "x-request-id" not in resp.headers

    check(requests.put(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), data=data, headers=headers),
          403, "SignatureDoesNotMatch")
    check(requests.put(re.sub(r"/upload/[^/]+/", "/upload/unknownslot/", url), data=data, headers=headers),
          403, "SignatureDoesNotMatch")
    check(requests.put(url.replace("X-Amz-Date=", "X-Amz-Date=1"), data=data, headers=headers),
          403, "SignatureDoesNotMatch")
    check(requests.put(url, data=data, headers={**headers, "Authorization": f"Bearer {KEY}"}), 400, "InvalidArgument")
    check(requests.put(url, data=data, headers={**headers, "Content-Type": "image/png"}), 403, "SignatureDoesNotMatch")
    check(requests.put(url, data=data[:-1], headers={"Content-Type": "image/jpeg"}), 403, "SignatureDoesNotMatch")
    check(requests.put(url, data=data + b"!", headers={"Content-Type": "image/jpeg"}), 403, "SignatureDoesNotMatch")
    # Order: the signature is checked before the Authorization header and the content type.
    check(requests.put(url + "0", data=data, headers={"Authorization": "Bearer x", "Content-Type": "text/plain"}),
          403, "SignatureDoesNotMatch")
    ok = requests.put(url, data=data, headers=headers)
    assert ok.status_code == 200 and ok.content == b"" and ok.headers["ETag"].strip('"')
    assert "x-request-id" not in ok.headers


def test_put_twice_replaces_the_bytes(api):
    good = portrait_jpeg("astronaut", "sd")
    junk = b"x" * len(good)
    slot = api.slot(len(good))
    put = slot["requests"][0]
    assert requests.put(put["url"], data=junk, headers=put["headers"]).status_code == 200
    assert api.run(slot["file_id"], ["redness"])["error"] == "error_decode_image"
    assert requests.put(put["url"], data=good, headers=put["headers"]).status_code == 200
    assert api.run(slot["file_id"], ["redness"])["task_status"] == "success"


# ----------------------------------------------------------------------------------------------
# Create: validation order and texts (§4.4)
# ----------------------------------------------------------------------------------------------

FID = "sKu1/dDKFvwQ2i6r7fPZMV9m4e/1gNdC9CQTQPphsFMnVic/sUTUk+2w7IxDtFjQ"
IP = "InvalidParameters"

CREATE_ERRORS = [
    # (body, version, error, error_code)
    (b"", "v2.0", "Request body must be a JSON object", IP),
    (b"not json", "v2.0", "Request body must be a JSON object", IP),
    ([], "v2.0", "Request body must be a JSON object", IP),
    ("text", "v2.0", "Request body must be a JSON object", IP),
    (b'{"src_file_id": NaN}', "v2.0", "Request body must be a JSON object", IP),
    ({}, "v2.0", "src_file_id is required but wasn't included in your request", IP),
    ({"request_id": 0, "payload": {"file_sets": {"src_ids": [FID]}, "actions": [{"id": 0, "dst_actions": ["wrinkle"]}]}},
     "v2.0", "src_file_id is required but wasn't included in your request", IP),
    ({"dst_actions": ["wrinkle"], "format": "json"}, "v2.0", "src_file_id is required but wasn't included in your request", IP),
    ({"src_file_id": FID, "src_file_url": "https://a.test/x.jpg", "dst_actions": ["wrinkle"]}, "v2.0",
     "src_file_id and src_file_url cannot both be set", IP),
    ({"src_file_id": "", "dst_actions": ["wrinkle"]}, "v2.0", "src_file_id must be a non-empty string", IP),
    ({"src_file_id": 12, "dst_actions": ["wrinkle"]}, "v2.0", "src_file_id must be a non-empty string", IP),
    ({"src_file_id": None, "dst_actions": ["wrinkle"]}, "v2.0", "src_file_id must be a non-empty string", IP),
    ({"src_file_url": ["x"], "dst_actions": ["wrinkle"]}, "v2.0", "src_file_url must be a non-empty string", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle"], "foo": 1, "bar": 2}, "v2.0", "Unexpected request parameter foo", "BadRequest"),
    ({"src_file_id": FID, "bar": 1, "dst_actions": "not checked yet"}, "v2.0", "Unexpected request parameter bar", "BadRequest"),
    ({"src_file_id": FID, "dst_actions": ["hd_wrinkle"], "pf_camera_kit": True}, "v2.0",
     "Unexpected request parameter pf_camera_kit", "BadRequest"),
    ({"src_file_id": FID}, "v2.0", "dst_actions is required but wasn't included in your request", IP),
    ({"src_file_id": FID, "dst_actions": None}, "v2.0", "dst_actions is required but wasn't included in your request", IP),
    ({"src_file_id": FID, "dst_actions": "wrinkle"}, "v2.0", "dst_actions must be an array of strings", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle", 3]}, "v2.0", "dst_actions must be an array of strings", IP),
    ({"src_file_id": FID, "dst_actions": {"a": 1}}, "v2.0", "dst_actions must be an array of strings", IP),
    ({"src_file_id": FID, "dst_actions": []}, "v2.0", "dst_actions must not be empty", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_dark_circle_v2"]}, "v2.0", "Not available dst_action hd_dark_circle_v2", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle", "dark_circle", "nope"]}, "v2.0", "Not available dst_action dark_circle", IP),
    ({"src_file_id": FID, "dst_actions": ["Wrinkle"]}, "v2.0", "Not available dst_action Wrinkle", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_wrinkle", "pore"]}, "v2.0", "cannot mix HD and SD dst_actions", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle"], "format": "png"}, "v2.0", "Not available format png", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle"], "format": "ZIP"}, "v2.0", "Not available format ZIP", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle"], "miniserver_args": []}, "v2.0", "miniserver_args must be an object", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle"], "miniserver_args": "x"}, "v2.0", "miniserver_args must be an object", IP),
    ({"src_file_id": FID, "dst_actions": ["wrinkle"], "miniserver_args": {"enable_mask_overlay": "true"}}, "v2.0",
     "Invalid value for miniserver_args.enable_mask_overlay", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_pore"], "miniserver_args": {"enable_dark_background_hd_pore": 1}}, "v2.0",
     "Invalid value for miniserver_args.enable_dark_background_hd_pore", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_pore"], "miniserver_args": {"color_dark_background_hd_pore": "#3D3D3D"}},
     "v2.0", "Invalid value for miniserver_args.color_dark_background_hd_pore", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_pore"], "miniserver_args": {"color_dark_background_hd_pore": "GG0000"}},
     "v2.0", "Invalid value for miniserver_args.color_dark_background_hd_pore", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_acne"], "miniserver_args": {"opacity_dark_background_hd_acne": 1.5}},
     "v2.0", "Invalid value for miniserver_args.opacity_dark_background_hd_acne", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_acne"], "miniserver_args": {"opacity_dark_background_hd_acne": True}},
     "v2.0", "Invalid value for miniserver_args.opacity_dark_background_hd_acne", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_acne"], "miniserver_args": {"opacity_dark_background_hd_acne": "0.5"}},
     "v2.0", "Invalid value for miniserver_args.opacity_dark_background_hd_acne", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_wrinkle"], "pf_camera_kit": "yes"}, "v2.1", "pf_camera_kit must be a boolean", IP),
    ({"src_file_id": FID, "dst_actions": ["hd_wrinkle"], "pf_camera_kit": 1}, "v2.1", "pf_camera_kit must be a boolean", IP),
    # The first failing step decides: format (7) before miniserver_args (8) before pf_camera_kit (9).
    ({"src_file_id": FID, "dst_actions": ["hd_wrinkle"], "format": 1, "miniserver_args": [], "pf_camera_kit": 2},
     "v2.1", "Not available format 1", IP),
    ({"src_file_id": FID, "dst_actions": ["nope", "hd_wrinkle", "pore"]}, "v2.0", "Not available dst_action nope", IP),
]


@pytest.mark.parametrize("body,version,error,code", CREATE_ERRORS)
def test_create_validation(api, body, version, error, code):
    data = body if isinstance(body, bytes) else json.dumps(body)
    resp = api.post(f"/s2s/{version}/task/skin-analysis", data=data)
    assert resp.status_code == 400
    assert resp.json() == error_body(400, error, code)


def test_create_examples_match_contract_files(api):
    assert api.create({"src_file_id": FID, "dst_actions": ["hd_wrinkle", "pore"]}).json() == example("error-400-mix.json")
    assert api.create({"src_file_id": FID, "dst_actions": ["hd_dark_circle_v2"]}).json() == example(
        "error-400-unknown-action.json")


def test_create_accepts_contract_example_bodies(api):
    sd = example("create-task-request-sd.json")
    hd = example("create-task-request-hd.json")
    resp = api.create(sd, "v2.0")
    assert resp.status_code == 200
    for version in ("v2.0", "v2.1"):
        assert api.create(sd, version).status_code == 200
    assert api.create(hd, "v2.1").status_code == 200  # with pf_camera_kit and dark-background args
    body = resp.json()
    assert list(body) == ["status", "data"] and list(body["data"]) == ["task_id"]
    tid = body["data"]["task_id"]
    assert len(tid) == 107 and re.fullmatch(r"[A-Za-z0-9_-]+", tid)


def test_create_ignores_unknown_and_unrequested_miniserver_args(api):
    args = {"enable_mask_overlay": False, "unknown_key": "whatever",
            "opacity_dark_background_hd_pore": 7,            # hd_pore not requested: ignored
            "color_dark_background_hd_redness": "nothex",    # not requested: ignored
            "enable_dark_background_pore": "x"}               # SD: not a dark-background concern
    resp = api.create({"src_file_id": FID, "dst_actions": ["hd_wrinkle"], "miniserver_args": args})
    assert resp.status_code == 200
    resp = api.create({"src_file_id": FID, "dst_actions": ["hd_pore"], "pf_camera_kit": False,
                       "miniserver_args": {"opacity_dark_background_hd_pore": 0, "color_dark_background_hd_pore": "a0B1c2"}},
                      "v2.1")
    assert resp.status_code == 200


def test_auth_is_checked_before_the_body(api):
    resp = api.post("/s2s/v2.0/task/skin-analysis", data=b"garbage", headers={"Authorization": "Bearer <KEY>"})
    assert resp.status_code == 401


# ----------------------------------------------------------------------------------------------
# Poll envelopes (§5.2, §5.5)
# ----------------------------------------------------------------------------------------------

def test_poll_unknown_task_and_other_keys_task(api):
    resp = api.poll("v3JYvlWB2q3YHtlgSwxPB2ZG6MWbVc7")
    assert resp.status_code == 400 and resp.json() == example("error-400-invalid-task-id.json")
    tid = api.start(FID, ["wrinkle"])
    other = Api(api.base, key=api.key + "-other")
    assert other.poll(tid).json() == example("error-400-invalid-task-id.json")
    assert api.poll(tid).status_code == 200


def test_poll_running_envelope_exact():
    from skinlab.local import serve

    with serve(task_duration_s=600) as srv:
        api = Api(srv.url)
        tid = api.start(FID, ["wrinkle"])
        for version in ("v2.0", "v2.1"):   # either prefix answers
            resp = api.poll(tid, version)
            assert resp.status_code == 200
            assert resp.json() == example("poll-running.json")
            assert list(resp.json()["data"]) == ["error", "results", "task_status"]


# ----------------------------------------------------------------------------------------------
# Image checks (§5.4) and hooks (§5.6)
# ----------------------------------------------------------------------------------------------

def assert_task_error(data: dict, code: str, message: str | None):
    expected = {"error": code}
    if message is not None:
        expected["error_message"] = message
    expected.update(results=None, task_status="error")
    assert data == expected
    assert list(data) == list(expected)


def test_never_uploaded_file_is_unknown_internal_error(api):
    slot = api.slot(1000)
    assert_task_error(api.run(slot["file_id"], ["wrinkle"]), "unknown_internal_error", "Unknown internal error")
    assert_task_error(api.run(FID, ["wrinkle"]), "unknown_internal_error", "Unknown internal error")


def test_file_of_another_key_is_unknown_internal_error(api):
    fid = api.upload(portrait_jpeg("astronaut", "sd"))
    other = Api(api.base, key=api.key + "-2")
    assert other.run(fid, ["wrinkle"])["error"] == "unknown_internal_error"


def test_decode_error_on_text_and_gif(api):
    fid = api.upload(b"this is a text file, not an image\n" * 20, name="notes.jpg")
    assert_task_error(api.run(fid, ["wrinkle"]), "error_decode_image", "Decode source image error")
    buf = io.BytesIO()
    portrait("astronaut", "sd").save(buf, "GIF")
    fid = api.upload(buf.getvalue(), name="face.png", ctype="image/png")
    assert api.run(fid, ["wrinkle"])["error"] == "error_decode_image"


def test_file_size_limit_is_10_mib_exactly(api):
    over = api.upload(b"\0" * (10 * 1024 * 1024 + 1))
    assert_task_error(api.run(over, ["wrinkle"]), "exceed_max_filesize", "Input file size is too large")
    at_limit = api.upload(b"\0" * (10 * 1024 * 1024))
    assert api.run(at_limit, ["wrinkle"])["error"] == "error_decode_image"  # size passes, decoding fails


def test_below_min_image_size_per_tier(api):
    small = jpeg_bytes(portrait("astronaut", "sd").resize((359, 479), Image.LANCZOS))
    fid = api.upload(small)
    assert_task_error(api.run(fid, ["wrinkle"]), "error_below_min_image_size", "Input image resolution is too small")
    sd = api.upload(portrait_jpeg("astronaut", "sd"))  # 600x800: SD passes, HD needs a 1080 short side
    assert api.run(sd, ["hd_wrinkle"])["error"] == "error_below_min_image_size"
    assert api.run(sd, ["redness"])["task_status"] == "success"


def test_uncropped_portrait_face_too_small(api):
    fid = api.upload(jpeg_bytes(portrait("astronaut", "sd", crop=False).resize((1024, 1024), Image.LANCZOS)))
    assert api.run(fid, ["wrinkle"]) == example("poll-error-face-too-small.json")["data"]
    fid = api.upload(jpeg_bytes(portrait("grace_hopper", crop=False)))
    assert api.run(fid, ["wrinkle"])["error"] == "error_src_face_too_small"


def test_no_face_on_a_flat_image(api):
    fid = api.upload(jpeg_bytes(Image.new("RGB", (600, 800), (180, 150, 130))))
    assert_task_error(api.run(fid, ["wrinkle"]), "error_no_face", "No face detected on source image")


def test_exif_orientation_is_applied_before_the_checks(api):
    upright = portrait("astronaut", "sd")                    # 600x800
    stored = upright.transpose(Image.Transpose.ROTATE_90)    # 800x600, face on its side
    exif = Image.Exif()
    exif[0x0112] = 6                                         # "rotate 90 CW to display"
    fid = api.upload(jpeg_bytes(stored, exif=exif.tobytes()))
    data = api.run(fid, ["redness"])
    assert data["task_status"] == "success", data
    resized = [e for e in data["results"]["output"] if e["type"] == "resize_image"][0]
    assert open_image(storage_get(resized["mask_urls"][0]).content).size == (600, 800)


def test_png_source_is_accepted(api):
    fid = api.upload(png_bytes(portrait("astronaut", "sd")), name="face.png", ctype="image/png")
    data = api.run(fid, ["redness", "skin_type"])
    assert data["task_status"] == "success"
    assert len(data["results"]["output"]) == 1 + 3 + 3


def test_resize_to_2560_long_side(api):
    big = portrait("astronaut", "hd").resize((2000, 2667), Image.LANCZOS)
    fid = api.upload(jpeg_bytes(big, quality=85))
    data = api.run(fid, ["hd_redness"])
    assert data["task_status"] == "success", data
    urls = {e["type"]: e["mask_urls"][0] for e in data["results"]["output"] if "mask_urls" in e}
    expected = (round(2000 * 2560 / 2667), 2560)
    assert open_image(storage_get(urls["resize_image"]).content).size == expected
    assert open_image(storage_get(urls["hd_redness"]).content).size == expected


def test_hook_forces_engine_error_after_real_checks(api):
    good = portrait_jpeg("astronaut", "sd")
    fid = api.upload(good, name="selfie__error_src_face_too_small__.jpg")
    assert api.run(fid, ["wrinkle"]) == example("poll-error-face-too-small.json")["data"]
    fid = api.upload(good, name="a__error_pose__b__error_no_face__.jpg")    # first token wins; no message
    assert_task_error(api.run(fid, ["wrinkle"]), "error_pose", None)
    fid = api.upload(good, name="x__totally_new_code__.jpg")
    assert_task_error(api.run(fid, ["wrinkle"]), "totally_new_code", None)
    fid = api.upload(b"not an image", name="x__error_no_face__.jpg")           # a real check failure wins
    assert api.run(fid, ["wrinkle"])["error"] == "error_decode_image"
    fid = api.upload(good, name="x__Upper__.jpg")                              # not a token: normal outcome
    assert api.run(fid, ["wrinkle"])["task_status"] == "success"


def test_hook_poll500(api):
    fid = api.upload(portrait_jpeg("astronaut", "sd"), name="face__poll500__.jpg")
    tid = api.start(fid, ["wrinkle"])
    for _ in range(2):
        resp = api.poll(tid)
        assert resp.status_code == 500
        assert resp.json() == error_body(500, "Task execution timed out", "TaskTimeout")
    assert api.wait(tid)["task_status"] == "success"


def test_hook_poll500_yields_to_a_real_failure_of_checks_1_to_5(api):
    """§5.6: a real failure of checks 1 to 5 takes precedence over the hook: no 500 at all (every
    poll of ``wait`` must be a 200), the check's code straight away. Checks 6 to 11 do not."""
    fid = api.upload(b"not an image", name="x__poll500__.jpg")                          # check 3
    assert_task_error(api.run(fid, ["wrinkle"]), "error_decode_image", "Decode source image error")
    never_put = api.slot(100, name="never__poll500__.jpg")["file_id"]                   # check 1
    assert api.run(never_put, ["wrinkle"])["error"] == "unknown_internal_error"
    assert api.run("http://127.0.0.1:9/img__poll500__.jpg", ["wrinkle"])["error"] == "error_download_image"  # 1'
    fid = api.upload(b"\xff\xd8" + b"x" * (10 * 1024 * 1024), name="big__poll500__.jpg")  # check 2
    assert api.run(fid, ["wrinkle"])["error"] == "exceed_max_filesize"
    fid = api.upload(jpeg_bytes(Image.new("RGB", (300, 400), (180, 150, 130))), name="s__poll500__.jpg")  # 4
    assert api.run(fid, ["wrinkle"])["error"] == "error_below_min_image_size"
    # No face is check 6: the hook still answers its two 500s first.
    fid = api.upload(jpeg_bytes(Image.new("RGB", (600, 800), (180, 150, 130))), name="flat__poll500__.jpg")
    tid = api.start(fid, ["wrinkle"])
    assert [api.poll(tid).status_code for _ in range(2)] == [500, 500]
    assert api.wait(tid)["error"] == "error_no_face"


def test_hook_poll500_runs_the_checks_itself_when_the_worker_has_not_yet():
    """The first poll may come before the worker has looked at the image; it must not answer 500
    for an image that checks 1 to 5 will refuse. The poll runs those checks; the worker reuses them."""
    import threading

    from skinlab.local import serve

    with serve(task_duration_s=0, rate_limit=None) as srv:
        api = Api(srv.url, "poll500-before-the-worker")
        release = threading.Event()
        real_run = srv.app._run

        def held_run(task):
            release.wait(30)
            real_run(task)

        srv.app._run = held_run                                  # the worker is busy elsewhere
        bad = api.start(api.upload(b"not an image", name="x__poll500__.jpg"), ["wrinkle"])
        flat = jpeg_bytes(Image.new("RGB", (600, 800), (180, 150, 130)))
        good = api.start(api.upload(flat, name="y__poll500__.jpg"), ["wrinkle"])
        resp = api.poll(bad)
        assert resp.status_code == 200 and resp.json()["data"]["task_status"] == "running"
        assert srv.app.task(bad).check_error == "error_decode_image"
        assert api.poll(good).status_code == 500                 # checks 1 to 5 pass: the hook fires
        release.set()
        assert api.wait(bad)["error"] == "error_decode_image"
        assert api.poll(good).status_code == 500
        assert api.wait(good)["error"] == "error_no_face"
        assert srv.app.counters["decode"] == 2                   # once per image: by the poll, not again


def test_url_source_download_errors_and_hook(api):
    for url in ("ftp://127.0.0.1/face.jpg", "http://127.0.0.1:9/face.jpg", api.base + "/_storage/results/x/y.jpg"):
        assert_task_error(api.run(url, ["wrinkle"]), "error_download_image", "Download source image error")
    assert api.run("http://127.0.0.1:9/dir/img__error_lighting_dark__.jpg", ["wrinkle"])["error"] == "error_download_image"


@pytest.fixture(scope="module")
def static_site():
    """A plain HTTP server answering every GET with the SD portrait (for src_file_url)."""
    with StaticSite(portrait_jpeg("astronaut", "sd")) as url:
        yield url


def test_url_source_success_and_hook(api, static_site):
    ok = api.run(static_site + "/photos/face.jpg?size=large", ["redness"])
    assert ok["task_status"] == "success"
    # The hook token is read from the URL's last path segment.
    assert_task_error(api.run(static_site + "/photos/x__error_lighting_dark__.jpg", ["redness"]),
                      "error_lighting_dark", "The lighting in the uploaded image is too dark")
    assert api.run(static_site + "/a__poll500__/face.jpg", ["redness"])["task_status"] == "success"


# ----------------------------------------------------------------------------------------------
# Results: format=json (§6) and format=zip (§7) on real portraits
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(local_server):
    """Full 16-concern tasks on the cropped portraits, both tiers, both formats (run once)."""
    api = Api(local_server.url, key="results-module")
    sd = api.upload(portrait_jpeg("astronaut", "sd"))
    hd = api.upload(portrait_jpeg("astronaut", "hd"))
    out = {}
    for tier, fid, names in (("sd", sd, SD_ACTIONS), ("hd", hd, HD_ACTIONS)):
        for fmt in ("json", "zip"):
            out[tier, fmt] = api.run(fid, names, fmt)
    out["api"] = api
    out["files"] = {"sd": sd, "hd": hd}
    return out


def scored(name: str) -> bool:
    return CATALOGUE[name].scored


@pytest.mark.parametrize("tier,count", [("sd", 21), ("hd", 30)])
def test_json_output_shapes(runs, tier, count):
    data = runs[tier, "json"]
    assert list(data) == ["error", "results", "task_status"] and data["error"] is None
    assert list(data["results"]) == ["output"]
    output = data["results"]["output"]
    assert len(output) == count
    for e in output:
        assert e["url"] is None and list(e)[-1] == "url"
        t = e["type"]
        if t == "all":
            assert list(e) == ["type", "score", "url"] and isinstance(e["score"], (int, float))
        elif t == "skin_age":
            assert list(e) == ["type", "score", "url"] and type(e["score"]) is int
        elif t == "resize_image":
            assert list(e) == ["type", "mask_urls", "url"] and len(e["mask_urls"]) == 1
        elif not scored(t):
            assert list(e) == ["type", "region", "skin_type", "mask_urls", "url"]
            assert e["region"] in ("whole", "t_zone", "u_zone")
            from skinlab.actions import SKIN_TYPES
            assert e["skin_type"] in SKIN_TYPES
        else:
            keys = ["type", "region", "raw_score", "ui_score", "mask_urls", "url"]
            if tier == "sd":
                keys.remove("region")
            assert list(e) == keys
            assert 1 <= e["raw_score"] <= 100 and type(e["ui_score"]) is int and 1 <= e["ui_score"] <= 99
            # whole numbers are integers, everything else a float
            assert isinstance(e["raw_score"], int) or not float(e["raw_score"]).is_integer()
        if "mask_urls" in e:
            assert len(e["mask_urls"]) == 1 and e["mask_urls"][0].startswith("http")
    # tail order, skin type just before it
    types = [e["type"] for e in output]
    assert types[-3:] == ["all", "skin_age", "resize_image"]
    st = "hd_skin_type" if tier == "hd" else "skin_type"
    assert types[-6:-3] == [st] * 3 and [e["region"] for e in output[-6:-3]] == ["whole", "t_zone", "u_zone"]


def test_json_regions_and_mask_names(runs):
    for tier in ("sd", "hd"):
        output = runs[tier, "json"]["results"]["output"]
        pairs = {(e["type"], e.get("region", "whole")): e for e in output if "mask_urls" in e and e["type"] != "resize_image"}
        names = HD_ACTIONS if tier == "hd" else SD_ACTIONS
        expected = {(n, r) for n in names for r in CATALOGUE[n].regions}
        assert set(pairs) == expected
        for (name, region), e in pairs.items():
            path = e["mask_urls"][0].split("?")[0]
            assert path.endswith("/" + CATALOGUE[name].mask_file(region))
    hd = runs["hd", "json"]["results"]["output"]
    assert sum(e["type"] == "hd_wrinkle" for e in hd) == 7 and sum(e["type"] == "hd_pore" for e in hd) == 4
    wrinkle_regions = [e["region"] for e in hd if e["type"] == "hd_wrinkle"]
    assert wrinkle_regions[-1] == "whole"


def test_json_order_is_not_request_order_and_all_is_mean_of_ui(runs):
    for tier, names in (("sd", SD_ACTIONS), ("hd", HD_ACTIONS)):
        output = runs[tier, "json"]["results"]["output"]
        seen = list(dict.fromkeys(e["type"] for e in output if e["type"] in names and scored(e["type"])))
        assert sorted(seen) == sorted(n for n in names if scored(n))
        assert seen != [n for n in names if scored(n)]
        whole_ui = [e["ui_score"] for e in output if e["type"] in names and scored(e["type"]) and e.get("region", "whole") == "whole"]
        assert len(whole_ui) == 15
        overall = [e for e in output if e["type"] == "all"][0]["score"]
        assert overall == pytest.approx(statistics.fmean(whole_ui), abs=1e-9)
        age = [e for e in output if e["type"] == "skin_age"][0]["score"]
        assert 10 <= age <= 90


def test_json_scores_are_deterministic_and_engine_cached(runs, local_server):
    api = runs["api"]
    before = local_server.app.counters["analyze"]
    again = api.run(runs["files"]["sd"], list(reversed(SD_ACTIONS)), "json")
    assert local_server.app.counters["analyze"] == before       # same bytes: no second analysis
    key = lambda out: {(e["type"], e.get("region")): e.get("raw_score", e.get("score", e.get("skin_type"))) for e in out}
    assert key(again["results"]["output"]) == key(runs["sd", "json"]["results"]["output"])


@pytest.mark.parametrize("tier", ["sd", "hd"])
def test_json_masks_are_rgba_pngs_at_resize_size(runs, tier):
    output = runs[tier, "json"]["results"]["output"]
    resize = storage_get([e for e in output if e["type"] == "resize_image"][0]["mask_urls"][0])
    assert resize.status_code == 200 and resize.headers["Content-Type"] == "binary/octet-stream"
    image = open_image(resize.content)
    assert image.format == "JPEG"
    assert image.size == ((600, 800) if tier == "sd" else (1080, 1440))
    nonempty = 0
    for e in output:
        if "mask_urls" not in e or e["type"] == "resize_image":
            continue
        resp = storage_get(e["mask_urls"][0])
        assert resp.status_code == 200 and resp.headers["Content-Type"] == "binary/octet-stream"
        assert "x-request-id" not in resp.headers
        mask = open_image(resp.content)
        assert mask.format == "PNG" and mask.mode == "RGBA" and mask.size == image.size
        nonempty += mask.getchannel("A").getextrema()[1] > 0
    assert nonempty >= 10  # most concerns detect something on a real face


def test_json_fresh_urls_and_storage_signature(runs):
    api = runs["api"]
    output = runs["sd", "json"]["results"]["output"]
    url = output[0]["mask_urls"][0]
    assert "X-Amz-Expires=7200" in url and "X-Amz-SignedHeaders=host" in url
    bad = storage_get(url.replace("X-Amz-Signature=", "X-Amz-Signature=f"))
    assert bad.status_code == 403 and xml_code(bad) == "SignatureDoesNotMatch"
    assert bad.headers["Content-Type"] == XML
    auth = storage_get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert auth.status_code == 400 and xml_code(auth) == "InvalidArgument"
    missing = storage_get(re.sub(r"/results/[^/]+/", "/results/nope/", url))
    assert missing.status_code == 403  # the path is covered by the signature
    assert requests.head(url).status_code == 200


@pytest.mark.parametrize("tier,masks", [("sd", 18), ("hd", 27)])
def test_zip_physical_format(runs, tier, masks):
    data = runs[tier, "zip"]
    assert data["error"] is None and data["task_status"] == "success"
    assert list(data["results"]) == ["url"]
    url = data["results"]["url"]
    assert re.search(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.zip\?", url)
    resp = storage_get(url)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "binary/octet-stream"
    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    infos = zf.infolist()
    assert len(infos) == masks + 2 and zf.comment == b""
    assert all(not i.is_dir() and i.compress_type == zipfile.ZIP_STORED and i.create_system == 3 for i in infos)
    names = [i.filename for i in infos]
    assert all(n.startswith("skinanalysisResult/") and n.count("/") == 1 for n in names)
    assert names[0] == "skinanalysisResult/score_info.json" and names[-1] == "skinanalysisResult/resize_image.jpg"
    raw = zf.read(names[0])
    info = json.loads(raw)
    assert raw.decode("utf-8") == json.dumps(info, indent=2, ensure_ascii=False)  # indent 2, no trailing newline
    actions = HD_ACTIONS if tier == "hd" else SD_ACTIONS
    assert list(info)[-3:] == ["all", "skin_age", "resize_image"] and set(list(info)[:-3]) == set(actions)
    assert info["resize_image"] == {"image_name": "resize_image.jpg"} and type(info["skin_age"]) is int
    size = open_image(zf.read(names[-1])).size
    mask_names = set()
    for name in actions:
        value = info[name]
        action = CATALOGUE[name]
        if not action.scored:
            assert list(value) == ["whole", "t_zone", "u_zone"]
            assert all(set(v) == {"skin_type", "output_mask_name"} for v in value.values())
            regions = value
        elif tier == "hd" and (len(action.regions) > 1 or name in ("hd_acne", "hd_texture")):
            assert set(value) == set(action.regions) and list(value)[-1] == "whole"
            regions = value
        else:
            assert list(value) == ["raw_score", "ui_score", "output_mask_name"]
            regions = {"whole": value}
        for region, item in regions.items():
            assert item["output_mask_name"] == action.mask_file(region)
            mask_names.add(item["output_mask_name"])
            if "raw_score" in item:
                assert type(item["raw_score"]) is float and type(item["ui_score"]) is int
    assert {n.split("/")[1] for n in names[1:-1]} == mask_names and len(mask_names) == masks
    for n in names[1:-1]:
        mask = open_image(zf.read(n))
        assert mask.mode == "RGBA" and mask.size == size
    whole_ui = [(v.get("whole", v))["ui_score"] for k, v in info.items() if k in actions and CATALOGUE[k].scored]
    assert info["all"]["score"] == pytest.approx(statistics.fmean(whole_ui)) and type(info["all"]["score"]) is float


def test_zip_and_json_agree(runs):
    json_out = runs["hd", "json"]["results"]["output"]
    info = json.loads(zipfile.ZipFile(io.BytesIO(storage_get(runs["hd", "zip"]["results"]["url"]).content))
                      .read("skinanalysisResult/score_info.json"))
    for e in json_out:
        if "raw_score" in e:
            value = info[e["type"]]
            item = value[e["region"]] if e["region"] in value else value
            assert item["raw_score"] == e["raw_score"] and item["ui_score"] == e["ui_score"]


def test_duplicates_are_dropped(api):
    fid = api.upload(portrait_jpeg("astronaut", "sd"))
    data = api.run(fid, ["redness", "redness", "acne", "redness"])
    types = [e["type"] for e in data["results"]["output"]]
    assert sorted(types) == ["acne", "all", "redness", "resize_image", "skin_age"]


def test_skin_type_only_has_no_all(api):
    fid = api.upload(portrait_jpeg("astronaut", "sd"))
    types = [e["type"] for e in api.run(fid, ["skin_type"])["results"]["output"]]
    assert types == ["skin_type"] * 3 + ["skin_age", "resize_image"]


def test_overlay_masks_are_jpegs(api):
    fid = api.upload(portrait_jpeg("astronaut", "sd"))
    data = api.run(fid, ["redness", "skin_type"], "zip", miniserver_args={"enable_mask_overlay": True})
    zf = zipfile.ZipFile(io.BytesIO(storage_get(data["results"]["url"]).content))
    names = [n.split("/")[1] for n in zf.namelist()]
    assert sorted(names) == sorted(["score_info.json", "redness_output.jpg", "skin_type_output.jpg",
                                    "skin_type_t_zone_output.jpg", "skin_type_u_zone_output.jpg", "resize_image.jpg"])
    info = json.loads(zf.read("skinanalysisResult/score_info.json"))
    assert info["redness"]["output_mask_name"] == "redness_output.jpg"
    mask = open_image(zf.read("skinanalysisResult/redness_output.jpg"))
    assert mask.format == "JPEG" and mask.mode == "RGB" and mask.size == (600, 800)
    data = api.run(fid, ["redness"], "json", miniserver_args={"enable_mask_overlay": True})
    url = data["results"]["output"][0]["mask_urls"][0]
    assert url.split("?")[0].endswith("/redness_output.jpg") and open_image(storage_get(url).content).format == "JPEG"


def test_dark_background(runs):
    api = runs["api"]
    args = {"enable_dark_background_hd_pore": True, "color_dark_background_hd_pore": "2B2B2B",
            "opacity_dark_background_hd_pore": 0.35, "enable_dark_background_hd_acne": True}
    data = api.run(runs["files"]["hd"], ["hd_pore", "hd_acne", "hd_redness"], "json", miniserver_args=args)
    urls = {(e["type"], e.get("region")): e["mask_urls"][0] for e in data["results"]["output"] if "mask_urls" in e}
    corner = lambda key: open_image(storage_get(urls[key]).content).getpixel((2, 2))
    assert corner(("hd_pore", "whole")) == (0x2B, 0x2B, 0x2B, round(255 * 0.35))
    assert corner(("hd_pore", "nose")) == (0x2B, 0x2B, 0x2B, round(255 * 0.35))
    assert corner(("hd_acne", "whole")) == (0x3D, 0x3D, 0x3D, round(255 * 0.4))   # the defaults
    assert corner(("hd_redness", "whole"))[3] == 0                                  # not enabled


# ----------------------------------------------------------------------------------------------
# LocalServer API
# ----------------------------------------------------------------------------------------------

def test_local_server_lifecycle_and_bind_rules():
    from skinlab.errors import ConfigurationError
    from skinlab.local import LocalServer, serve

    with pytest.raises(ConfigurationError):
        LocalServer(host="0.0.0.0")
    srv = LocalServer(task_duration_s=0, public_base_url="http://emulator.test:1234/")
    with srv:
        assert re.fullmatch(r"http://emulator\.test:1234", srv.url)
        slot = requests.post(f"http://127.0.0.1:{srv.port}/s2s/v2.0/file", headers={"Authorization": "Bearer k"},
                             json={"files": [{"content_type": "image/png", "file_name": "a.png", "file_size": 1}]}).json()
        assert slot["data"]["files"][0]["requests"][0]["url"].startswith("http://emulator.test:1234/_storage/upload/")
    with serve(task_duration_s=0) as srv:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", srv.url)
        port = srv.port
        assert requests.get(srv.url + "/s2s/v1.0/client/credit", headers={"Authorization": "Bearer k"}).ok
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_app_is_plain_wsgi_and_builds_urls_from_the_host_header():
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from skinlab.local import SkinlabApp

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    app = SkinlabApp(task_duration_s=0)
    httpd = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        api = Api(base, "wsgi")
        slot = api.slot(3)
        assert slot["requests"][0]["url"].startswith(base + "/_storage/upload/")
        assert requests.put(slot["requests"][0]["url"], data=b"abc", headers=slot["requests"][0]["headers"]).ok
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.close()


def test_emulator_fetches_loopback_urls_without_the_environment_proxy(local_server, static_site, monkeypatch):
    """http_proxy pointing at a dead port (a university network's setting) must not stop the
    emulator fetching a src_file_url on this machine; other hosts would still use the proxy."""
    from skinlab.local import server as srv

    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    body = local_server.app._download(static_site + "/photos/face.jpg")
    assert body is not None and body[:2] == b"\xff\xd8"
    # a non-loopback host goes to the (dead) proxy and fails like any unreachable source
    request = srv.urllib.request.Request("http://photos.example.invalid/face.jpg")
    with pytest.raises(srv.urllib.error.URLError, match="Connection refused"):
        srv._urlopen(request, timeout=5)


def test_a_task_cut_off_by_shutdown_is_not_logged_as_an_engine_failure(caplog, monkeypatch):
    """After Ctrl-C the engine's thread pools refuse new work ("cannot schedule new futures after
    shutdown"): no traceback for that, while a real engine failure still gets one."""
    import logging

    from skinlab.local import LocalServer

    photo = portrait_jpeg("astronaut", "sd")

    def run(exc):
        server = LocalServer(task_duration_s=0.0, rate_limit=None)

        def boom(task):
            raise exc
        monkeypatch.setattr(server.app, "_execute", boom)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="skinlab.local"):
            server.start()
            try:
                api = requests.Session()
                slot = api.post(server.url + "/s2s/v2.0/file/skin-analysis", headers={"Authorization": f"Bearer {KEY}"},
                                json={"files": [{"content_type": "image/jpeg", "file_name": "a.jpg",
                                                 "file_size": len(photo)}]}).json()["data"]["files"][0]
                put = slot["requests"][0]
                api.put(put["url"], data=photo, headers=put["headers"])
                created = api.post(server.url + "/s2s/v2.0/task/skin-analysis", headers={"Authorization": f"Bearer {KEY}"},
                                   json={"src_file_id": slot["file_id"], "dst_actions": ["redness"]}).json()
                task_id = created["data"]["task_id"]
                for _ in range(100):
                    body = api.get(server.url + f"/s2s/v2.0/task/skin-analysis/{task_id}",
                                   headers={"Authorization": f"Bearer {KEY}"}).json()
                    if body["data"]["task_status"] != "running":
                        break
                    time.sleep(0.02)
            finally:
                server.stop()
        return body, [r for r in caplog.records if r.exc_info]

    body, tracebacks = run(RuntimeError("cannot schedule new futures after shutdown"))
    assert body["data"]["task_status"] == "error" and tracebacks == []
    body, tracebacks = run(ValueError("a real bug"))
    assert body["data"]["task_status"] == "error" and len(tracebacks) == 1
