"""Locate the shared API contract examples (../shared/contract-examples beside the repo)."""

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKINLAB_SHARED", REPO.parent / "shared"))
EXAMPLES = SHARED / "contract-examples"


def example(name: str):
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
