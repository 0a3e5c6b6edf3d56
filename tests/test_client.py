"""The client against scripted loopback servers: every quirk of contract §9.2 and both retry policies."""

import io
import json
import re
import socket
import time
import zipfile

import pytest
from PIL import Image

import skinlab
from contract import EXAMPLES, example
from fakes import ScriptedServer
from skinlab import errors
from skinlab.client import Client, PollSchedule, RateLimiter, RetryPolicy, normalise_key

KEY = "sk-" + "test-1234567890abcdefSECRET"  # fake; split so that secret scanners do not flag the test files
TASK = "v3JYvlWB2q3YHtlgSwxPB2ZG6MWbVc7-0rc2WoYOaq6E-d_6RY-_UoBzFrvE0owS700tbFAbgmA5H0PXmbNl4wvAYL1n8Z0v05rf-_Ph-Sl"
FAST = RetryPolicy(base=0.0, sleep=lambda s: None)
QUICK = PollSchedule(first=0.0, factor=1.0, cap=0.01, minimum=0.0)
CREATE = "/s2s/v2.0/task/skin-analysis"
POLL = f"/s2s/v2.0/task/skin-analysis/{TASK}"


@pytest.fixture
def srv():
    with ScriptedServer() as s:
        yield s


def client_for(srv, **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("poll_schedule", QUICK)
    kw.setdefault("rate_limiter", False)
    return Client(KEY, base_url=srv.url, **kw)


def _jpeg(w=600, h=800):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (190, 150, 130)).save(buf, "JPEG")
    return buf.getvalue()


def _slot(srv, headers=None):
    return {"status": 200, "data": {"files": [{
        "content_type": "image/jpeg", "file_name": "x.jpg", "file_id": "sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ=",
        "requests": [{"method": "PUT", "url": f"{srv.url}/_storage/upload/abc.jpg?X-Amz-Expires=7200",
                      "headers": headers}]}]}}


def _ok_task():
    return (200, {"status": 200, "data": {"task_id": TASK}})


def _success_json():
    return (200, example("poll-success-json-sd.json"))


# ---------------------------------------------------------------- keys and configuration

@pytest.mark.parametrize("raw", [KEY, f"  {KEY}\n", f'"{KEY}"', f"<{KEY}>", f"Bearer {KEY}", f"'Bearer <{KEY}>'"])
def test_key_normalised(raw):
    assert normalise_key(raw) == KEY


def test_no_key_no_base_url_explains_both_ways(monkeypatch):
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    with pytest.raises(errors.ConfigurationError) as info:
        Client()
    msg = str(info.value)
    assert "SKINLAB_API_KEY" in msg and "YOUCAM_API_KEY" in msg and "Client.local()" in msg


def test_key_from_environment_order(monkeypatch, srv):
    monkeypatch.setenv("YOUCAM_API_KEY", "second-key-xyz")
    monkeypatch.setenv("SKINLAB_API_KEY", "first-key-abc")
    srv.route("GET", "/s2s/v1.0/client/credit", (200, example("credit-response.json")))
    Client(base_url=srv.url, rate_limiter=False).credits()
    assert srv.requests[-1]["headers"]["Authorization"] == "Bearer first-key-abc"
    monkeypatch.delenv("SKINLAB_API_KEY")
    Client(base_url=srv.url, rate_limiter=False).credits()
    assert srv.requests[-1]["headers"]["Authorization"] == "Bearer second-key-xyz"


def test_plain_http_to_remote_host_refused():
    with pytest.raises(errors.ConfigurationError, match="plain http"):
        Client(KEY, base_url="http://example.invalid")
    with pytest.raises(errors.ConfigurationError, match="https"):
        Client(KEY, base_url="ftp://example.invalid")
    with pytest.raises(errors.ConfigurationError, match="api_version"):
        Client(KEY, base_url="https://example.invalid", api_version="v3")


def test_key_never_in_repr_or_errors(srv):
    srv.route("POST", CREATE, (401, {"status": 401, "error": f"bad key Bearer {KEY}"}))
    c = client_for(srv)
    assert KEY not in repr(c) and "***" in repr(c)
    with pytest.raises(errors.AuthenticationError) as info:
        c.submit("sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ=", ["pore"])
    assert KEY not in str(info.value) and KEY not in repr(info.value)


# ---------------------------------------------------------------- upload

