"""The README's main-job command, exactly as written (its `skinlab ...` part, in-process), and
what it promises: the backend said, all 16 SD concerns scored, the overall score and skin age,
and scores.csv, result.json, the 18 masks and the working image written."""

import csv
import json
import re
import shlex
from pathlib import Path

from PIL import Image

from skinlab.actions import CATALOGUE, SD_ACTIONS

REPO = Path(__file__).resolve().parents[1]


def _readme_main_job() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*1\. Install and run the main job\*\*.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "README has no main-job block"
    command = block.group(1).strip()
    skinlab_part = command.split("&&")[-1].strip()
    argv = shlex.split(skinlab_part)
    assert argv[0] == ".venv/bin/skinlab"
    return argv[1:]


def test_readme_main_job_as_written(tmp_path, monkeypatch, capsys):
    from skinlab.cli import main

    monkeypatch.delenv("SKINLAB_API_KEY", raising=False)
    monkeypatch.delenv("YOUCAM_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = _readme_main_job()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Backend: LOCAL" in out and "not clinically validated" in out
    assert re.search(r"overall score: \d+(\.\d)?", out) and re.search(r"skin age: \d+", out)
    out_dir = Path(argv[argv.index("--out") + 1])
    folder = tmp_path / out_dir / "astronaut_sd"
    with open(folder / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["action"] for r in rows} == set(SD_ACTIONS)
    scored = [r for r in rows if r["action"] != "skin_type"]
    assert all(1 <= float(r["raw_score"]) <= 100 for r in scored)
    for r in scored:      # printed as the table says
        assert re.search(rf"\b{r['action']}\s+whole\s+{float(r['raw_score']):.1f}\b", out), r["action"]
    masks = sorted(p.name for p in folder.glob("*_output.png"))
    expected = sorted({m for n in SD_ACTIONS for m in CATALOGUE[n].mask_files})
    assert len(masks) == 18 and masks == expected
    work = Image.open(folder / "resize_image.jpg")
    for m in masks:     # every mask is aligned with the working image
        assert Image.open(folder / m).size == work.size
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert result["backend"] == "local" and result["engine"].startswith("skinlab-local ")
    assert result["tier"] == "sd" and f"overall score: {result['overall']:.1f}" in out
