"""The committed notebooks are clean: no outputs, no execution counts, no widget state, no API keys.

Notebooks are committed without outputs (nbval runs them in CI and their ``assert`` cells check the
results), so a notebook with outputs was saved after running: its outputs may show faces, paths or
keys, and its widget state bloats the file. The check itself is tested on a dirty notebook built in
memory, so that it cannot pass by checking nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_cohort_study.ipynb", "03_teaching_demo.ipynb", "04_cloud_service.ipynb")

#: Things that look like an API key or a bearer token (placeholders such as "<your key>" do not match).
KEY_PATTERNS = {
    "an sk- API key": re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),
    "a Bearer token": re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=\-]{20,}"),
    "a key assigned to a variable": re.compile(
        r"(?i)\b[A-Za-z_]*(?:api[_-]?key|key|secret|token)\b[\"']?\s*[:=]\s*[\"'][A-Za-z0-9._~+/=\-]{20,}[\"']"),
    "a key passed to the client": re.compile(
        r"\b(?:Client|connect)\(\s*[\"'][A-Za-z0-9._~+/=\-]{20,}[\"']"),
    "a key set in the environment": re.compile(
        r"(?i)(?:\b(?:SKINLAB|YOUCAM)_API_KEY[\"']?\]?\s*=\s*[\"']?"          # X=..., environ["X"] = ...
        r"|%env\s+(?:SKINLAB|YOUCAM)_API_KEY\s+"                               # %env X value
        r"|\b(?:setdefault|putenv)\(\s*[\"'](?:SKINLAB|YOUCAM)_API_KEY[\"']\s*,\s*[\"'])"  # setdefault("X", ...)
        r"[A-Za-z0-9._~+/=\-]{12,}"),
}

#: Metadata keys that hold widget state or run artefacts.
WIDGET_KEYS = ("widgets", "application/vnd.jupyter.widget-state+json")


def _strings(obj, path="notebook"):
    """Every string in a JSON structure, with where it is."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, list):
        if obj and all(isinstance(x, str) for x in obj):
            yield path, "".join(obj)  # sources and stream texts may be split into lines
        else:
            for i, x in enumerate(obj):
                yield from _strings(x, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{path}.{k}")


def problems(nb: dict) -> list[str]:
    """What makes a notebook unfit to commit (an empty list when it is clean)."""
    found = []
    meta = nb.get("metadata", {})
    for key in WIDGET_KEYS:
        if key in meta:
            found.append(f"widget state in the notebook metadata ({key})")
    for i, cell in enumerate(nb.get("cells", [])):
        where = f"cell {i}"
        if cell.get("cell_type") == "code":
            if cell.get("outputs"):
                found.append(f"{where} has outputs")
            if cell.get("execution_count") is not None:
                found.append(f"{where} has an execution count")
        if cell.get("attachments"):
            found.append(f"{where} has attachments (pasted images)")
        cell_meta = cell.get("metadata", {})
        for key in WIDGET_KEYS:
            if key in cell_meta:
                found.append(f"{where} has widget state in its metadata ({key})")
        if "execution" in cell_meta:
            found.append(f"{where} has execution timings in its metadata")
    for path, text in _strings(nb):
        for what, pattern in KEY_PATTERNS.items():
            if pattern.search(text):
                found.append(f"{path} holds something that looks like {what}")
    return found


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_notebooks_are_there():
    present = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert set(EXPECTED) <= set(present), f"missing notebooks: {sorted(set(EXPECTED) - set(present))}"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")))
def test_committed_notebook_is_clean(name):
    nb = _load(NOTEBOOK_DIR / name)
    assert nb.get("nbformat") == 4
    found = problems(nb)
    assert not found, (f"{name} is not clean: " + "; ".join(found)
                       + ". Clear the outputs and widget state before committing "
                         "(e.g. jupyter nbconvert --clear-output --inplace, and remove metadata.widgets).")


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")))
def test_committed_notebook_is_valid(name):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(str(NOTEBOOK_DIR / name), as_version=4))


# ---------------------------------------------------------------------------- the check can fail

def _fake_key(prefix: str = "") -> str:
    # built at run time, so this file holds nothing that looks like a key
    return prefix + "".join("aB3xQ9"[i % 6] for i in range(32))


def _clean_notebook() -> dict:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("Set the key outside: `export SKINLAB_API_KEY=\"<your key>\"`."),
        nbformat.v4.new_code_cell("import skinlab\nclient = skinlab.Client()   # key from SKINLAB_API_KEY"),
    ]
    return json.loads(nbformat.writes(nb))


def test_a_clean_notebook_passes():
    assert problems(_clean_notebook()) == []


@pytest.mark.parametrize("dirt, expected", [
    ("outputs", "has outputs"),
    ("execution_count", "has an execution count"),
    ("notebook_widgets", "widget state in the notebook metadata"),
    ("cell_widgets", "widget state in its metadata"),
    ("attachment", "has attachments"),
    ("sk_key", "looks like an sk- API key"),
    ("bearer", "looks like a Bearer token"),
    ("assigned", "looks like a key assigned to a variable"),
    ("environ", "looks like a key set in the environment"),
    ("key_in_output", "looks like a Bearer token"),
    ("positional", "looks like a key passed to the client"),
    ("plain_key_var", "looks like a key assigned to a variable"),
    ("env_space", "looks like a key set in the environment"),
    ("setdefault", "looks like a key set in the environment"),
])
def test_a_dirty_notebook_fails(dirt, expected):
    nb = _clean_notebook()
    code = nb["cells"][1]
    if dirt == "outputs":
        code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    elif dirt == "execution_count":
        code["execution_count"] = 3
    elif dirt == "notebook_widgets":
        nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    elif dirt == "cell_widgets":
        code["metadata"]["widgets"] = {"state": {}}
    elif dirt == "attachment":
        nb["cells"][0]["attachments"] = {"face.png": {"image/png": "iVBORw0KGgo="}}
    elif dirt == "sk_key":
        code["source"] = f"client = skinlab.Client({_fake_key('sk-')!r})"
    elif dirt == "bearer":
        nb["cells"][0]["source"] = f"curl -H 'Authorization: Bearer {_fake_key()}' ..."
    elif dirt == "assigned":
        code["source"] = f"API_KEY = {_fake_key()!r}\nclient = skinlab.Client(API_KEY)"
    elif dirt == "environ":
        code["source"] = f"%env SKINLAB_API_KEY={_fake_key()}"
    elif dirt == "positional":
        code["source"] = f"client = skinlab.Client({_fake_key()!r})"
    elif dirt == "plain_key_var":
        code["source"] = f"key = {_fake_key()!r}"
    elif dirt == "env_space":
        code["source"] = f"%env YOUCAM_API_KEY {_fake_key()}"
    elif dirt == "setdefault":
        code["source"] = f"os.environ.setdefault('SKINLAB_API_KEY', {_fake_key()!r})"
    elif dirt == "key_in_output":
        code["outputs"] = [{"output_type": "stream", "name": "stderr",
                            "text": [f"sent header Authorization: Bearer {_fake_key()}\n"]}]
        code["source"] = ["print(", "'hi')"]
    found = problems(nb)
    assert any(expected in f for f in found), found


def test_a_key_split_across_source_lines_is_found():
    nb = _clean_notebook()
    key = _fake_key("sk-")
    nb["cells"][1]["source"] = ["client = skinlab.Client('", key[:10], key[10:] + "')\n"]
    assert any("sk- API key" in f for f in problems(nb))
