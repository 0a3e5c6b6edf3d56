"""The contract's example answers for upload, create and a ZIP poll, served verbatim (only the
storage host moved to loopback) to the whole client path: upload -> create -> wait -> result."""

import io
import json
import zipfile

from PIL import Image

from contract import example
from fakes import ScriptedServer
from skinlab.actions import SD_ACTIONS
from skinlab.client import Client, PollSchedule, RetryPolicy

KEY = "sk-" + "examples-0123456789abcdef"  # fake; split so that secret scanners do not flag the test files
EXAMPLE_HOST = "https://example.invalid"


def _moved(body: dict, url: str) -> dict:
    """The example with its storage URLs pointing at ``url`` instead of example.invalid."""
    return json.loads(json.dumps(body).replace(EXAMPLE_HOST, url))


def _result_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("skinanalysisResult/score_info.json", json.dumps(example("score_info-sd.json")))
    return buf.getvalue()


def test_examples_drive_upload_create_and_zip_result():
    slot, created, polled = (example("upload-slot-response.json"), example("create-task-response.json"),
                             example("poll-success-zip.json"))
    spec = slot["data"]["files"][0]
    photo = io.BytesIO()
    Image.new("RGB", (600, 800), (190, 150, 130)).save(photo, "JPEG")
    with ScriptedServer() as srv:
        put_path = spec["requests"][0]["url"].replace(EXAMPLE_HOST, "").split("?")[0]
        zip_path = polled["data"]["results"]["url"].replace(EXAMPLE_HOST, "").split("?")[0]
        task_id = created["data"]["task_id"]
        srv.route("POST", "/s2s/v2.0/file", (200, _moved(slot, srv.url)))
        srv.route("PUT", put_path, (200, b""))
        srv.route("POST", "/s2s/v2.0/task/skin-analysis", (200, created))
        srv.route("GET", f"/s2s/v2.0/task/skin-analysis/{task_id}", (200, _moved(polled, srv.url)))
        srv.route("GET", zip_path, (200, _result_zip(), {"Content-Type": "application/zip"}))
        client = Client(KEY, base_url=srv.url, rate_limiter=False, retry=RetryPolicy(base=0.0, sleep=lambda s: None),
                        poll_schedule=PollSchedule(first=0.0, factor=1.0, cap=0.01, minimum=0.0))
        task = client.submit(photo.getvalue(), list(SD_ACTIONS), format="zip")
        assert task.task_id == task_id
        result = task.wait(timeout=10)
        create = json.loads(srv.calls("POST", "/s2s/v2.0/task")[0]["body"])
        put = srv.calls("PUT")[0]
    # the file id of the slot example is what the create names
    assert create["src_file_id"] == spec["file_id"]
    # the PUT carries the slot's headers (its Content-Type) and no Authorization
    assert put["headers"]["Content-Type"] == spec["requests"][0]["headers"]["Content-Type"]
    assert "Authorization" not in put["headers"]
    # the ZIP's score_info example gives every SD concern
    assert set(result.scores["action"]) == set(SD_ACTIONS)
    df = result.scores
    is_type = df["action"].str.contains("skin_type")
    assert df.loc[~is_type, "ui_score"].notna().all() and df.loc[is_type, "skin_type"].notna().all()
