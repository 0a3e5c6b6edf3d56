"""The forms in a real browser: ``skinlab app`` (Voilà) on 127.0.0.1, driven by Playwright with
Debian's Chromium (/usr/bin/chromium). Screenshots go to ``test-artifacts/browser/``.

Run only these with ``pytest -m browser``; they are skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answers(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer: the server is up (this URL starts no kernel)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout:g} s:\n{log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started, by its process id (Voilà shuts its kernels down on SIGTERM)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session, started below: our processes only
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tmp_path_factory.mktemp("browser-study")


@pytest.fixture(scope="module")
def voila(study):
    """``skinlab app`` serving the form on a free port of 127.0.0.1 (local backend: no API key)."""
    pytest.importorskip("voila")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}
    log = study / "voila.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "skinlab.cli", "app", "--ledger", str(study / "study" / "ledger.sqlite"),
             "--port", str(port), "--no-browser"],
            cwd=study, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_answers(f"http://127.0.0.1:{port}/voila/static/", proc, log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=45_000)  # an analysis in the page's kernel takes a few seconds
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 3000})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector(".skinlab-app", timeout=90_000)
    return page


def test_voila_pick_actions_and_sample_submit_see_row_and_scores(voila, browser, study):
    page = _open(browser, voila)
    page.screenshot(path=str(ARTIFACTS / "voila-1-loaded.png"), full_page=True)
    expect(page.locator(".skinlab-backend")).to_contain_text("LOCAL")
    page.locator(".skinlab-concern-wrinkle input").check()
    page.locator(".skinlab-concern-pore input").check()
    expect(page.locator(".skinlab-units")).to_contain_text("2 concerns (SD): 9 units per photo")
    page.locator(".skinlab-add-sample").click()
    expect(page.locator(".skinlab-image-ready")).to_have_count(1)
    expect(page.locator(".skinlab-image-ready")).to_contain_text("astronaut_sd.jpg")
    expect(page.locator(".skinlab-image-ready img")).to_have_count(1)  # the thumbnail
    page.locator(".skinlab-tag-subject input").fill("S01")
    page.locator(".skinlab-tag-timepoint input").fill("T0")
    expect(page.locator(".skinlab-cost")).to_contain_text("1 photo = 9 units")
    page.screenshot(path=str(ARTIFACTS / "voila-2-ready.png"), full_page=True)

    page.locator(".skinlab-submit").click()
    row = page.locator(".skinlab-submissions .skinlab-row")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("success")
    expect(row).to_contain_text("astronaut_sd.jpg")
    expect(row).to_contain_text("S01")
    scores = page.locator(".skinlab-scores")
    expect(scores).to_contain_text("Wrinkles")
    expect(scores).to_contain_text("Pores")
    expect(page.locator(".skinlab-viewer-header")).to_contain_text("Submission #1")
    expect(page.locator(".skinlab-submit")).to_be_enabled()
    expect(page.locator(".skinlab-feedback")).to_contain_text("done 1")
    page.locator(".skinlab-mask-choice select").select_option(label="Wrinkles")
    expect(page.locator(".skinlab-mask-image")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "voila-3-result.png"), full_page=True)
    page.close()

    import skinlab

    with skinlab.Ledger(study / "study" / "ledger.sqlite") as ledger:  # what the kernel recorded
        df = ledger.submissions()
    assert list(df["status"]) == ["success"] and list(df["subject"]) == ["S01"]
    assert df.loc[0, "actions"] == "wrinkle,pore" and df.loc[0, "backend"] == "local"


def test_voila_upload_in_the_browser_is_read_and_dropped(voila, browser, study):
    import skinlab

    photo = study / "grace.jpg"
    skinlab.sample_portrait("grace_hopper", "sd").save(photo, format="JPEG", quality=92)
    small = study / "small.jpg"
    skinlab.sample_portrait("grace_hopper", "sd").resize((240, 320)).save(small, format="JPEG")
    page = _open(browser, voila)
    page.locator(".skinlab-concern-redness input").check()
    with page.expect_file_chooser() as chooser:  # the upload button opens the system file dialog
        page.locator(".skinlab-upload").click()
    chooser.value.set_files([str(photo), str(small)])
    expect(page.locator(".skinlab-image-row")).to_have_count(2)
    expect(page.locator(".skinlab-image-ready")).to_contain_text("grace.jpg")
    expect(page.locator(".skinlab-image-rejected")).to_contain_text("480")  # said before submitting
    expect(page.locator(".skinlab-feedback")).to_contain_text("removed from the upload widget")
    expect(page.locator(".skinlab-upload")).to_contain_text("(0)")  # nothing kept in the widget
    page.locator(".skinlab-submit").click()
    expect(page.locator(".skinlab-feedback")).to_contain_text("Left out")
    expect(page.locator(".skinlab-submissions .skinlab-row", has_text="grace.jpg")).to_contain_text("success")
    expect(page.locator(".skinlab-viewer-header")).to_contain_text("grace.jpg")
    expect(page.locator(".skinlab-scores")).to_contain_text("Redness")
    page.screenshot(path=str(ARTIFACTS / "voila-4-upload.png"), full_page=True)
    page.close()


# --------------------------------------------------------------------------- JupyterLab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free port of 127.0.0.1 with a token, and a notebook calling skinlab.app()."""
    import json
    import secrets

    root = tmp_path_factory.mktemp("lab")
    cell = "import skinlab\nskinlab.app(ledger='study/ledger.sqlite')"
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "form", "metadata": {}, "outputs": [],
                     "source": cell}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (root / "form.ipynb").write_text(json.dumps(nb))
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("SKINLAB_API_KEY", "YOUCAM_API_KEY")}
    env["JUPYTER_CONFIG_DIR"] = str(root / ".jupyter-config")  # no user settings, no workspace from elsewhere
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(root / ".workspaces")
    env["JUPYTER_RUNTIME_DIR"] = str(root / ".runtime")
    log = root / "lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_answers(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log)
        yield f"http://127.0.0.1:{port}/lab/tree/form.ipynb?token={token}", root
    finally:
        _stop(proc)


