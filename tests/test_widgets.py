"""The notebook forms without a browser: every part driven with .click(), .value and the upload
widget's value (ipywidgets 8 and 7 formats) against the local backend.

Widget callbacks swallow exceptions, so the autouse fixture ``widget_errors`` fails any test in
which a callback raised: skinlab's own guard reports bugs to a hook, ipywidgets' callback
dispatcher and the Output context manager are patched to record what they would swallow, and
exceptions in threads and error logs of skinlab are recorded too. ``test_the_error_fixture_*``
shows that the fixture does fail such tests.
"""

from __future__ import annotations

import ast
import datetime as dt
import html
import io
import logging
import sys
import textwrap
import threading
import time
import traceback
import types
from pathlib import Path

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("skimage")

import ipywidgets as widgets  # noqa: E402
import traitlets  # noqa: E402
from ipywidgets.widgets.widget import CallbackDispatcher  # noqa: E402
from PIL import Image  # noqa: E402

import skinlab  # noqa: E402
from skinlab.actions import CATALOGUE, CONCERNS, validate_actions  # noqa: E402
from skinlab.widgets import (  # noqa: E402
    ActionPicker, ImagePicker, ResultViewer, SubmissionsTable, SubmitPanel, add_error_hook, remove_error_hook,
)
from skinlab.widgets import logic  # noqa: E402

pytest_plugins = ("pytester",)

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- the error fixture


@pytest.fixture(autouse=True)
def widget_errors(monkeypatch):
    """Fail the test if any widget callback raised (callbacks swallow exceptions)."""
    errors: list[str] = []

    def hook(exc, where):
        errors.append(f"{where}: " + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    add_error_hook(hook)

    def dispatch(self, *args, **kwargs):  # ipywidgets' CallbackDispatcher.__call__, recording
        value = None
        for callback in self.callbacks:
            try:
                local = callback(*args, **kwargs)
            except Exception:
                errors.append(f"widget callback {callback!r}: {traceback.format_exc()}")
            else:
                value = local if local is not None else value
        return value

    monkeypatch.setattr(CallbackDispatcher, "__call__", dispatch)
    exit_ = widgets.Output.__exit__

    def output_exit(self, etype, evalue, tb):
        if etype is not None:
            errors.append("inside an Output widget: " + "".join(traceback.format_exception(etype, evalue, tb)))
        return exit_(self, etype, evalue, tb)

    monkeypatch.setattr(widgets.Output, "__exit__", output_exit)
    monkeypatch.setattr(threading, "excepthook", lambda a: errors.append(
        f"thread {a.thread.name if a.thread else '?'}: "
        + "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback))))

    class Logged(logging.Handler):
        def emit(self, record):
            errors.append(f"logged by {record.name}: {record.getMessage()}")

    handler = Logged(level=logging.ERROR)
    logger = logging.getLogger("skinlab")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)
        remove_error_hook(hook)
    if errors:
        pytest.fail("a widget callback raised:\n" + "\n".join(errors), pytrace=False)


def test_the_error_fixture_fails_tests_whose_callbacks_raised(pytester):
    pytester.makepyfile(test_inner=textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(TESTS)!r})
        from test_widgets import widget_errors  # noqa: F401  (the autouse fixture under test)
        import ipywidgets as widgets
        from skinlab.widgets import ActionPicker, logic

        def test_button_callback_raises():
            button = widgets.Button()
            button.on_click(lambda _b: 1 / 0)
            button.click()          # ipywidgets swallows the ZeroDivisionError

        def test_guarded_handler_hits_a_bug(monkeypatch):
            picker = ActionPicker()
            monkeypatch.setattr(logic, "selected_actions", lambda *a: None + 1)
            picker.all_button.click()   # the guard shows it in the form and reports it
            assert "This is a bug in skinlab" in picker.feedback.text()

        def test_thread_raises():
            t = threading.Thread(target=lambda: 1 / 0)
            t.start()
            t.join()

        def test_user_errors_are_not_bugs():
            picker = ActionPicker()
            picker.feedback.show_exception(OSError("disk full"), "test")

        def test_clean():
            widgets.Button().click()
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_button_callback_raises*", "a widget callback raised:",
                                 "*ZeroDivisionError*", "*ERROR at teardown of test_guarded_handler_hits_a_bug*",
                                 "*ERROR at teardown of test_thread_raises*"])


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def client():
    with skinlab.Client.local(task_duration_s=0) as c:
        yield c


@pytest.fixture
def ledger(tmp_path):
    led = skinlab.Ledger(tmp_path / "study" / "ledger.sqlite")
    yield led
    led.close()


