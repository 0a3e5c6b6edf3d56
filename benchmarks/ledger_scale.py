"""How the experiment ledger scales: 100,000 recorded submissions of 16 concerns each.

Run: python benchmarks/ledger_scale.py [--n 100000] [--path DIR] [--keep]

Synthetic successful results (all 16 SD concerns: 15 scores plus skin type in three regions,
i.e. 18 score rows per submission) are recorded through the ledger's recording API
(``Ledger.record_many``), 1,000 per transaction. Prints:

* the bulk insert rate (submissions/s and score rows/s);
* the rate with one transaction per submission (how fast single submissions can be committed,
  with ``synchronous=FULL``), on 1,000 more;
* the time to build ``scores()`` (the tidy DataFrame of every score) and its size in memory,
  the same with ``compact=True`` (categoricals), one concern (``actions=``), one subject,
  ``submissions()`` and ``wide()`` of one timepoint;
* the file size (database after a WAL checkpoint, plus the results folder, empty here).

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skinlab.actions import SD_ACTIONS, SKIN_TYPES  # noqa: E402
from skinlab.ledger import Ledger  # noqa: E402


def synthetic(i: int, rng: random.Random) -> dict:
    scores = []
    for action in SD_ACTIONS:
        if action == "skin_type":
            for region in ("whole", "t_zone", "u_zone"):
                scores.append({"action": action, "region": region, "skin_type": rng.choice(SKIN_TYPES)})
        else:
            raw = rng.uniform(20, 95)
            scores.append({"action": action, "region": "whole", "raw_score": raw, "ui_score": int(raw)})
    return {
        "result": {"task_id": f"task{i:09d}", "format": "zip", "tier": "sd", "backend": "cloud",
                   "engine": "youcam-skin-analysis v2.0", "api_version": "v2.0", "overall": rng.uniform(40, 90),
                   "skin_age": rng.randint(18, 80), "scores": scores},
        "image_name": f"S{i // 10:05d}_T{i % 10}.jpg",
        "image_sha256": f"{rng.getrandbits(256):064x}",
        "image_size": rng.randint(200_000, 4_000_000),
        "tags": {"subject": f"S{i // 10:05d}", "timepoint": f"T{i % 10}", "condition": "AB"[i % 2],
                 "site": f"site{i % 7}"},
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="submissions to record (default 100,000)")
    ap.add_argument("--path", help="folder for the study (default: a temporary folder, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the study folder")
    args = ap.parse_args()
    root = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    db = root / "ledger.sqlite"
    if db.exists():
        sys.exit(f"{db} exists; pick an empty --path")
    t = time.perf_counter()
    import pandas  # noqa: F401 - imported once here so the table timings below exclude it

    print(f"(pandas imported in {time.perf_counter() - t:.1f} s, not counted below)")
    rng = random.Random(0)
    ledger = Ledger(db)
    try:
        rows_per = len(synthetic(0, rng)["result"]["scores"])
        t = time.perf_counter()
        ledger.record_many((synthetic(i, rng) for i in range(args.n)), batch_size=1000)
        bulk = time.perf_counter() - t
        print(f"recorded {args.n:,} submissions x {rows_per} score rows ({args.n * rows_per:,} rows) in {bulk:.1f} s: "
              f"{args.n / bulk:,.0f} submissions/s, {args.n * rows_per / bulk:,.0f} score rows/s (1,000 per transaction)")

        single = 1000
        t = time.perf_counter()
        ledger.record_many((synthetic(args.n + i, rng) for i in range(single)), batch_size=1)
        one = time.perf_counter() - t
        print(f"recorded {single:,} more one transaction each in {one:.1f} s: {single / one:,.0f} submissions/s "
              f"({one / single * 1000:.1f} ms per committed submission)")

        with ledger._lock:
            ledger._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.stat().st_size
        total = args.n + single
        print(f"file size: {mb(size)} ({size / total:,.0f} bytes per submission)")

        t = time.perf_counter()
        scores = ledger.scores()
        build = time.perf_counter() - t
        print(f"scores(): {len(scores):,} rows x {scores.shape[1]} columns in {build:.1f} s, "
              f"{mb(scores.memory_usage(deep=True).sum())} in memory")
        del scores
        t = time.perf_counter()
        scores = ledger.scores(compact=True)
        print(f"scores(compact=True): {len(scores):,} rows in {time.perf_counter() - t:.1f} s, "
              f"{mb(scores.memory_usage(deep=True).sum())} in memory (text columns as categoricals)")
        del scores
        t = time.perf_counter()
        one = ledger.scores(actions="wrinkle")
        print(f"scores(actions='wrinkle'): {len(one):,} rows in {time.perf_counter() - t:.1f} s")
        del one
        t = time.perf_counter()
        one_subject = ledger.scores(subject="S00042")
        print(f"scores(subject='S00042'): {len(one_subject)} rows in {(time.perf_counter() - t) * 1000:.0f} ms")
        t = time.perf_counter()
        subs = ledger.submissions()
        print(f"submissions(): {len(subs):,} rows in {time.perf_counter() - t:.1f} s")
        del subs
        t = time.perf_counter()
        wide = ledger.wide(timepoint="T0")
        print(f"wide(timepoint='T0'): {wide.shape[0]:,} x {wide.shape[1]} in {time.perf_counter() - t:.1f} s")
    finally:
        ledger.close()
        if not args.keep and not args.path:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep or args.path:
            print(f"study kept in {root}")


if __name__ == "__main__":
    main()