@pytest.mark.parametrize("headers", [
    {"Content-Length": "LEN", "Content-Type": "image/jpeg"},
    {"Content-Length": "NUM", "Content-Type": "image/jpeg"},
    [{"key": "Content-Type", "value": "image/jpeg"}, {"key": "Content-Length", "value": "LEN"}],
])
def test_upload_put_uses_exact_headers_without_auth(srv, headers):
    data = _jpeg()
    n = len(data)

    def fill(v):
        return n if v == "NUM" else str(n) if v == "LEN" else v

    if isinstance(headers, dict):
        headers = {k: fill(v) for k, v in headers.items()}
    else:
        headers = [{"key": h["key"], "value": fill(h["value"])} for h in headers]
    srv.route("POST", "/s2s/v2.0/file", (200, _slot(srv, headers)))
    srv.route("PUT", "/_storage/upload/abc.jpg", (200, b"", {"ETag": '"x"'}))
    file_id = client_for(srv).upload(data)
    assert file_id == "sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ="
    slot_req = json.loads(srv.calls("POST", "/s2s/v2.0/file")[0]["body"])
    item = slot_req["files"][0]
    assert item["content_type"] == "image/jpeg" and item["file_size"] == n
    assert item["file_name"].endswith(".jpg") and len(item["file_name"]) == 20  # neutral name, no personal data
    put = srv.calls("PUT")[0]
    assert put["body"] == data
    assert "Authorization" not in put["headers"]
    assert put["headers"]["Content-Type"] == "image/jpeg" and put["headers"]["Content-Length"] == str(n)


def test_failed_put_creates_no_task(srv):
    srv.route("POST", "/s2s/v2.0/file", (200, _slot(srv, {"Content-Type": "image/jpeg"})))
    srv.route("PUT", "/_storage/upload/abc.jpg",
              (403, "<Error><Code>SignatureDoesNotMatch</Code></Error>", {"Content-Type": "application/xml"}))
    with pytest.raises(errors.UploadError, match="SignatureDoesNotMatch.*no task was created"):
        client_for(srv).submit(_jpeg(), ["pore"])
    assert srv.calls("POST", CREATE) == []


def test_bad_input_fails_before_any_request(srv):
    c = client_for(srv)
    with pytest.raises(errors.InvalidParametersError):
        c.submit(_jpeg(), ["pore", "hd_pore"])
    with pytest.raises(errors.InvalidParametersError):
        c.submit(_jpeg(), ["pore"], format="xml")
    with pytest.raises(errors.InvalidParametersError, match="Did you mean"):
        c.submit(_jpeg(), ["pore"], miniserver_args={"enable_mask_overlayy": True})
    with pytest.raises(errors.ImageError):
        c.submit(b"GIF89a....", ["pore"])
    with pytest.raises(errors.InvalidParametersError, match="http"):
        c.submit("ftp://example.invalid/x.jpg", ["pore"])
    with pytest.raises(errors.InvalidParametersError, match="v2.1"):
        c.submit("https://example.invalid/x.jpg", ["pore"], pf_camera_kit=True)
    assert srv.requests == []


# ---------------------------------------------------------------- create: the retry policy

def test_url_and_file_id_sources(srv):
    srv.route("POST", CREATE, _ok_task())
    c = client_for(srv)
    c.submit("https://example.invalid/face.jpg", ["pore"], format="json")
    c.submit("sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ=", ["hd_pore"], mask_overlay=True)
    b1, b2 = (json.loads(r["body"]) for r in srv.calls("POST", CREATE))
    assert b1 == {"src_file_url": "https://example.invalid/face.jpg", "dst_actions": ["pore"], "format": "json"}
    assert b2["src_file_id"] == "sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ=" and b2["format"] == "zip"
    assert b2["miniserver_args"] == {"enable_mask_overlay": True}


def test_create_retries_429_then_succeeds(srv):
    srv.route("POST", CREATE, (429, example("error-429.json")), (429, example("error-429.json")), _ok_task())
    task = client_for(srv).submit("https://example.invalid/f.jpg", ["pore"])
    assert task.task_id == TASK and len(srv.calls("POST", CREATE)) == 3


def test_create_429_gives_up_after_five_retries(srv):
    srv.route("POST", CREATE, (429, example("error-429.json")))
    with pytest.raises(errors.RateLimitError) as info:
        client_for(srv).submit("https://example.invalid/f.jpg", ["pore"])
    assert info.value.retry_safe and len(srv.calls("POST", CREATE)) == 6