def jpeg(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=92, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return skinlab.sample_portrait("astronaut", "sd")  # 600 x 800


def upload8(name: str, data: bytes) -> dict:
    """One file as ipywidgets 8 delivers it."""
    return {"name": name, "type": "image/jpeg", "size": len(data), "content": memoryview(data),
            "last_modified": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)}


class FileUpload7(widgets.DOMWidget):
    """The traits of ipywidgets 7's FileUpload: a read-only dict value built from data/metadata."""

    value = traitlets.Dict(read_only=True)
    data = traitlets.List()
    metadata = traitlets.List()
    _counter = traitlets.Int()

    def deliver(self, files: dict[str, bytes]) -> None:
        self.metadata = [{"name": n, "type": "image/jpeg", "size": len(b), "lastModified": 0} for n, b in files.items()]
        self.data = list(files.values())
        self.set_trait("value", {m["name"]: {"metadata": m, "content": b} for m, b in zip(self.metadata, self.data)})
        self._counter += len(files)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- action picker


def test_groups_hold_every_concern_once():
    grouped = [c for _, concerns in logic.CONCERN_GROUPS for c in concerns]
    assert sorted(grouped) == sorted(CONCERNS) and len(grouped) == len(set(grouped))
    for tier in ("sd", "hd"):
        rows = [r for _, rs in logic.concern_rows(tier) for r in rs]
        assert all(text and "\n" not in text for _, _, text in rows)  # one line each


def test_action_picker_tier_switch_cannot_mix_and_units_follow():
    picker = ActionPicker()
    assert picker.selected == [] and "No concern" in picker.units.value
    picker.checkboxes["wrinkle"].value = True
    picker.checkboxes["dark_circle"].value = True
    assert picker.selected == ["wrinkle", "dark_circle_v2"]
    assert "2 concerns (SD): 9 units" in picker.units.value
    picker.tier_toggle.value = "hd"
    assert picker.selected == ["hd_wrinkle", "hd_dark_circle"]
    assert "12 units" in picker.units.value
    assert "also by region" in picker._descriptions["wrinkle"].value  # HD wrinkles are scored by region
    picker.all_button.click()
    assert len(picker.selected) == 16 and {CATALOGUE[n].tier for n in picker.selected} == {"hd"}
    assert "16 concerns (HD): 22 units" in picker.units.value
    picker.tier_toggle.value = "sd"
    assert {CATALOGUE[n].tier for n in picker.selected} == {"sd"} and "16 units" in picker.units.value
    validate_actions(picker.selected)  # always one tier
    picker.none_button.click()
    assert picker.selected == [] and "No concern" in picker.units.value
    # There is no control that sets a tier per concern: every checkbox is a concern.
    assert set(picker.checkboxes) == set(CONCERNS)


def test_action_picker_notifies_once_per_bulk_change():
    picker = ActionPicker()
    calls = []
    picker.on_change(lambda p: calls.append(list(p.selected)))
    picker.all_button.click()
    picker.checkboxes["pore"].value = False
    assert len(calls) == 2 and "pore" not in calls[-1]


# --------------------------------------------------------------------------- image picker


def test_upload_ipywidgets8_format_is_read_and_dropped(face):
    picker = ImagePicker()
    picker.upload.value = (upload8("face.jpg", jpeg(face)), upload8("small.jpg", jpeg(face.resize((300, 400)))))
    assert picker.upload.value == ()  # bytes dropped from the widget state
    assert [i.label for i in picker.items] == ["face.jpg", "small.jpg"]
    ok, small = picker.items
    assert ok.ok and ok.message.startswith("ready: 600x800 JPEG")
    assert small.ok is False and "480" in small.message  # the service would reject it: said before submitting
    assert "removed from the upload widget" in picker.feedback.text()
    assert "small.jpg" in picker.feedback.text()
    assert "1 photo(s) to submit; 1 rejected" in picker.summary.value
    assert len(picker.list_box.children) == 2
    assert [type(s).__name__ for s in picker.sources()] == ["BytesIO"] and picker.sources()[0].name == "face.jpg"


def test_upload_ipywidgets7_format_is_read_and_dropped(face):
    old = FileUpload7()
    picker = ImagePicker(upload=old)
    old.deliver({"a.jpg": jpeg(face), "b.png": b"GIF89a not really"})
    assert old.value == {} and old.data == [] and old.metadata == []
    assert [i.label for i in picker.items] == ["a.jpg", "b.png"]
    assert picker.items[0].ok and picker.items[1].ok is False
    assert "JPEG and PNG" in picker.items[1].message