def test_jupyterlab_run_the_cell_pick_sample_submit_see_row_and_scores(lab, browser):
    url, root = lab
    page = browser.new_page(viewport={"width": 1400, "height": 3000})
    page.set_default_timeout(90_000)
    page.goto(url)
    cell = page.locator(".jp-Notebook .jp-CodeCell").first
    cell.wait_for()
    expect(page.locator(".jp-StatusBar-Widget", has_text="Idle").first).to_be_visible(timeout=90_000)  # kernel up
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    try:
        page.wait_for_selector(".skinlab-app", state="attached", timeout=90_000)
    finally:
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-0-after-run.png"), full_page=True)
    page.locator(".skinlab-concern-redness input").check()
    page.locator(".skinlab-concern-eye_bag input").check()
    expect(page.locator(".skinlab-units")).to_contain_text("2 concerns (SD)")
    page.locator(".skinlab-sample select").select_option(label="Grace Hopper")
    page.locator(".skinlab-add-sample").click()
    expect(page.locator(".skinlab-image-ready")).to_contain_text("grace_hopper_sd.jpg")
    page.locator(".skinlab-tag-subject input").fill("S07")
    page.locator(".skinlab-submit").click()
    row = page.locator(".skinlab-submissions .skinlab-row")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("success")
    expect(row).to_contain_text("S07")
    expect(page.locator(".skinlab-scores")).to_contain_text("Eye bags")
    page.screenshot(path=str(ARTIFACTS / "jupyterlab-1-result.png"), full_page=True)
    page.close()
    import skinlab

    with skinlab.Ledger(root / "study" / "ledger.sqlite") as ledger:
        df = ledger.submissions()
    assert list(df["subject"]) == ["S07"] and list(df["status"]) == ["success"]
