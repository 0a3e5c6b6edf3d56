"""Secrets and privacy sweep (issue 11).

One distinctive fake key is used for real work (the emulator, and scripted servers that echo it
back in their error bodies), and then every place it could leak is searched: reprs, logs at DEBUG
(skinlab, requests, urllib3), exceptions formatted with their full tracebacks (chained causes,
and the local variables of every frame), the ledger's SQLite files byte for byte, saved results
folders, CLI output and the committed notebooks. Plain http to a host other than loopback is
refused unless allowed, and face photos are written only where the user chose.
"""

from __future__ import annotations

import io
import logging
import re
import tempfile
import traceback
from pathlib import Path

import pytest
from PIL import Image

from fakes import ScriptedServer
from skinlab import errors
from skinlab.client import Client, PollSchedule, RetryPolicy, connect
from skinlab.ledger import Ledger

#: The fake key: distinctive, so that any trace of it is found.
KEY = "sk-" + "SWEEP-q7Zt3vXp9LmN2bR8kD4wY6"  # fake; split so that secret scanners do not flag the test files
FRAGMENTS = (KEY, "q7Zt3vXp9LmN2bR8kD4wY6", "SWEEP-q7Zt3")
QUICK = PollSchedule(first=0.0, factor=1.0, cap=0.02, minimum=0.0)
FAST = RetryPolicy(base=0.0, sleep=lambda s: None)
TASK = "S" * 107
CREATE = "/s2s/v2.0/task/skin-analysis"
REPO = Path(__file__).resolve().parents[1]


def assert_clean(text, where: str) -> None:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    for frag in FRAGMENTS:
        assert frag not in text, f"the API key leaks into {where}"


def full_traceback(exc: BaseException) -> str:
    """The exception as a debugger or error tracker would show it: the chain, and every frame's locals."""
    parts = ["".join(traceback.format_exception(exc))]
    parts += list(traceback.TracebackException.from_exception(exc, capture_locals=True).format(chain=True))
    seen, todo = set(), [exc]
    while todo:  # also each cause or context that is shown (not suppressed with "from None")
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        parts += [repr(e), str(e)]
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        if e.__context__ is not None and not e.__suppress_context__:
            todo.append(e.__context__)
    return "\n".join(parts)


def portrait_bytes() -> bytes:
    from skinlab.samples import sample_portrait

    buf = io.BytesIO()
    sample_portrait("astronaut", "sd").save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def portrait():
    return portrait_bytes()


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("skinlab", "urllib3", "requests", "urllib3.connectionpool"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def echoing_server(srv: ScriptedServer) -> ScriptedServer:
    """A server whose every answer quotes the key, the worst case for messages."""
    srv.route("POST", "/s2s/v2.0/file", (401, {"status": 401, "error": f"Key {KEY} is not recognized",
                                               "error_code": "InvalidApiKey"}))
    srv.route("POST", CREATE, (500, f"<html>upstream said: Authorization: Bearer {KEY}</html>"))
    srv.route("GET", f"/s2s/v2.0/task/skin-analysis/{TASK}",
              (400, {"status": 400, "error": f"Invalid task ID for Bearer {KEY}", "error_code": "InvalidTaskId"}))
    srv.route("GET", "/s2s/v1.0/client/credit", (200, f"not json {KEY}", {"Content-Type": "text/html"}))
    return srv


# ---------------------------------------------------------------------------- one sweep over real work

def test_key_absent_from_reprs_logs_tracebacks_ledger_and_results(local_server, tmp_path, debug_logs, portrait):
    client = Client(KEY, base_url=local_server.url, rate_limiter=False, poll_schedule=QUICK)
    photo = tmp_path / "photos" / "face.jpg"
    photo.parent.mkdir()
    photo.write_bytes(portrait)
    ledger = Ledger(tmp_path / "study" / "ledger.sqlite", warn_location=False)
    texts: dict[str, str] = {}

    # real work: a success through the ledger, a JSON task, a failed task, an expired id
    sub = ledger.submit(client, photo, ["redness", "wrinkle"])
    assert sub.ok
    task = client.submit(photo, ["redness"], format="json")
    result = task.wait(timeout=60)
    plan = client.plan(photo, ["redness"])
    failed = ledger.submit(client, photo, ["pore"], file_name="x__error_no_face__.jpg", force=True)
    assert failed.error_code == "error_no_face"
    caught = []
    for call in (lambda: client.task("no-such-task-" + "z" * 90).wait(timeout=5),
                 lambda: client.submit(photo, ["redness"], file_name="y__error_src_face_too_small__.jpg").wait(60)):
        with pytest.raises(errors.SkinlabError) as info:
            call()
        caught.append(info.value)

    for name, obj in {"client": client, "task": task, "status": task.last_status, "result": result, "plan": plan,
                      "prepared": plan.prepared, "ledger": ledger, "submission": sub, "failed": failed}.items():
        texts[f"repr({name})"] = repr(obj) + str(obj)
    texts["result html"] = result._repr_html_() or ""
    texts["submissions table"] = ledger.submissions().to_csv()
    texts["scores table"] = ledger.scores(backend="local").to_csv()
    for exc in caught:
        texts[f"traceback of {type(exc).__name__}"] = full_traceback(exc)
    texts["logs"] = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in debug_logs.records)
    assert any(r.name.startswith("urllib3") for r in debug_logs.records)  # the HTTP layer really logged
    for where, text in texts.items():
        assert_clean(text, where)

    ledger.close()
    files = [p for p in (tmp_path / "study").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".sqlite") for p in files) and any(p.suffix == ".png" for p in files)
    for p in files:  # the SQLite file (and its WAL), result.json, scores.csv, masks, working image
        assert_clean(p.read_bytes(), str(p.relative_to(tmp_path)))
    out = result.save(tmp_path / "saved")
    for p in out.rglob("*"):
        assert_clean(p.read_bytes(), str(p))