def test_upload_entries_reads_both_formats():
    v8 = (upload8("x.jpg", b"\xff\xd8\xffabc"),)
    v7 = {"x.jpg": {"metadata": {"name": "x.jpg"}, "content": b"\xff\xd8\xffabc"}}
    assert [(e.name, e.data) for e in logic.upload_entries(v8)] == [("x.jpg", b"\xff\xd8\xffabc")]
    assert [(e.name, e.data) for e in logic.upload_entries(v7)] == [("x.jpg", b"\xff\xd8\xffabc")]
    assert logic.upload_entries(()) == [] and logic.upload_entries({}) == []


def test_thumbnails_are_upright_from_exif(face):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = jpeg(face.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())  # stored 800 x 600
    picker = ImagePicker()
    picker.upload.value = (upload8("rotated.jpg", data),)
    item = picker.items[0]
    thumb = Image.open(io.BytesIO(item.thumbnail))
    assert thumb.height > thumb.width  # a portrait, as the person stood
    assert item.ok and "600x800" in item.message
    assert any("rotated upright" in c for c in item.changes)
    assert "pre-flight will: rotated upright" in picker.list_box.children[0].children[1].value


def test_upload_limit_is_stated_with_a_pointer_to_the_path_chooser():
    raised = ImagePicker(upload_limit_mb=25).upload_note.value
    assert "at most 25 MiB per upload" in raised and "at most 10 MiB" not in raised  # the parameter is used
    default = ImagePicker().upload_note.value
    assert "at most 10 MiB per upload" in default
    text = logic.upload_limit_text()
    assert html.escape(text) in default and "path chooser" in text
    # where 10 MiB comes from, and how to raise it
    assert "10 MiB is the default of Jupyter Server (JupyterLab, Notebook 7) and Voilà" in text
    assert "Tornado's websocket_max_message_size" in text
    assert """--ServerApp.tornado_settings="{'websocket_max_message_size': 104857600}" (100 MiB""" in text
    assert "--Voila.tornado_settings" in text and "upload_limit_mb=100" in text