@pytest.mark.parametrize("resp", [(500, {"status": 500, "error": "Internal"}), (502, "<html>bad gateway</html>"),
                                  "drop"])
def test_create_never_resent_when_fate_unknown(srv, resp):
    srv.route("POST", CREATE, resp, _ok_task())
    with pytest.raises(errors.TaskFateUnknownError, match="may exist") as info:
        client_for(srv).submit("https://example.invalid/f.jpg", ["pore"])
    assert not info.value.retry_safe
    assert len(srv.calls("POST", CREATE)) == 1


def test_create_retried_when_connection_never_established():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed port: connection refused, no byte sent
    sleeps = []
    c = Client(KEY, base_url=f"http://127.0.0.1:{port}", rate_limiter=False,
               retry=RetryPolicy(base=0.0, sleep=sleeps.append))
    with pytest.raises(errors.SkinlabConnectionError, match="cannot reach"):
        c.submit("https://example.invalid/f.jpg", ["pore"])
    assert len(sleeps) == 3


@pytest.mark.parametrize("body, exc", [
    ({"status": 400, "error": "Not available dst_action hd_x", "error_code": "InvalidParameters"},
     errors.InvalidParametersError),
    ({"status": 400, "error": "0 is not one of the accepted values."}, errors.InvalidParametersError),
    ({"status": 400, "error": "Unexpected request parameter foo", "error_code": "BadRequest"},
     errors.InvalidParametersError),
    ({"status": 400, "error": "Insufficient units", "error_code": "CreditInsufficiency"},
     errors.InsufficientCreditsError),
])
def test_create_400s_classified_by_code(srv, body, exc):
    srv.route("POST", CREATE, (400, body))
    with pytest.raises(exc) as info:
        client_for(srv).submit("https://example.invalid/f.jpg", ["pore"])
    assert info.value.status == 400 and info.value.request_id == "512340987612345678"


@pytest.mark.parametrize("body", [
    {"status": 401, "error": "Invalid API key"},
    {"status": 401, "error": "This API key is not recognized.", "error_code": "InvalidApiKey"},
    {"status": 401, "error": "Unauthorized", "error_code": "InvalidAccessToken"},
    {"status": 401},
])
def test_three_401_variants(srv, body):
    srv.route("POST", CREATE, (401, body))
    with pytest.raises(errors.AuthenticationError, match="SKINLAB_API_KEY"):
        client_for(srv).submit("https://example.invalid/f.jpg", ["pore"])


# ---------------------------------------------------------------- poll

def _task(srv, **kw):
    return client_for(srv, **kw).task(TASK)


def test_poll_running_then_success_json(srv):
    srv.route("GET", POLL, (200, example("poll-running.json")), (200, example("poll-running.json")),
              _success_json())
    r = _task(srv).wait(timeout=10)
    assert len(srv.calls("GET", POLL)) == 3
    assert r.format == "json" and len(r.scores) == 18 and r.backend == "cloud"


def test_poll_500_timeout_retried(srv):
    body = {"status": 500, "error": "Task execution timed out", "error_code": "TaskTimeout"}
    srv.route("GET", POLL, (500, body), (500, body), _success_json())
    assert _task(srv).wait(timeout=10).task_id == TASK


@pytest.mark.parametrize("body", [
    {"status": 400, "error": "Invalid task ID", "error_code": "InvalidTaskId"},
    {"status": 400, "error": "Invalid task ID"},
    {"status": 400, "error": "Invalid Task Id", "error_code": "InvalidTaskId"},
])
def test_invalid_task_id_variants_not_retried(srv, body):
    srv.route("GET", POLL, (400, body))
    with pytest.raises(errors.InvalidTaskIdError):
        _task(srv).status()
    assert len(srv.calls("GET", POLL)) == 1


@pytest.mark.parametrize("code, cls", [("error_src_face_too_small", errors.FaceTooSmallError),
                                       ("error_no_face", errors.NoFaceError),
                                       ("error_lighting_dark", errors.LightingDarkError),
                                       ("error_brand_new_code", errors.TaskError)])
def test_engine_errors_map_to_classes(srv, code, cls):
    data = {"error": code, "results": None, "task_status": "error"}  # error_message missing
    srv.route("GET", POLL, (200, {"status": 200, "data": data}))
    with pytest.raises(cls) as info:
        _task(srv).wait(timeout=5)
    assert type(info.value) is cls and info.value.code == code and info.value.task_id == TASK


