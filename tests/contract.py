"""The API contract's example files, as the tests read them.

A copy of ``../shared/contract-examples`` (the contract of the real service, kept beside this
repository) lives in ``tests/data/contract-examples`` so that a clean clone tests the same on
any machine; ``test_results.test_vendored_examples_match_the_shared_contract`` fails when the
copy and the shared original differ. ``SKINLAB_SHARED`` points at another shared folder.
"""

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKINLAB_SHARED", REPO.parent / "shared"))
SHARED_EXAMPLES = SHARED / "contract-examples"
EXAMPLES = Path(__file__).resolve().parent / "data" / "contract-examples"


def example(name: str):
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