def test_key_absent_when_servers_echo_it_back(tmp_path, debug_logs, monkeypatch):
    ledger = Ledger(tmp_path / "study" / "ledger.sqlite", warn_location=False)
    photo = tmp_path / "face.jpg"
    Image.new("RGB", (480, 640), (180, 140, 120)).save(photo, "JPEG")
    with echoing_server(ScriptedServer()) as srv:
        client = Client(KEY, base_url=srv.url, rate_limiter=False, retry=FAST, poll_schedule=QUICK)
        caught = []
        for call in (lambda: client.submit(photo, ["redness"]),                       # 401 quoting the key
                     lambda: client.submit("sKu1/dDKFvwQ2i6r7fPZ+2w7IxDtFjQ=", ["redness"]),  # 500 page quoting it
                     lambda: client.task(TASK).status(),                               # 400 quoting it
                     lambda: client.credits(),                                         # non-JSON 200 quoting it
                     lambda: ledger.submit(client, photo, ["redness"])):
            with pytest.raises(errors.SkinlabError) as info:
                call()
            caught.append(info.value)
        # and the key was sent where it belongs: as the bearer token to the API host, nowhere else
        assert {r["headers"].get("Authorization") for r in srv.requests} == {f"Bearer {KEY}"}
    with ScriptedServer() as dead:
        port_url = dead.url
    refused = Client(KEY, base_url=port_url, rate_limiter=False, retry=FAST)
    with pytest.raises(errors.SkinlabConnectionError) as info:
        refused.credits()  # nothing listens: a connection error raised from deep in urllib3
    caught.append(info.value)
    assert {type(e).__name__ for e in caught} >= {"AuthenticationError", "TaskFateUnknownError",
                                                  "InvalidTaskIdError", "ResultFormatError",
                                                  "SkinlabConnectionError"}
    for exc in caught:
        assert_clean(full_traceback(exc), f"the traceback of {type(exc).__name__}")
        assert_clean(repr(exc) + str(exc) + exc.message, type(exc).__name__)
    assert_clean("\n".join(r.getMessage() for r in debug_logs.records), "the logs")
    row = ledger.submissions().iloc[-1]
    assert row.status == "error" and row.error_code == "InvalidApiKey"
    assert_clean(ledger.submissions().to_csv(), "the ledger tables")
    ledger.close()
    for p in (tmp_path / "study").rglob("*"):
        assert_clean(p.read_bytes(), str(p))


