"""skinlab.webhooks.verify (contract §8.7): webhooks the emulator really posts are accepted, and
tampered bodies, other secrets, stale timestamps, missing headers and malformed secrets refused.

The emulator (``LocalServer`` with ``webhook_url`` and ``webhook_secret``) posts to a small
loopback receiver; the checks then run on the recorded deliveries, headers as ``http.server``
hands them over.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler

import pytest

import skinlab
from fakes import LoopbackServer
from skinlab import errors, webhooks
from skinlab.client import Client, PollSchedule

KEY_BYTES = b"skinlab-webhook-test-key-0123456789"
SECRET = "whsec_" + base64.b64encode(KEY_BYTES).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-endpoint-secret-key-98765").decode()
NEVER_UPLOADED = "sKu1/dDKFvwQ2i6r7fPZMV9m4e/1gNdC9CQTQPphsFMnVic/sUTUk+2w7IxDtFjQ="


class Receiver(LoopbackServer):
    """A loopback endpoint recording each POST as (headers object, raw body); answers 204."""

    def __init__(self, expect: int):
        self.received: list[tuple[object, bytes]] = []
        self.done = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((self.headers, body))
                self.send_response(204)
                self.end_headers()
                if len(outer.received) >= expect:
                    outer.done.set()

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.url += "/hook"


@pytest.fixture(scope="module")
def deliveries():
    """Two real deliveries from the emulator: a task that succeeds and one that fails."""
    from skinlab.local import LocalServer
    from skinlab.samples import sample_portrait

    buf = io.BytesIO()
    sample_portrait("astronaut", "sd").save(buf, "JPEG", quality=92)
    with Receiver(expect=2) as hook:
        server = LocalServer(task_duration_s=0, webhook_url=hook.url, webhook_secret=SECRET)
        server.start()
        try:
            with Client(base_url=server.url, rate_limiter=False,
                        poll_schedule=PollSchedule(first=0.05, cap=0.2)) as client:
                ok = client.submit(buf.getvalue(), ["redness"])
                bad = client.submit(NEVER_UPLOADED, ["redness"])      # ends in error: bytes never uploaded
                ok.wait(timeout=60)
                with pytest.raises(errors.TaskError):
                    bad.wait(timeout=60)
            assert hook.done.wait(20), "the emulator posted no webhooks"
        finally:
            server.stop()
    return {"tasks": {ok.task_id: "success", bad.task_id: "error"}, "received": list(hook.received)}


def _lower(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _sign(key: bytes, msg_id: str, stamp: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()


def test_verifies_the_webhooks_the_emulator_posts(deliveries):
    statuses = {}
    for headers, body in deliveries["received"]:
        event = webhooks.verify(body, headers, SECRET)                # http.server's headers object, as received
        assert event == json.loads(body) and set(event) == {"created_at", "data"}
        statuses[event["data"]["task_id"]] = event["data"]["task_status"]
        assert webhooks.verify(body.decode(), dict(headers.items()), SECRET) == event     # str body, plain dict
        assert webhooks.verify(body, list(headers.items()), KEY_BYTES) == event           # pairs, decoded key
        assert webhooks.verify(body, {k.upper(): v for k, v in headers.items()}, SECRET) == event
    assert statuses == deliveries["tasks"]
    assert skinlab.webhooks.verify is webhooks.verify                 # reachable lazily from the package


def test_rejects_a_tampered_body(deliveries):
    headers, body = deliveries["received"][0]
    event = json.loads(body)
    forged = {**event, "data": {**event["data"], "task_status": "error" if event["data"]["task_status"] ==
                                "success" else "success"}}
    for tampered in (json.dumps(forged, separators=(",", ":")).encode(), body + b" ", body.replace(b":", b": ", 1)):
        with pytest.raises(errors.WebhookSignatureError, match="no signature matches") as info:
            webhooks.verify(tampered, headers, SECRET)
        assert info.value.code == "bad_signature"


def test_rejects_a_wrong_secret(deliveries):
    headers, body = deliveries["received"][0]
    with pytest.raises(errors.WebhookSignatureError, match="another secret") as info:
        webhooks.verify(body, headers, OTHER_SECRET)
    assert info.value.code == "bad_signature"
    assert SECRET[6:] not in str(info.value) and OTHER_SECRET[6:] not in str(info.value)   # secrets not echoed


def test_rejects_an_old_or_future_timestamp(deliveries):
    headers, body = deliveries["received"][0]
    stamp = int(_lower(headers)["webhook-timestamp"])
    assert webhooks.verify(body, headers, SECRET, now=stamp + 299)      # within the 300 s default
    assert webhooks.verify(body, headers, SECRET, now=stamp - 299)
    with pytest.raises(errors.WebhookSignatureError, match="301 s old.*replay") as info:
        webhooks.verify(body, headers, SECRET, now=stamp + 301)
    assert info.value.code == "stale_timestamp"
    with pytest.raises(errors.WebhookSignatureError, match="in the future"):
        webhooks.verify(body, headers, SECRET, now=stamp - 301)
    with pytest.raises(errors.WebhookSignatureError):
        webhooks.verify(body, headers, SECRET, now=stamp + 31, tolerance_s=30)
    assert webhooks.verify(body, headers, SECRET, now=stamp + 86400, tolerance_s=None)   # stored message


def test_rejects_a_timestamp_moved_forward(deliveries):
    """Refreshing an old message's timestamp to pass the tolerance breaks its signature."""
    headers, body = deliveries["received"][0]
    moved = {**_lower(headers), "webhook-timestamp": str(int(_lower(headers)["webhook-timestamp"]) + 1000)}
    with pytest.raises(errors.WebhookSignatureError, match="no signature matches"):
        webhooks.verify(body, moved, SECRET, now=int(moved["webhook-timestamp"]))


