"""Per-photo time of the local engine for all 16 concerns, at SD (~1000 px) and HD (~2000 px).

Targets (issue 5, on the project's 2-core machine): at most 1.0 s per SD photo and 2.5 s per
HD photo, cold cache, the image check included.

Run: python benchmarks/engine_speed.py [--runs 3] [--workers 2] [--no-pool]

Photos: the bundled public-domain portraits (``skinlab.samples.sample_portrait``, HD crops),
Lanczos-resized so that the long side is ~1000 px (SD) or ~2000 px (HD). For each photo it
prints the median and minimum wall time of ``analyze(img, CONCERNS)`` over ``--runs`` cold runs
(caches cleared before each), the ratio to the target, the physical scale found, and a
breakdown (image check, working context, each concern). Then, unless ``--no-pool``, the
throughput of ``analyze_many`` with a ``--workers`` process pool over all photos (per-photo
time = wall time / photos, pool start-up excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = {"SD": 1.0, "HD": 2.5}
LONG_SIDE = {"SD": 1000, "HD": 2000}


def photos():
    import numpy as np
    from PIL import Image

    from skinlab.samples import sample_portrait

    out = {}
    for name in ("astronaut", "grace_hopper"):
        base = sample_portrait(name, "hd")
        for tier, long_side in LONG_SIDE.items():
            s = long_side / max(base.size)
            img = base.resize((round(base.width * s), round(base.height * s)), Image.LANCZOS)
            out[(name, tier)] = np.asarray(img)
    return out


def breakdown(engine, img) -> dict[str, float]:
    """Seconds per stage of one cold analysis, through the engine's internals."""
    from skinlab.actions import CONCERNS

    engine.clear_cache()
    t = time.perf_counter()
    chk = engine.check_image(img)
    parts = {"check": time.perf_counter() - t}
    face = chk.faces[0]
    digest = engine._digest(img)
    t = time.perf_counter()
    engine._context(digest, img, face)
    parts["context"] = time.perf_counter() - t
    for c in CONCERNS:
        t = time.perf_counter()
        engine._measure_one(digest, c, img, face)
        parts[c] = time.perf_counter() - t
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-pool", action="store_true")
    args = ap.parse_args()

    import skinlab.local.engine as engine
    from skinlab.actions import CONCERNS

    imgs = photos()
    # warm-up: imports, the face backend's model, filter tables (not part of a photo's time)
    engine.analyze(next(iter(imgs.values())), CONCERNS)
    print(f"engine {engine.ENGINE_VERSION}, face backend {engine.FACE_BACKEND}; "
          f"{os.cpu_count()} cores; {args.runs} cold runs per photo; all {len(CONCERNS)} concerns")
    print(f"{'photo':<22}{'size':>11}{'px/mm':>7}{'median s':>10}{'min s':>8}{'target s':>10}{'ratio':>7}")
    worst = {}
    for (name, tier), img in imgs.items():
        times = []
        for _ in range(args.runs):
            engine.clear_cache()
            t = time.perf_counter()
            res = engine.analyze(img, CONCERNS)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        ratio = med / TARGET_S[tier]
        worst[tier] = max(worst.get(tier, 0.0), ratio)
        size = f"{img.shape[1]}x{img.shape[0]}"
        print(f"{name + ' ' + tier:<22}{size:>11}{res.px_per_mm:>7.2f}{med:>10.3f}{min(times):>8.3f}"
              f"{TARGET_S[tier]:>10.1f}{ratio:>7.2f}  {'OK' if ratio <= 1 else 'OVER'}")
        parts = breakdown(engine, img)
        top = sorted(parts.items(), key=lambda kv: -kv[1])
        print("    " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in top[:8])
              + f"; the other {len(top) - 8}: {sum(v for _, v in top[8:]) * 1000:.0f} ms")
    for tier in TARGET_S:
        print(f"{tier}: worst ratio to the {TARGET_S[tier]:.1f} s target = {worst[tier]:.2f} "
              f"({'OK' if worst[tier] <= 1 else 'OVER'})")
    if args.no_pool:
        return
    from skinlab.local.engine.parallel import analyze_many, default_executor

    # distinct pixels throughout (the originals and their mirror images), so that no photo is a
    # hit in a worker's result cache; the warm-up uses yet other copies (shifted by one pixel)
    originals = list(imgs.values())
    batch = originals + [np.ascontiguousarray(im[:, ::-1]) for im in originals]
    warm = [np.roll(im, 1, axis=1) for im in originals[:args.workers]]
    with default_executor(args.workers) as ex:
        analyze_many(warm, executor=ex, keep_masks=False)     # start the workers
        t = time.perf_counter()
        analyze_many(batch, executor=ex, keep_masks=False)
        dt = time.perf_counter() - t
    print(f"analyze_many, {args.workers}-process pool, {len(batch)} photos (SD and HD mixed): "
          f"{dt:.2f} s, {dt / len(batch):.3f} s per photo, {len(batch) / dt:.2f} photos/s")


if __name__ == "__main__":
    main()