def test_error_message_kept(srv):
    srv.route("GET", POLL, (200, example("poll-error-face-too-small.json")))
    with pytest.raises(errors.FaceTooSmallError, match="too small.*60-80%"):
        _task(srv).wait(timeout=5)


def test_wait_deadline_keeps_task_id_and_stops_polling(srv):
    srv.route("GET", POLL, (200, example("poll-running.json")))
    task = client_for(srv, poll_schedule=PollSchedule(first=0.1, factor=1.0, cap=0.1)).task(TASK)
    t0 = time.monotonic()
    with pytest.raises(errors.TaskTimeoutError) as info:
        task.wait(timeout=0.35)
    elapsed = time.monotonic() - t0
    assert info.value.task_id == TASK and "do not submit again" in str(info.value)
    assert elapsed < 0.6
    n = len(srv.calls("GET", POLL))
    time.sleep(0.2)
    assert len(srv.calls("GET", POLL)) == n and 2 <= n <= 4


def _zip_bytes():
    info = {"pore": {"raw_score": 78.4, "ui_score": 85, "output_mask_name": "pore_output.png"}, "all": {"score": 85.0}}
    png = io.BytesIO()
    Image.new("RGBA", (600, 800)).save(png, "PNG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("skinanalysisResult/score_info.json", json.dumps(info))
        zf.writestr("skinanalysisResult/pore_output.png", png.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("shape", ["object", "bare"])
def test_zip_result_url_as_object_or_bare_string(srv, shape):
    url = f"{srv.url}/_storage/results/r.zip?X-Amz-Expires=7200"
    results = {"url": url} if shape == "object" else url
    srv.route("GET", POLL, (200, {"status": 200, "data": {"error": None, "results": results,
                                                         "task_status": "success"}}))
    srv.route("GET", "/_storage/results/r.zip", (200, _zip_bytes(), {"Content-Type": "binary/octet-stream"}))
    r = _task(srv).wait(timeout=5)
    assert r.score("pore") == 78.4 and r.mask("pore").size == (600, 800)
    assert "Authorization" not in srv.calls("GET", "/_storage")[0]["headers"]


def test_html_page_instead_of_zip(srv):
    srv.route("GET", POLL, (200, {"status": 200, "data": {"results": {"url": f"{srv.url}/_storage/r.zip"},
                                                         "task_status": "success", "error": None}}))
    srv.route("GET", "/_storage/r.zip", (200, "<html><body>Service Unavailable</body></html>",
                                        {"Content-Type": "text/html"}))
    with pytest.raises(errors.ResultFormatError, match="Expected a ZIP"):
        _task(srv).wait(timeout=5)


def test_html_page_instead_of_json(srv):
    srv.route("GET", POLL, (200, "<html>maintenance</html>", {"Content-Type": "text/html"}))
    with pytest.raises(errors.ResultFormatError, match="expected JSON"):
        _task(srv).status()


def test_429_on_poll_is_retried(srv):
    srv.route("GET", POLL, (429, example("error-429.json")), _success_json())
    assert _task(srv).wait(timeout=5).format == "json"


# ---------------------------------------------------------------- account endpoints

def test_credits_and_feature_cost_paging(srv):
    srv.route("GET", "/s2s/v1.0/client/credit", (200, example("credit-response.json")))
    page1 = example("feature-cost-response.json")
    page2 = {"status": 200, "result": {"next_token": None, "skus": [{"description": "x", "amount": 22}]}}
    srv.route("GET", "/s2s/v2.0/credit/feature-cost", (200, page1), (200, page2))
    c = client_for(srv)
    assert c.balance() == pytest.approx(269.5)
    skus = c.feature_cost()
    assert len(skus) == len(page1["result"]["skus"]) + 1


def test_rate_limiter_sliding_window():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    rl = RateLimiter(3, 10.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        assert rl.acquire() == 0
    assert rl.acquire() > 9.9  # the 4th waits for the window to slide
    assert now[0] >= 10.0


def test_rate_limiter_shared_per_key():
    a = RateLimiter.for_key("https://x", "k1")
    assert RateLimiter.for_key("https://x", "k1") is a
    assert RateLimiter.for_key("https://x", "k2") is not a


def test_public_api_pinned():
    expected = {"AnalysisResult", "Client", "PollSchedule", "PreparedImage", "RateLimiter", "RetryPolicy", "Task",
                "TaskStatus", "analyze", "connect", "errors", "estimate_units", "prepare_image", "resolve_actions",
                "sample_portrait", "submit", "validate_actions", "validate_miniserver_args", "CATALOGUE",
                "__version__"}
    assert expected <= set(skinlab.__all__)
    for name in skinlab.__all__:
        assert getattr(skinlab, name) is not None


def test_expired_result_url_refreshed_by_polling_again(srv):
    old = f"{srv.url}/_storage/results/old/r.zip?X-Amz-Expires=7200"
    new = f"{srv.url}/_storage/results/new/r.zip?X-Amz-Expires=7200"

    def env(url):
        return (200, {"status": 200, "data": {"error": None, "results": {"url": url}, "task_status": "success"}})

    srv.route("GET", POLL, env(old), env(new))
    srv.route("GET", "/_storage/results/old/r.zip",
              (403, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
               {"Content-Type": "application/xml"}))
    srv.route("GET", "/_storage/results/new/r.zip", (200, _zip_bytes(), {"Content-Type": "binary/octet-stream"}))
    r = _task(srv).wait(timeout=5)
    assert r.score("pore") == 78.4
    assert len(srv.calls("GET", POLL)) == 2 and len(srv.calls("GET", "/_storage/results/old")) == 1


def test_balance_check_refuses_before_upload(srv):
    low = {"status": 200, "results": [{"id": 1, "type": "ApiPaygToken", "amount": 8, "amount_dec": 8.5,
                                       "expiry": 1805414400000}]}
    srv.route("GET", "/s2s/v1.0/client/credit", (200, low))
    c = client_for(srv)
    assert c.estimate(["pore"]) == 9
    with pytest.raises(errors.InsufficientCreditsError, match="costs 9 units but the balance is 8.5"):
        c.submit(_jpeg(), ["pore"], check_balance=True)
    assert srv.calls("POST") == [] and srv.calls("PUT") == []


@pytest.mark.parametrize("pasted, what", [("sk-live" + "-abc\r\ndef", "a carriage return"),
                                          ("sk-live" + "-abc def", "a space"),
                                          ("sk-live" + "-abc\u00e9", "the character U+00E9")])
def test_a_key_that_cannot_travel_in_a_header_is_refused_before_any_request(pasted, what):
    """A key pasted with a line break inside used to fail as "cannot reach ... (InvalidHeader).
    Check the network"; it is now refused at once, saying what is wrong, without showing the key."""
    with pytest.raises(errors.ConfigurationError, match=re.escape(f"The API key holds {what} at position")) as info:
        Client(api_key=pasted, base_url="http://127.0.0.1:9")
    assert "abc" not in str(info.value) and "sk-live" not in str(info.value)


def test_a_429_names_the_limit_of_whoever_answered():
    """The cloud's 429 cites the service's documented 250 / 300 s; a local emulator's says that the
    emulator has its own limit (skinlab serve --rate-limit), instead of quoting the cloud's."""
    import requests

    from skinlab.client import error_from_response

    def answer(url):
        resp = requests.Response()
        resp.status_code, resp.url = 429, url
        resp._content = b'{"status": 429, "error": "Too many requests"}'
        resp.headers["content-type"] = "application/json"
        return error_from_response(resp, context="poll")

    cloud, local = answer("https://yce-api-01.makeupar.com/s2s/v2.0/task/x"), answer("http://127.0.0.1:8767/s2s/v2.0/task/x")
    assert isinstance(cloud, errors.RateLimitError) and isinstance(local, errors.RateLimitError)
    assert "the service allows 250 requests per 300 s per key" in str(cloud)
    assert "this local emulator limits requests" in str(local) and "--rate-limit" in str(local)


def test_credentials_in_the_base_url_stay_out_of_the_repr_and_messages(monkeypatch):
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    client = Client(base_url="http://me:url-secret@127.0.0.1:9")
    assert "url-secret" not in repr(client) and "127.0.0.1:9" in repr(client)
    with pytest.raises(errors.ConfigurationError) as info:
        Client(base_url="https://me:url-secret@skin.example")
    assert "url-secret" not in str(info.value) and "skin.example" in str(info.value)