def test_several_space_separated_signatures(deliveries):
    headers, body = deliveries["received"][0]
    h = _lower(headers)
    real = h["webhook-signature"]
    bogus = "v1," + base64.b64encode(b"x" * 32).decode()
    rotated = "v1," + _sign(base64.b64decode(OTHER_SECRET[6:]), h["webhook-id"], h["webhook-timestamp"], body)
    for value in (f"{bogus} {real}", f"{real} {bogus}", f"v1a,{real[3:]} {rotated} {real}", f"  {real}  "):
        assert webhooks.verify(body, {**h, "webhook-signature": value}, SECRET)["data"]
    assert webhooks.verify(body, {**h, "webhook-signature": f"{real} {rotated}"}, OTHER_SECRET)   # secret rotation
    for value in (f"{bogus} {rotated}", f"v1a,{real[3:]}", real[3:], ""):
        with pytest.raises(errors.WebhookSignatureError) as info:
            webhooks.verify(body, {**h, "webhook-signature": value}, SECRET)
        assert info.value.code in ("bad_signature", "missing_headers")


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_rejects_missing_headers(deliveries, header):
    headers, body = deliveries["received"][0]
    h = {k: v for k, v in _lower(headers).items() if k != header}
    with pytest.raises(errors.WebhookSignatureError, match=f"missing header.*{header}") as info:
        webhooks.verify(body, h, SECRET)
    assert info.value.code == "missing_headers"


def test_rejects_a_signed_but_malformed_timestamp_and_a_non_json_body():
    h = {"webhook-id": "msg_1", "webhook-timestamp": "yesterday"}
    h["webhook-signature"] = "v1," + _sign(KEY_BYTES, "msg_1", "yesterday", b"{}")
    with pytest.raises(errors.WebhookSignatureError, match="not Unix seconds") as info:
        webhooks.verify(b"{}", h, SECRET)
    assert info.value.code == "bad_timestamp"
    h = {"webhook-id": "msg_2", "webhook-timestamp": "1767225600"}
    h["webhook-signature"] = "v1," + _sign(KEY_BYTES, "msg_2", "1767225600", b"not json")
    with pytest.raises(errors.ResultFormatError, match="not a JSON object"):
        webhooks.verify(b"not json", h, SECRET, now=1767225600)


@pytest.mark.parametrize("secret", [
    "sk-quirks-1234567890abcdef",                 # an API key, not a webhook secret
    base64.b64encode(KEY_BYTES).decode(),         # the base64 without its whsec_ prefix
    "whsec_not*base64!", "whsec_", b"", None, 42])
def test_rejects_a_malformed_secret(deliveries, secret):
    headers, body = deliveries["received"][0]
    with pytest.raises(errors.ConfigurationError, match="webhook secret") as info:
        webhooks.verify(body, headers, secret)
    assert "sk-quirks" not in str(info.value)


def test_payload_must_be_the_raw_body(deliveries):
    headers, body = deliveries["received"][0]
    with pytest.raises(TypeError, match="raw request body"):
        webhooks.verify(json.loads(body), headers, SECRET)


def test_comparison_is_constant_time(monkeypatch, deliveries):
    headers, body = deliveries["received"][0]
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(webhooks.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    h = _lower(headers)
    webhooks.verify(body, {**h, "webhook-signature": f"{h['webhook-signature']} v1,AAAA"}, SECRET)
    assert len(calls) == 2                                              # every candidate, through compare_digest


def test_webhooks_module_stays_light():
    code = ("import sys, skinlab.webhooks; heavy = [m for m in ('requests', 'pandas', 'numpy', 'PIL') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import skinlab.webhooks pulled in {out}"