def test_path_chooser_browses_and_adds_a_folder(tmp_path, face):
    photos = tmp_path / "photos"
    (photos / "visit2").mkdir(parents=True)
    (photos / "S01_T0.jpg").write_bytes(jpeg(face))
    (photos / "S02_T0.jpg").write_bytes(jpeg(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    (photos / "notes.txt").write_text("not a photo")
    picker = ImagePicker(start_dir=str(tmp_path))
    assert ("photos/", str(photos)) in picker.browse.options
    picker.browse.value = str(photos)  # choosing a folder opens it
    assert picker.path.value == str(photos)
    labels = [label for label, _ in picker.browse.options]
    assert labels == ["../", "visit2/", "S01_T0.jpg", "S02_T0.jpg"]
    picker.add_path_button.click()
    assert [i.label for i in picker.items] == ["S01_T0.jpg", "S02_T0.jpg"] and all(i.ok for i in picker.items)
    picker.add_path_button.click()  # the same again: not duplicated
    assert len(picker.items) == 2 and "already in the list" in picker.feedback.text()
    picker.browse.value = str(photos / "S01_T0.jpg")  # choosing a photo fills the path
    assert picker.path.value == str(photos / "S01_T0.jpg")
    picker.path.value = str(tmp_path / "missing")
    picker.add_path_button.click()
    assert "No such file or folder" in picker.feedback.messages[-1][1]
    assert len(picker.items) == 2
    remove = picker.list_box.children[0].children[2]
    remove.click()
    assert [i.label for i in picker.items] == ["S02_T0.jpg"]
    picker.clear_button.click()
    assert picker.items == [] and picker.list_box.children == ()


def test_url_field_and_sample_portrait():
    picker = ImagePicker()
    picker.url.value = "not a url"
    picker.add_url_button.click()
    assert picker.items == [] and "http(s) URL" in picker.feedback.messages[-1][1]
    picker.url.value = "https://example.org/photos/face.jpg?x=1"
    picker.add_url_button.click()
    assert picker.items[0].label == "face.jpg" and picker.items[0].ok is None and picker.url.value == ""
    picker.sample.value = "grace_hopper"
    picker.add_sample_button.click()
    sample = picker.items[1]
    assert sample.label == "grace_hopper_sd.jpg" and sample.ok and sample.thumbnail
    assert picker.sources()[0] == "https://example.org/photos/face.jpg?x=1"


def test_switching_to_hd_checks_again_and_regenerates_samples(face):
    picker = ImagePicker()
    picker.upload.value = (upload8("face.jpg", jpeg(face)),)
    picker.add_sample_button.click()
    picker.set_tier("hd")
    upload, sample = picker.items
    assert upload.ok is False and "1080" in upload.message
    assert sample.ok and sample.label == "astronaut_hd.jpg" and "1080x1440" in sample.message
    assert "do not fit HD" in picker.feedback.text()


# --------------------------------------------------------------------------- submit panel


def test_submit_panel_alone_runs_off_the_main_thread_and_records_tags(ledger, client, tmp_path, face):
    path = tmp_path / "S01.jpg"
    path.write_bytes(jpeg(face))
    panel = SubmitPanel(ledger, actions=["wrinkle", "redness"], images=[str(path)], client=client)
    assert "LOCAL" in panel.backend.value and "nothing is billed" in panel.cost.value
    threads = []
    panel.on_item(lambda item: threads.append(threading.current_thread()))
    panel.subject.value, panel.timepoint.value, panel.condition.value = "S01", "T0", "placebo"
    panel.notes.value = "left cheek"
    panel.submit_button.click()
    assert panel.join(60)
    assert threads and all(t is not threading.main_thread() for t in threads)
    df = ledger.submissions()
    assert len(df) == 1 and df.loc[0, "status"] == "success"
    assert (df.loc[0, "subject"], df.loc[0, "timepoint"], df.loc[0, "condition"], df.loc[0, "tag_notes"]) == \
        ("S01", "T0", "placebo", "left cheek")
    assert panel.progress.value == 1 and panel.progress.bar_style == "success"
    assert "S01.jpg" in panel.items_html.value and "done (submission #1)" in panel.items_html.value
    assert "done 1" in panel.feedback.text()
    assert not panel.submit_button.disabled and panel.stop_button.disabled


def test_submit_panel_states_the_cloud_backend_and_its_cost(ledger, monkeypatch):
    """A cloud client: the panel names the service and the units the photos would cost (nothing is
    sent to build the panel). A local client chosen while a key is set says the key is not used."""
    monkeypatch.setenv("SKINLAB_API_KEY", "panel-cloud-key")
    with skinlab.Client(base_url="https://skin-analysis.example") as cloud:
        assert cloud.backend == "cloud"
        panel = SubmitPanel(ledger, actions=["wrinkle", "redness", "pore", "acne", "texture"],
                            images=["a.jpg", "b.jpg"], client=cloud)
        assert "YouCam CLOUD at https://skin-analysis.example" in panel.backend.value
        assert "12 units per successful photo; 2 photos = up to 24 units" in panel.cost.value
        assert "nothing is billed" not in panel.cost.value
    local = skinlab.Client.local()
    try:
        assert "your API key is not used" in logic.backend_summary(local)
        monkeypatch.delenv("SKINLAB_API_KEY")
        monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
        assert "(no API key set)" in logic.backend_summary(local)
    finally:
        local.close()


def test_double_click_never_makes_two_tasks(ledger, face):
    with skinlab.Client.local(task_duration_s=1.0) as slow:
        picker = ImagePicker()
        picker.upload.value = (upload8("face.jpg", jpeg(face)),)
        panel = SubmitPanel(ledger, actions=["pore"], images=picker, client=slow)
        t0 = time.monotonic()
        panel.submit_button.click()
        assert time.monotonic() - t0 < 0.5  # the click returns at once: the work is in a thread
        assert panel.running and panel.submit_button.disabled and not panel.stop_button.disabled
        panel.submit_button.click()
        assert "already running" in panel.feedback.text()
        assert panel.join(60)
        assert panel.runner.runs == 1 and len(ledger) == 1
        assert not panel.submit_button.disabled


def test_submit_errors_are_shown_in_the_form(ledger, client, face):
    panel = SubmitPanel(ledger, actions=[], images=[], client=client)
    panel.submit_button.click()
    assert "Choose at least one concern" in panel.feedback.messages[-1][1]
    panel.actions = ["wrinkle"]
    panel.submit_button.click()
    assert "at least one photo" in panel.feedback.messages[-1][1]
    # pre-flight rejects are left out and named; a photo without a face fails at the service
    picker = ImagePicker()
    import numpy as np

    noise = Image.fromarray((np.random.default_rng(1).random((800, 600, 3)) * 255).astype("uint8"))
    picker.upload.value = (upload8("tiny.jpg", jpeg(face.resize((240, 320)))), upload8("noise.jpg", jpeg(noise)))
    panel.images = picker
    panel.submit_button.click()
    assert panel.join(60)
    text = panel.feedback.text()
    assert "Left out" in text and "tiny.jpg" in text
    assert "failed 1" in text and "No face" in text
    assert "failed" in panel.items_html.value and "noise.jpg" in panel.items_html.value
    assert panel.progress.bar_style == "warning"
    assert ledger.submissions().loc[0, "error_code"] == "error_no_face"


def test_stop_starts_no_new_photos(ledger, face):
    with skinlab.Client.local(task_duration_s=0.6) as slow:
        images = []
        for i in range(3):
            buf = io.BytesIO(jpeg(face.rotate(i + 1)))
            buf.name = f"p{i}.jpg"
            images.append(buf)
        panel = SubmitPanel(ledger, actions=["texture"], images=images, client=slow, max_workers=1)
        panel.submit_button.click()
        panel.stop_button.click()
        assert panel.join(60)
        outcomes = [i.outcome for i in panel.report.items]
        assert outcomes.count("interrupted") >= 1 and len(ledger) < 3
        assert "not started" in panel.items_html.value


def test_skinlab_log_warnings_of_a_run_go_to_the_form_not_stderr(ledger, client, tmp_path, face, capsys,
                                                                  monkeypatch):
    """batch logs "could not fetch the unit balance" (a dry run asks for the balance); in a notebook
    no handler takes that record, so logging's last resort wrote it to stderr, outside the form.
    Here as in a notebook: no handler on the way (pytest's and this file's are set aside)."""
    def down():
        raise skinlab.errors.ServerError("credit endpoint down (HTTP 503)")

    monkeypatch.setattr(client, "balance", down)
    path = tmp_path / "S01.jpg"
    path.write_bytes(jpeg(face))
    panel = SubmitPanel(ledger, actions=["wrinkle"], images=[str(path)], client=client, dry_run=True)
    logger = logging.getLogger("skinlab")
    saved = list(logger.handlers), logger.propagate, logger.level
    for h in saved[0]:
        logger.removeHandler(h)
    logger.propagate, logger.level = False, logging.WARNING
    try:
        panel.submit_button.click()
        assert panel.join(60)
        assert logger.handlers == []  # the form's handler is there only while the run is
        logger.warning("after the run")  # outside a run: where records always go
    finally:
        for h in saved[0]:
            logger.addHandler(h)
        logger.propagate, logger.level = saved[1], saved[2]
    assert ("warn", "could not fetch the unit balance: credit endpoint down (HTTP 503)") in panel.feedback.messages
    assert "after the run" not in panel.feedback.text()
    assert "dry run" in panel.feedback.text().lower()  # the run itself finished and reported
    assert not [m for level, m in panel.feedback.messages if level == "error"]
    out = capsys.readouterr()
    assert out.out == "" and out.err == "after the run\n"


def test_check_balance_goes_to_the_output(ledger, client):
    panel = SubmitPanel(ledger, actions=["wrinkle"], images=[], client=client)
    panel.balance_button.click()
    assert "Unit balance on the local backend" in panel.feedback.messages[-1][1]


# --------------------------------------------------------------------------- table and viewer


def _run(ledger, client, images, actions, **tags):
    report = skinlab.batch.analyze_many(images, actions, ledger=ledger, client=client, tags=tags, progress=False)
    return report.ids


def test_submissions_table_filters_by_status_and_tag(ledger, client, face):
    import numpy as np

    a = io.BytesIO(jpeg(face)); a.name = "a.jpg"  # noqa: E702
    b = io.BytesIO(jpeg(face.rotate(2))); b.name = "b.jpg"  # noqa: E702
    n = io.BytesIO(jpeg(Image.fromarray((np.random.default_rng(2).random((800, 600, 3)) * 255).astype("uint8"))))
    n.name = "noise.jpg"
    _run(ledger, client, [a], ["wrinkle"], subject="S01", notes="first visit")
    _run(ledger, client, [b], ["wrinkle"], subject="S02")
    _run(ledger, client, [n], ["wrinkle"], subject="S02")
    table = SubmissionsTable(ledger)
    assert [v for _, v in table.choose.options] == [3, 2, 1]  # newest first
    assert table.choose.value == 3
    table.tag.value = "S01"
    assert [v for _, v in table.choose.options] == [1]
    table.tag.value = "subject=S02"
    assert [v for _, v in table.choose.options] == [3, 2]
    table.tag.value = "notes=first visit"
    assert [v for _, v in table.choose.options] == [1]
    table.tag.value = "visit"
    assert [v for _, v in table.choose.options] == [1]
    table.tag.value = ""
    table.status.value = "error"
    assert [v for _, v in table.choose.options] == [3]
    assert "error_no_face" in table.table.value
    table.status.value = ""
    assert "3 of 3" in table.count.value and "<script" not in table.table.value
    chosen = []
    table.on_select(chosen.append)
    table.choose.value = 1
    assert chosen == [1] and "background:#eef5fb" in table.table.value


def test_table_refresh_button_picks_up_new_rows(ledger, client, face):
    table = SubmissionsTable(ledger)
    assert table.choose.options == () and "No submissions" in table.table.value
    a = io.BytesIO(jpeg(face)); a.name = "a.jpg"  # noqa: E702
    _run(ledger, client, [a], ["acne"])
    table.refresh_button.click()
    assert [v for _, v in table.choose.options] == [1]


def test_result_viewer_shows_scores_and_masks(ledger, client, face):
    a = io.BytesIO(jpeg(face)); a.name = "a.jpg"  # noqa: E702
    (sid,) = _run(ledger, client, [a], ["wrinkle", "redness"], subject="S01")
    viewer = ResultViewer(ledger)
    viewer.show(sid)
    assert "Submission #1" in viewer.header.value and "subject=S01" in viewer.header.value
    assert "Wrinkles" in viewer.scores.value and "Redness" in viewer.scores.value
    assert viewer.mask_image.layout.display == "none"  # no face until asked
    labels = [label for label, _ in viewer.mask.options]
    assert labels[1:] == ["Wrinkles", "Redness"]
    viewer.mask.value = ("redness", "whole")
    png = Image.open(io.BytesIO(viewer.mask_image.value))
    assert png.format == "PNG" and viewer.mask_image.layout.display == ""
    viewer.mask.value = None
    assert viewer.mask_image.layout.display == "none"
    viewer.profile.value = True
    assert Image.open(io.BytesIO(viewer.profile_image.value)).format == "PNG"
    viewer.show(None)
    assert viewer.scores.value == "" and viewer.profile.value is False


def test_result_viewer_explains_a_failed_submission(ledger, client):
    import numpy as np

    n = io.BytesIO(jpeg(Image.fromarray((np.random.default_rng(3).random((800, 600, 3)) * 255).astype("uint8"))))
    n.name = "noise.jpg"
    (sid,) = _run(ledger, client, [n], ["wrinkle"])
    viewer = ResultViewer(ledger, sid)
    assert "error_no_face" in viewer.header.value and "Next step" in viewer.header.value
    assert viewer.scores.value == ""


# --------------------------------------------------------------------------- the whole form


def test_app_end_to_end_without_writing_code(tmp_path, client, capsys):
    form = skinlab.app(ledger=tmp_path / "study" / "ledger.sqlite", client=client, start_dir=str(tmp_path))
    assert isinstance(form, widgets.VBox)
    assert "study/ledger.sqlite" in form.children[0].value
    form.actions.checkboxes["wrinkle"].value = True
    form.actions.checkboxes["pore"].value = True
    form.images.add_sample_button.click()
    assert "9 units per photo" in form.actions.units.value and "1 photo = 9 units" in form.submit.cost.value
    form.submit.subject.value = "S01"
    form.submit.submit_button.click()
    assert form.submit.join(60)
    assert wait_for(lambda: form.table.choose.options and form.viewer.submission is not None)
    assert [v for _, v in form.table.choose.options] == [1]
    assert "astronaut_sd.jpg" in form.table.table.value and "success" in form.table.table.value
    assert form.viewer.submission.id == 1 and "Wrinkles" in form.viewer.scores.value
    # the tier switch reaches the image picker: the SD sample is regenerated for HD
    form.actions.tier_toggle.value = "hd"
    assert form.images.items[0].label == "astronaut_hd.jpg" and "22" not in form.submit.cost.value
    assert "12 units per photo" in form.actions.units.value
    # submitting the same photo and actions again reuses the recorded result: no second task
    form.actions.tier_toggle.value = "sd"
    form.submit.submit_button.click()
    assert form.submit.join(60)
    assert len(form.ledger) == 1 and "reused 1" in form.feedback.text()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # every message went to the form's own output area
    form.ledger.close()


def test_the_form_is_made_of_standard_ipywidgets_8_controls_only(tmp_path, client):
    """Every widget of the whole form, after a submission has filled the table and the viewer, is a
    stock ipywidgets 8 control (no custom front-end code), so it renders wherever ipywidgets does."""
    form = skinlab.app(ledger=tmp_path / "study" / "ledger.sqlite", client=client, start_dir=str(tmp_path))
    form.actions.checkboxes["redness"].value = True
    form.images.add_sample_button.click()
    form.submit.submit_button.click()
    assert form.submit.join(60)
    assert wait_for(lambda: form.viewer.submission is not None)
    seen, stack = [], [form]
    while stack:
        w = stack.pop()
        if any(w is s for s in seen):
            continue
        seen.append(w)
        for name in w.keys:  # every trait that holds widgets (children, layouts, styles, ...)
            value = getattr(w, name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, widgets.Widget):
                    stack.append(v)
    stock = {"@jupyter-widgets/controls", "@jupyter-widgets/base", "@jupyter-widgets/output"}
    for w in seen:
        assert w._model_module in stock and w._view_module in stock, (type(w), w._model_module)
        assert w._model_module_version.split(".")[0] in ("1", "2"), (type(w), w._model_module_version)
        assert type(w).__module__.startswith(("ipywidgets.", "skinlab.widgets.")), type(w)
    kinds = {type(w).__name__ for w in seen}
    assert {"Checkbox", "ToggleButtons", "FileUpload", "Button", "Text", "HTML", "Output"} <= kinds, kinds
    form.ledger.close()


def test_app_is_registered_lazily():
    assert skinlab.app is skinlab.widgets.app
    code = "import sys, skinlab; print('ipywidgets' in sys.modules)"
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_the_note_on_widget_state_matches_what_the_form_keeps(tmp_path, client, face):
    """The form says: uploaded bytes are dropped; thumbnails and result images are widget state
    (saved only with "Save Widget State Automatically" on: leave it off); clear_images() or closing
    the form empties them. Each claim is checked against the widgets."""
    form = skinlab.app(ledger=tmp_path / "study" / "ledger.sqlite", client=client, start_dir=str(tmp_path))
    note = form.images.upload_note.value
    assert html.escape(logic.widget_state_text()) in note
    assert "not saved inside the notebook" not in note  # no longer claimed outright
    for claim in ("their bytes are removed from the upload widget", "thumbnails", "result viewer",
                  "Save Widget State Automatically", "off by default; leave it off", "clear_images()",
                  "closing the form"):
        assert html.escape(claim) in note, claim
    data = jpeg(face)
    form.images.upload.value = (upload8("face.jpg", data),)
    assert form.images.upload.value == ()  # "bytes are removed from the upload widget"
    form.actions.checkboxes["wrinkle"].value = True
    form.submit.submit_button.click()
    assert form.submit.join(60)
    assert wait_for(lambda: form.viewer.submission is not None)
    form.viewer.mask.value = ("wrinkle", "whole")
    form.viewer.profile.value = True

    def tree(root):
        seen, stack = [], [root]
        while stack:
            w = stack.pop()
            if not any(w is x for x in seen):
                seen.append(w)
                stack.extend(c for c in getattr(w, "children", ()) if isinstance(c, widgets.Widget))
        return seen

    def pictures(root):  # every widget trait holding bytes: where a photo could be kept
        found = []
        for w in tree(root):
            for name in w.keys:
                value = getattr(w, name, None)
                if isinstance(value, (bytes, memoryview)) and len(value):
                    found.append((w, name, bytes(value)))
        return found

    held = pictures(form)
    assert all(isinstance(w, widgets.Image) and name == "value" for w, name, _ in held)  # images only
    assert not any(data in value for *_, value in held)  # the upload itself is nowhere
    images = form.image_widgets()
    assert len(images) == 3 and {id(w) for w, *_ in held} == {id(w) for w in images}  # thumbnail, mask, plot
    for image in images:
        assert Image.open(io.BytesIO(image.value)).format == "PNG"  # "are widget state": they are
    # hiding a result image empties it (display:none alone would keep the PNG in the state)
    form.viewer.mask.value = None
    assert form.viewer.mask_image.value == b""
    form.viewer.mask.value = ("wrinkle", "whole")
    assert form.viewer.mask_image.value
    form.clear_images()
    assert [bytes(i.value) for i in images] == [b""] * 3 and pictures(form) == []
    assert form.images.items and "preview cleared" in form.images.list_box.children[0].children[0].value
    assert form.viewer.mask.value is None and form.viewer.profile.value is False
    assert "Wrinkles" in form.viewer.scores.value  # the scores stay
    # closing the form empties the images too, and closes every widget in it
    form.viewer.mask.value = ("wrinkle", "whole")
    form.images.upload.value = (upload8("again.jpg", jpeg(face.rotate(3))),)
    images = form.image_widgets()
    assert len(images) == 3 and all(len(i.value) for i in images[:2])
    widgets_before = tree(form)
    form.close()
    assert [bytes(i.value) for i in images] == [b""] * 3
    assert all(w.comm is None for w in widgets_before)
    form.ledger.close()


def test_widgets_never_print():
    """Every message of the forms goes to their output area (or is returned to the command line):
    no print() call in skinlab/widgets."""
    folder = Path(skinlab.widgets.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert {"serve.py", "image_picker.py", "logic.py"} <= {f.name for f in files}
    calls = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == "print") or (isinstance(f, ast.Attribute) and f.attr == "print"
                                                                     and isinstance(f.value, ast.Name)
                                                                     and f.value.id in ("builtins", "__builtins__")):
                    calls.append(f"{path.name}:{node.lineno}")
    assert calls == [], f"print() in skinlab/widgets: {calls}"


def test_cli_app_says_where_it_serves_and_when_voila_is_missing(tmp_path, monkeypatch, capsys):
    """serve() prints nothing: the command line prints its announcement, and the message when Voilà is
    missing (on stderr, exit code 2)."""
    from skinlab.cli import build_parser
    from skinlab.widgets import serve

    monkeypatch.chdir(tmp_path)
    package = types.ModuleType("voila")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "voila", package)
    monkeypatch.setitem(sys.modules, "voila.app", None)  # import fails: Voilà not installed
    args = build_parser().parse_args(["app", "--no-browser", "--port", "9911"])
    assert args.func(args) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "skinlab app needs Voilà: pip install 'skinlab[app]'\n"
    with pytest.raises(serve.VoilaMissing):
        serve.serve()

    launched = []
    app_module = types.ModuleType("voila.app")
    app_module.Voila = types.SimpleNamespace(launch_instance=lambda argv: launched.append(argv))
    monkeypatch.setitem(sys.modules, "voila.app", app_module)
    assert args.func(args) == 0
    out = capsys.readouterr()
    ledger = tmp_path / "skinlab-study" / "ledger.sqlite"
    assert out.out == (f"skinlab: serving the form at http://127.0.0.1:9911/ (ledger {ledger}); Ctrl-C to stop\n")
    assert out.err == ""
    assert "--port=9911" in launched[0] and "--no-browser" in launched[0]
    assert serve.serve(port=9912, open_browser=False) == 0  # no announce: silent
    assert capsys.readouterr() == ("", "") and "--port=9912" in launched[1]


def test_cli_app_subcommand_and_its_notebook(tmp_path):
    from skinlab.cli import build_parser
    from skinlab.widgets import serve

    args = build_parser().parse_args(["app", "--ledger", "x.sqlite", "--port", "9999", "--no-browser"])
    assert (args.ledger, args.port, args.no_browser) == ("x.sqlite", 9999, True)
    assert args.func.__name__ == "_cmd_app"
    nb = serve.write_notebook(tmp_path, tmp_path / "led.sqlite", tmp_path)
    import json

    source = json.loads(nb.read_text())["cells"][0]["source"]
    assert "skinlab.app(ledger=" in source and str(tmp_path / "led.sqlite") in source
    compile(source, "cell", "exec")


def test_a_decompression_bomb_is_never_decoded_for_its_thumbnail(monkeypatch):
    """The thumbnail used to decode a 13000 x 13000 upload in full (650 MB) before pre-flight
    refused it as a bomb; now the declared size is read from the header and nothing is decoded."""
    import struct
    import zlib

    from PIL import ImageFile

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    assert logic.thumbnail_png(bomb) is None and loads == []
    small = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 150, 130)).save(small, format="PNG")
    assert logic.thumbnail_png(small.getvalue()).startswith(b"\x89PNG") and loads  # ordinary photos still load