def test_key_absent_from_cli_output(tmp_path, monkeypatch, capsys, caplog, local_server, portrait):
    from skinlab.cli import main

    photo = tmp_path / "S01.jpg"
    photo.write_bytes(portrait)
    monkeypatch.setenv("SKINLAB_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    code = main(["-v", "analyze", str(photo), "--actions", "redness", "--base-url", local_server.url,
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.out
    assert_clean(out.out + out.err, "CLI output")
    with echoing_server(ScriptedServer()) as srv:
        code = main(["-v", "analyze", str(photo), "--actions", "redness", "--base-url", srv.url,
                     "--out", str(tmp_path / "out2")])
    out = capsys.readouterr()
    assert code != 0 and ("refused" in out.out or "failed" in out.out), out.out
    assert_clean(out.out + out.err, "CLI output of a failed run")
    assert_clean("\n".join(r.getMessage() for r in caplog.records), "CLI logs")
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert_clean(p.read_bytes(), str(p))


def test_committed_notebooks_hold_no_key():
    from test_notebooks_clean import KEY_PATTERNS

    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        raw = nb.read_text(encoding="utf-8")
        assert_clean(raw, nb.name)
        for what, pattern in KEY_PATTERNS.items():
            assert not pattern.search(raw), f"{nb.name} holds {what}"


def test_executed_cloud_notebook_shows_no_key(tmp_path, monkeypatch):
    """Notebook 04 run with the key in the environment (and no cloud opt-in, so on the local
    emulator): no output of any cell, nor the saved notebook, holds the key."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SKINLAB_API_KEY", KEY)
    monkeypatch.delenv("SKINLAB_NOTEBOOK_CLOUD", raising=False)
    nb = nbformat.read(str(REPO / "notebooks" / "04_cloud_service.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert len(outputs) >= 10 and not [o for o in outputs if o.get("output_type") == "error"]
    assert "key=***" in nbformat.writes(nb)      # the client's repr was shown, masked
    assert_clean(nbformat.writes(nb), "notebook 04 executed with the key set")


def test_the_sweep_would_see_a_leak():
    """The checks above can fail: a key in a local variable shows up in a traceback with locals,
    and the key fragments are found in bytes."""
    def leaky():
        token = KEY  # noqa: F841 - the leak under test
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError) as info:
        leaky()
    with pytest.raises(AssertionError, match="leaks"):
        assert_clean(full_traceback(info.value), "a deliberate leak")
    with pytest.raises(AssertionError, match="leaks"):
        assert_clean(("xx" + FRAGMENTS[1] + "yy").encode(), "bytes")


def test_authorization_header_hidden_from_tracebacks_with_locals():
    """The header dict built for each call is in a frame of every API error's traceback."""
    with ScriptedServer() as srv:
        srv.route("GET", "/s2s/v1.0/client/credit", (503, {"status": 503, "error": "down"}))
        client = Client(KEY, base_url=srv.url, rate_limiter=False, retry=FAST)
        with pytest.raises(errors.ServerError) as info:
            client.credits()
    dump = full_traceback(info.value)
    assert "'Authorization': 'Bearer ***'" in dump  # the local is there, its value hidden
    assert_clean(dump, "the traceback with locals")


# ---------------------------------------------------------------------------- plain http

@pytest.mark.parametrize("url", ["http://yce-api-01.makeupar.com", "http://192.168.1.20:8765", "http://10.0.0.5",
                                 "http://127.0.0.1.example.com", "http://localhost.example.com:80"])
def test_plain_http_to_other_hosts_refused_unless_allowed(url):
    with pytest.raises(errors.ConfigurationError, match=r"Refusing to send an API key and face photos over plain "
                                                        r"http.*https.*allow_insecure_http=True"):
        Client(KEY, base_url=url)
    with pytest.raises(errors.ConfigurationError, match="plain http"):
        connect(KEY, base_url=url)
    c = Client(KEY, base_url=url, allow_insecure_http=True, rate_limiter=False)  # explicit opt-in
    assert c.base_url == url and c.allow_insecure_http


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765", "http://127.3.2.1", "http://localhost:9", "http://[::1]:80"])
def test_plain_http_to_loopback_allowed(url):
    assert Client(KEY, base_url=url, rate_limiter=False).backend == "local"


def test_storage_urls_on_plain_http_refused_before_the_photo_leaves():
    with ScriptedServer() as srv:
        srv.route("POST", "/s2s/v2.0/file", (200, {"status": 200, "data": {"files": [{"file_id": "f" * 20, "requests": [
            {"method": "PUT", "url": "http://uploads.example.com/x.jpg", "headers": {}}]}]}}))
        client = Client(KEY, base_url=srv.url, rate_limiter=False, retry=FAST)
        buf = io.BytesIO()
        Image.new("RGB", (480, 640)).save(buf, "JPEG")
        with pytest.raises(errors.InsecureTransportError, match=r"plain http to uploads.example.com.*https"):
            client.upload(buf.getvalue())
        with pytest.raises(errors.InsecureTransportError, match=r"plain http to results.example.com"):
            client.download("http://results.example.com/r.zip?X-Amz-Signature=abc")
        assert [r["method"] for r in srv.requests] == ["POST"]


# ---------------------------------------------------------------------------- face photos stay where chosen

def test_face_photos_written_only_where_the_user_chose(tmp_path, monkeypatch, local_server, portrait, capsys):
    from skinlab.cli import main
    from skinlab.local.engine import _model

    monkeypatch.setenv("SKINLAB_CACHE_DIR", str(_model.cache_dir()))  # the engine's model, read only
    monkeypatch.setenv("SKINLAB_NO_FETCH", "1")
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "S01_T0.jpg").write_bytes(portrait)
    client = Client(KEY, base_url=local_server.url, rate_limiter=False, poll_schedule=QUICK)

    ledger = Ledger(tmp_path / "study" / "ledger.sqlite", warn_location=False)
    assert ledger.submit(client, photos / "S01_T0.jpg", ["redness"], format="json").ok
    assert ledger.submit(client, photos / "S01_T0.jpg", ["redness"]).ok  # zip
    client.analyze(photos / "S01_T0.jpg", ["wrinkle"])  # in memory only: nothing saved
    ledger.close()
    assert main(["analyze", str(photos / "S01_T0.jpg"), "--actions", "pore", "--base-url", local_server.url,
                 "--out", str(tmp_path / "cli-out")]) == 0
    assert main(["analyze", "--sample", "astronaut", "--actions", "pore", "--base-url", local_server.url,
                 "--out", str(tmp_path / "cli-out")]) == 0  # the sample goes through a temporary folder
    capsys.readouterr()

    images = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    chosen = (photos, tmp_path / "study", tmp_path / "cli-out")
    strays = [p for p in images if not any(p.is_relative_to(c) for c in chosen)]
    assert strays == []
    assert list(home.rglob("*")) == [] and list(cwd.rglob("*")) == [] and list(tmp.rglob("*")) == []
    assert any(p.name == "resize_image.jpg" for p in (tmp_path / "study").rglob("*"))


def test_the_emulator_config_never_shows_the_webhook_secret():
    from skinlab.local.server import ServerConfig

    secret = "whsec_" + "c2tpbmxhYi13ZWJob29rLXNlY3JldC1rZXk="
    config = ServerConfig(webhook_url="http://127.0.0.1:9/hook", webhook_secret=secret)
    assert config.webhook_secret == secret
    assert secret not in repr(config) and "c2tpbmxhYi13" not in repr(config)


def test_a_base_url_with_a_query_is_refused_and_not_echoed(monkeypatch):
    """Paths are appended to base_url, so a query would land inside them; a token put there would
    also be stored with the URL. It is refused, and the message does not repeat the query."""
    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    with pytest.raises(errors.ConfigurationError, match=r"without a query or fragment") as info:
        Client(base_url="http://127.0.0.1:8799/x?token=url-token-secret")
    assert "url-token-secret" not in str(info.value)
    with pytest.raises(errors.ConfigurationError, match=r"Refusing to send face photos and results over plain http"):
        Client(base_url="http://example.invalid")  # no key to send: the message does not speak of one
