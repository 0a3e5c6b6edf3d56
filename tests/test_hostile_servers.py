"""Hostile servers: the client survives and says what happened (issue 11).

A scripted loopback server plays a whole task (upload slot, PUT, create, poll, download) and
then misbehaves in one way: unsafe or broken ZIPs, HTML where JSON or a ZIP was expected, an
oversized answer, odd content types, a storm of 5xx, a download that stops half-way, a redirect
to plain http. Each time the error is one of :mod:`skinlab.errors` with a message that says what
happened, the client can carry on, the ledger keeps its rows, and no file appears outside the
folder the user chose (the study folder), in particular not in the working directory.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from fakes import ScriptedServer
from skinlab import errors
from skinlab.client import Client, PollSchedule, RetryPolicy
from skinlab.ledger import Ledger

KEY = "sk-" + "hostile-server-0123456789"  # fake; split so that secret scanners do not flag the test files
TASK = "T" * 107
FID = "sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ="
FAST = RetryPolicy(base=0.0, sleep=lambda s: None)
QUICK = PollSchedule(first=0.0, factor=1.0, cap=0.01, minimum=0.0)
SLOT = "/s2s/v2.0/file"
PUT = "/_storage/upload/abc.jpg"
CREATE = "/s2s/v2.0/task/skin-analysis"
POLL = f"/s2s/v2.0/task/skin-analysis/{TASK}"
ZIP = "/_storage/results/r/result.zip"


class Partial:
    """A response whose body stops early: ``sent`` of ``declared`` bytes, then (after ``hang`` s) the
    connection closes."""

    def __init__(self, sent: bytes, declared: int, hang: float = 0.0):
        self.sent, self.declared, self.hang = sent, declared, hang


class HostileServer(ScriptedServer):
    def _handler_class(self):
        base = super()._handler_class()

        class Handler(base):
            def _send(self, status, payload, headers):
                if not isinstance(payload, Partial):
                    return super()._send(status, payload, headers)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(payload.declared))
                self.end_headers()
                self.wfile.write(payload.sent)
                self.wfile.flush()
                time.sleep(payload.hang)
                self.close_connection = True

        return Handler


@pytest.fixture
def srv():
    with HostileServer() as s:
        yield s


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The user's chosen folder (``study``), and a working directory and home that must stay empty."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    yield tmp_path / "study"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "study")]
    assert outside == [], f"files written outside the chosen folder: {outside}"


def client_for(srv, **kw) -> Client:
    kw.setdefault("retry", FAST)
    kw.setdefault("poll_schedule", QUICK)
    kw.setdefault("rate_limiter", False)
    return Client(KEY, base_url=srv.url, **kw)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (480, 640), (190, 150, 130)).save(buf, "JPEG")
    return buf.getvalue()


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (48, 64), (255, 0, 0, 90)).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def good_zip() -> bytes:
    info = {"redness": {"raw_score": 71.0, "ui_score": 80, "output_mask_name": "redness_output.png"},
            "all": {"score": 80.0}, "skin_age": 33}
    return make_zip({"skinanalysisResult/score_info.json": json.dumps(info),
                     "skinanalysisResult/redness_output.png": png()})


def script_task(srv, *, poll=None, download=None, put=None, url_of_zip=None):
    """Route a whole task; ``poll``/``download``/``put`` replace the well-behaved answers."""
    srv.route("POST", SLOT, (200, {"status": 200, "data": {"files": [{
        "content_type": "image/jpeg", "file_name": "x.jpg", "file_id": FID,
        "requests": [{"method": "PUT", "url": f"{srv.url}{PUT}?X-Amz-Expires=7200", "headers": {}}]}]}}))
    srv.route("PUT", PUT, *(put or [(200, b"", {"ETag": '"e"'})]))
    srv.route("POST", CREATE, (200, {"status": 200, "data": {"task_id": TASK}}))
    zip_url = url_of_zip or f"{srv.url}{ZIP}?X-Amz-Expires=7200"
    srv.route("GET", POLL, *(poll or [(200, {"status": 200, "data": {"task_status": "success", "error": None,
                                                                       "results": {"url": zip_url}}})]))
    srv.route("GET", ZIP, *(download or [(200, good_zip(), {"Content-Type": "binary/octet-stream"})]))


def prior_ledger(study: Path) -> tuple[Ledger, int]:
    from skinlab.results import AnalysisResult, ScoreEntry

    ledger = Ledger(study / "ledger.sqlite", warn_location=False)
    prior = ledger.record(AnalysisResult([ScoreEntry("wrinkle", raw_score=55.0, ui_score=68)], {}, format="json",
                                         task_id="prior", backend="cloud", engine="e"), image_name="old.jpg")
    return ledger, prior.id


def assert_prior_kept(ledger: Ledger, prior_id: int) -> None:
    row = ledger.get(prior_id)
    assert row.status == "success" and row.task_id == "prior"
    assert list(ledger.scores(backend="cloud").raw_score) == [55.0]


def run_through_ledger(srv, study: Path, **options):
    """Submit one photo through a ledger; return (ledger, prior id, the new submission)."""
    ledger, prior_id = prior_ledger(study)
    photo = study / "photos" / "face.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(jpeg())
    sub = ledger.submit(client_for(srv), photo, ["redness"], **options)
    return ledger, prior_id, sub


# ---------------------------------------------------------------------------- unsafe or broken ZIPs

UNSAFE = ["../../evil.png", "skinanalysisResult/../../../evil.png", "/tmp/skinlab-evil.png", "C:\\evil.png",
          "..\\..\\evil.png", "other/score_info.json"]


@pytest.mark.parametrize("name", UNSAFE, ids=["dotdot", "nested-dotdot", "absolute", "drive", "backslash",
                                              "duplicate-name"])
def test_zip_with_unsafe_entry_is_rejected_and_nothing_is_written(srv, study, name):
    data = make_zip({"skinanalysisResult/score_info.json": json.dumps({"redness": {"raw_score": 1}}),
                     name: b"\x89PNG\r\n\x1a\n evil"})
    script_task(srv, download=[(200, data)])
    with pytest.raises(errors.ResultFormatError, match=r"(Unsafe path|Path traversal|Duplicate entry).* in the result ZIP"):
        client_for(srv).analyze(jpeg(), ["redness"])
    ledger, prior_id, sub = run_through_ledger(srv, study)
    assert sub.error_code == "download_failed" and sub.task_id == TASK
    assert "could not be downloaded" in sub.error_message and "the result ZIP" in sub.error_message
    assert_prior_kept(ledger, prior_id)
    assert not Path("/tmp/skinlab-evil.png").exists()
    assert not any(p.name.endswith("evil.png") for p in study.parent.rglob("*"))
    # the client survives: the next task works
    script_task(srv)
    assert client_for(srv).analyze(jpeg(), ["redness"]).score("redness") == 71.0


def test_zip_bomb_is_rejected_without_inflating_it(srv, study):
    bomb = make_zip({"skinanalysisResult/score_info.json": "{}",
                     "skinanalysisResult/redness_output.png": b"\0" * (70 << 20)}, compress=zipfile.ZIP_DEFLATED)
    assert len(bomb) < 1 << 20
    script_task(srv, download=[(200, bomb)])
    with pytest.raises(errors.ResultFormatError, match=r"declares 73400320 bytes \(limit 67108864\)"):
        client_for(srv).analyze(jpeg(), ["redness"])
    ledger, prior_id, sub = run_through_ledger(srv, study)
    assert sub.error_code == "download_failed"
    assert_prior_kept(ledger, prior_id)


def test_many_small_entries_are_a_bomb_too(srv, study):
    crowd = make_zip({"skinanalysisResult/score_info.json": "{}",
                      **{f"skinanalysisResult/m{i}.png": b"x" for i in range(250)}})
    script_task(srv, download=[(200, crowd)])
    with pytest.raises(errors.ResultFormatError, match=r"has 251 entries \(limit 200\)"):
        client_for(srv).analyze(jpeg(), ["redness"])


def test_truncated_zip(srv, study):
    data = good_zip()
    script_task(srv, download=[(200, data[: len(data) * 2 // 3])])
    with pytest.raises(errors.ResultFormatError, match=r"damaged or truncated.*download it again"):
        client_for(srv).analyze(jpeg(), ["redness"])
    ledger, prior_id, sub = run_through_ledger(srv, study)
    assert sub.error_code == "download_failed"
    assert_prior_kept(ledger, prior_id)
    # once the storage behaves, resume() fetches the result again: nothing was lost
    script_task(srv)
    ledger.resume(client_for(srv), timeout=5)
    assert ledger.get(sub.id).status == "success"
    assert (study / "results" / f"{sub.id:06d}" / "redness_output.png").is_file()


# ---------------------------------------------------------------------------- HTML, size, content types

def test_html_where_the_zip_was_expected(srv, study):
    script_task(srv, download=[(200, "<html><body><h1>Access Denied</h1></body></html>",
                                {"Content-Type": "text/html"})])
    with pytest.raises(errors.ResultFormatError, match=r"Expected a ZIP archive but got \d+ bytes starting "
                                                       r"'<html>.*expired \(poll the task again"):
        client_for(srv).analyze(jpeg(), ["redness"])


@pytest.mark.parametrize("call", ["slot", "create", "poll"])
def test_html_where_json_was_expected(srv, study, call):
    page = (200, "<!DOCTYPE html><html><title>Maintenance</title></html>", {"Content-Type": "text/html"})
    script_task(srv, poll=[page] if call == "poll" else None)
    if call == "slot":
        srv.route("POST", SLOT, page)
    if call == "create":
        srv.route("POST", CREATE, page)
    c = client_for(srv)
    # after a create, such an answer leaves the task's fate unknown: said so, and never re-sent
    exc = errors.TaskFateUnknownError if call == "create" else errors.ResultFormatError
    with pytest.raises(exc, match=r"expected JSON from /s2s/.*text/html.*Maintenance"):
        c.analyze(jpeg(), ["redness"])
    assert len(srv.calls("POST", CREATE)) == (0 if call == "slot" else 1)
    if call == "create":  # the ledger keeps it as ambiguous, never re-sent
        from skinlab.ledger import LedgerReuseWarning

        with pytest.warns(LedgerReuseWarning, match="create answer was lost"):
            ledger, prior_id, sub = run_through_ledger(srv, study)
        assert sub.status == "ambiguous" and "console" in sub.next_step
        assert_prior_kept(ledger, prior_id)
        assert len(srv.calls("POST", CREATE)) == 2


def test_html_where_a_mask_was_expected(srv, study):
    mask_url = f"{srv.url}/_storage/results/m/redness_output.png?X-Amz-Expires=7200"
    script_task(srv, poll=[(200, {"status": 200, "data": {"task_status": "success", "error": None, "results": {
        "output": [{"type": "redness", "raw_score": 70.0, "ui_score": 79, "mask_urls": [mask_url]}]}}})])
    srv.route("GET", "/_storage/results/m/redness_output.png", (200, "<html>Request has expired</html>"))
    result = client_for(srv).analyze(jpeg(), ["redness"], format="json")
    assert result.score("redness") == 70.0  # the scores arrived
    with pytest.raises(errors.ResultFormatError, match=r"mask of redness/whole should be a PNG or JPEG.*'<html>"):
        result.mask("redness")
    with pytest.raises(errors.ResultFormatError, match=r"should be a PNG or JPEG"):
        result.save(study / "direct")
    assert not (study / "direct" / "redness_output.png").exists()  # no HTML saved under an image name
    ledger, prior_id, sub = run_through_ledger(srv, study, format="json")
    assert sub.error_code == "download_failed" and "masks could not be downloaded" in sub.error_message
    assert not list(study.rglob("redness_output.png"))
    assert_prior_kept(ledger, prior_id)


@pytest.mark.parametrize("where", ["poll", "slot"])
def test_oversized_json_is_not_read(srv, study, where):
    huge = json.dumps({"status": 200, "data": {"task_status": "running", "pad": "x" * (9 << 20)}})
    script_task(srv, poll=[(200, huge, {"Content-Type": "application/json"})])
    if where == "slot":
        srv.route("POST", SLOT, (200, huge, {"Content-Type": "application/json"}))
    with pytest.raises(errors.ResultFormatError, match=r"answer is larger than 8 MB.*not read"):
        client_for(srv).analyze(jpeg(), ["redness"])


def test_oversized_answer_to_create_is_a_task_of_unknown_fate(srv, study):
    script_task(srv)
    srv.route("POST", CREATE, (200, json.dumps({"status": 200, "data": {"task_id": TASK, "pad": "x" * (9 << 20)}})))
    with pytest.raises(errors.TaskFateUnknownError, match=r"larger than 8 MB.*may exist and be billed.*not re-sent"):
        client_for(srv).submit(jpeg(), ["redness"])
    assert len(srv.calls("POST", CREATE)) == 1


@pytest.mark.parametrize("api_type, zip_type, mask_type", [
    ("text/html", "application/json", "application/json"),
    ("text/plain; charset=latin-1", "image/png", "text/html"),
    (None, None, None),
], ids=["html-labels", "mixed-labels", "no-labels"])
def test_wrong_content_types_are_tolerated_when_the_bytes_are_right(srv, study, api_type, zip_type, mask_type):
    """Pinned: formats are read from the bytes, never from Content-Type (contract §6.1: masks come as
    binary/octet-stream, and so may anything else)."""
    def typed(body, ctype):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return (200, data, {} if ctype is None else {"Content-Type": ctype})

    script_task(srv, download=[typed(good_zip(), zip_type)])
    srv.route("POST", CREATE, typed({"status": 200, "data": {"task_id": TASK}}, api_type))
    srv.route("GET", POLL, typed({"status": 200, "data": {"task_status": "success", "error": None,
                                                          "results": {"url": f"{srv.url}{ZIP}"}}}, api_type))
    r = client_for(srv).analyze(jpeg(), ["redness"])
    assert r.score("redness") == 71.0 and r.mask("redness").mode == "RGBA"
    mask_url = f"{srv.url}/_storage/m/redness_output.png"
    srv.route("GET", POLL, typed({"status": 200, "data": {"task_status": "success", "error": None, "results": {
        "output": [{"type": "redness", "raw_score": 5, "ui_score": 9, "mask_urls": [mask_url]}]}}}, api_type))
    srv.route("GET", "/_storage/m/redness_output.png", typed(png(), mask_type))
    assert client_for(srv).analyze(jpeg(), ["redness"], format="json").mask("redness").size == (48, 64)


# ---------------------------------------------------------------------------- storms, stalls, redirects

def test_5xx_storm_on_the_upload_slot(srv, study):
    script_task(srv)
    srv.route("POST", SLOT, (503, "<html>Service Unavailable</html>"))
    with pytest.raises(errors.ServerError, match=r"upload slot: the service failed.*try again later") as info:
        client_for(srv).submit(jpeg(), ["redness"])
    assert info.value.status == 503 and info.value.retry_safe
    assert len(srv.calls("POST", SLOT)) == 4 and srv.calls("PUT") == [] and srv.calls("POST", CREATE) == []


def test_5xx_storm_on_create_is_never_resent(srv, study):
    script_task(srv)
    srv.route("POST", CREATE, (502, "<html>Bad Gateway</html>"))
    ledger, prior_id, sub = run_through_ledger(srv, study)
    assert sub.status == "ambiguous" and "HTTP 502" in sub.error_message
    assert len(srv.calls("POST", CREATE)) == 1
    assert_prior_kept(ledger, prior_id)


def test_5xx_storm_while_polling_keeps_the_task(srv, study):
    script_task(srv, poll=[(500, {"status": 500, "error": "Internal"})])
    ledger, prior_id, sub = run_through_ledger(srv, study)
    assert sub.status == "running" and sub.task_id == TASK and "ledger.resume(client)" in sub.error_message
    assert len(srv.calls("GET", POLL)) == 4  # one poll, three retries
    with pytest.raises(errors.ServerError, match=r"poll: the service failed"):
        client_for(srv).task(TASK).wait(timeout=5)
    assert_prior_kept(ledger, prior_id)
    script_task(srv)  # the storm passes
    ledger.resume(client_for(srv), timeout=5)
    assert ledger.get(sub.id).status == "success"


def test_5xx_storm_on_the_download(srv, study):
    script_task(srv, download=[(503, "<Error><Code>SlowDown</Code></Error>")])
    with pytest.raises(errors.APIError, match=r"Download failed with HTTP 503 \(SlowDown\)"):
        client_for(srv).analyze(jpeg(), ["redness"])
    assert len(srv.calls("GET", ZIP)) == 4


def test_download_that_stops_half_way(srv, study):
    data = good_zip()
    script_task(srv, download=[(200, Partial(data[:100], len(data)))] * 4 + [(200, data)])
    # three retries are allowed: the fifth answer would have worked, but four broken ones exhaust them
    with pytest.raises(errors.SkinlabConnectionError, match=r"download of http://127.0.0.1:\d+/_storage/results/r/"
                                                            r"result.zip stopped before the end.*4 times"):
        client_for(srv).analyze(jpeg(), ["redness"])
    assert len(srv.calls("GET", ZIP)) == 4
    # one broken answer is retried and the result arrives
    script_task(srv, download=[(200, Partial(data[:100], len(data))), (200, data)])
    assert client_for(srv).analyze(jpeg(), ["redness"]).score("redness") == 71.0


def test_download_that_stalls(srv, study):
    data = good_zip()
    script_task(srv, download=[(200, Partial(data[:50], len(data), hang=1.0))])
    c = client_for(srv, timeout=(2.0, 0.2))
    c.retry = RetryPolicy(base=0.0, sleep=lambda s: None, max_retries_connection=1)
    started = time.monotonic()
    with pytest.raises(errors.SkinlabConnectionError, match=r"stopped before the end.*2 times.*Nothing was saved"):
        c.analyze(jpeg(), ["redness"])
    assert time.monotonic() - started < 5


def test_redirect_to_plain_http_is_refused(srv, study):
    script_task(srv, download=[(302, b"", {"Location": "http://storage.example.invalid/r.zip?sig=abc"})])
    with pytest.raises(errors.InsecureTransportError, match=r"redirected by 127.0.0.1: refusing to send or fetch data "
                                                            r"over plain http to storage.example.invalid.*https"
                                                            r".*allow_insecure_http=True") as info:
        client_for(srv).analyze(jpeg(), ["redness"])
    assert "sig=abc" not in str(info.value)  # no signature in the message
    ledger, prior_id, sub = run_through_ledger(srv, study)
    assert sub.error_code == "download_failed" and "plain http" in sub.error_message
    assert_prior_kept(ledger, prior_id)


def test_upload_redirected_to_plain_http_is_refused_before_the_photo_leaves(srv, study):
    script_task(srv, put=[(307, b"", {"Location": "http://203.0.113.9/steal.jpg"})])
    with pytest.raises(errors.InsecureTransportError, match=r"plain http to 203.0.113.9"):
        client_for(srv).submit(jpeg(), ["redness"])
    assert len(srv.calls("PUT")) == 1 and srv.calls("POST", CREATE) == []


def test_upload_url_on_plain_http_is_refused(srv, study):
    script_task(srv)
    srv.route("POST", SLOT, (200, {"status": 200, "data": {"files": [{
        "file_id": FID, "requests": [{"method": "PUT", "url": "http://198.51.100.7/u.jpg", "headers": {}}]}]}}))
    with pytest.raises(errors.InsecureTransportError, match=r"plain http to 198.51.100.7"):
        client_for(srv).submit(jpeg(), ["redness"])
    assert srv.calls("PUT") == [] and srv.calls("POST", CREATE) == []


@pytest.mark.parametrize("location", ["ftp://storage.example.invalid/r.zip", "file:///etc/passwd"])
def test_redirect_to_another_scheme_is_refused(srv, study, location):
    script_task(srv, download=[(301, b"", {"Location": location})])
    with pytest.raises(errors.InsecureTransportError, match=r"only http\(s\) URLs"):
        client_for(srv).analyze(jpeg(), ["redness"])


def test_redirects_on_loopback_are_followed_and_loops_stop(srv, study):
    script_task(srv, download=[(302, b"", {"Location": "/_storage/results/r/moved.zip"})])
    srv.route("GET", "/_storage/results/r/moved.zip", (200, good_zip()))
    assert client_for(srv).analyze(jpeg(), ["redness"]).score("redness") == 71.0
    script_task(srv, download=[(302, b"", {"Location": ZIP})])  # redirects to itself
    with pytest.raises(errors.ResultFormatError, match=r"more than 5 redirects"):
        client_for(srv).analyze(jpeg(), ["redness"])