def test_a_greyscale_upload_is_left_out_while_colour_concerns_are_ticked(ledger, client, face):
    """A greyscale photo passes pre-flight, but the submission would refuse it with colour concerns:
    the cost line says it is left out (and is not counted) while they are ticked, Submit leaves it
    out with the reason in the form, and unticking them takes it back. Upload names that are
    Windows paths keep only the file name."""
    picker = ImagePicker()
    picker.upload.value = (upload8("C:\\Users\\someone\\grey.jpg", jpeg(face.convert("L"))),
                           upload8("colour.jpg", jpeg(face)))
    assert [i.label for i in picker.items] == ["grey.jpg", "colour.jpg"]
    assert [i.greyscale for i in picker.items] == [True, False]
    actions = ActionPicker()
    actions.checkboxes["wrinkle"].value = True
    actions.checkboxes["redness"].value = True
    panel = SubmitPanel(ledger, actions=actions, images=picker, client=client)
    assert "1 photo = 9 units" in panel.cost.value and "grey.jpg (greyscale" in panel.cost.value
    panel.submit_button.click()
    assert panel.join(60)
    assert "grey.jpg: a greyscale photo: the colour concerns ticked (Redness) cannot be measured" in panel.feedback.text()
    assert list(ledger.submissions().image_name) == ["colour.jpg"]
    actions.checkboxes["redness"].value = False
    assert "2 photos" in panel.cost.value and "greyscale" not in panel.cost.value
