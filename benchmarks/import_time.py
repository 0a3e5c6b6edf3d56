"""How long `import skinlab` takes in a fresh interpreter (target: at most 0.3 s).

Run: python benchmarks/import_time.py [--runs 7]
Prints the median wall time of `import skinlab` over fresh processes, the ratio to the target,
and which heavy modules (requests, pandas, numpy, PIL, skimage) the import pulled in (none should).
"""

import argparse
import statistics
import subprocess
import sys

TARGET_S = 0.3
PROBE = ("import sys, time; t = time.perf_counter(); import skinlab; dt = time.perf_counter() - t; "
         "heavy = [m for m in ('requests', 'pandas', 'numpy', 'PIL', 'skimage', 'scipy') if m in sys.modules]; "
         "print(dt, ','.join(heavy))")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    times, heavy = [], ""
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        heavy = out[1] if len(out) > 1 else ""
    med = statistics.median(times)
    print(f"import skinlab: median {med * 1000:.1f} ms over {args.runs} fresh processes "
          f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")
    print(f"target {TARGET_S * 1000:.0f} ms; ratio to target {med / TARGET_S:.2f} ({'OK' if med <= TARGET_S else 'OVER'})")
    print(f"heavy modules imported: {heavy or 'none'}")


if __name__ == "__main__":
    main()
