"""Batch efficiency on the local service with the latency model, against a sample-code client.

Measures, for distinct images and format=zip:

* API-host requests (upload slot, create, polls, and any 429 answers; not the storage PUT or
  downloads) per successful task — target at most 3.2 for skinlab;
* tasks completed per 5 minutes under the 250 requests / 300 s limit — target at least 1.5x the
  sample client, which polls every 2 s as the service's own sample code does.

Time is scaled (``--scale 0.1``: a 5-7 s task takes 0.5-0.7 s, and the 300 s window 30 s) so a run
takes a few minutes; every duration in both clients is scaled alike. The engine's own compute time
is not scaled, so the engine results are computed before the clock starts (`SkinlabApp.precompute`).

Run: python benchmarks/batch_throughput.py [--scale 0.1] [--windows 2] [--workers 8]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import ImageEnhance

import skinlab
from skinlab.batch import analyze_many
from skinlab.client import Client, PollSchedule, RateLimiter, RetryPolicy
from skinlab.ledger import Ledger
from skinlab.local import LocalServer
from skinlab.local.server import LatencyModel
from skinlab.samples import sample_portrait


class RequestCounter:
    """Counts API-host requests (paths under /s2s/) made through a session."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def attach(self, session: requests.Session) -> requests.Session:
        def hook(resp, *args, **kwargs):
            if "/s2s/" in resp.url:
                with self.lock:
                    self.n += 1
        session.hooks["response"].append(hook)
        return session


def make_images(n: int) -> list[bytes]:
    out = []
    bases = [sample_portrait("astronaut", "sd"), sample_portrait("grace_hopper", "sd")]
    for i in range(n):
        img = ImageEnhance.Brightness(bases[i % 2]).enhance(0.9 + 0.002 * i)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def server_for(scale: float, seed: int, images: list[bytes]) -> LocalServer:
    """A server with the latency model whose engine results for ``images`` are computed up front,
    so that the engine's (unscaled) compute time does not blur the protocol measurement."""
    server = LocalServer(latency_model=LatencyModel(time_scale=scale), seed=seed, rate_limit=250,
                         rate_window_s=300 * scale, initial_units=10**7, cache_images=len(images) + 8)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(server.app.precompute, images))
    assert all(o == "success" for o in outcomes), set(outcomes)
    return server


def run_skinlab(images, scale, duration, workers, seed):
    counter = RequestCounter()
    with server_for(scale, seed, images) as server, tempfile.TemporaryDirectory() as tmp:
        client = Client("bench-skinlab", base_url=server.url,
                        poll_schedule=PollSchedule(first=7.0 * scale, factor=1.5, cap=10.0 * scale, minimum=0.0),
                        retry=RetryPolicy(base=1.0 * scale, cap=60 * scale),
                        rate_limiter=RateLimiter(240, 300 * scale),
                        session=counter.attach(requests.Session()))
        stop = threading.Event()
        done_times: list[float] = []
        t0 = time.monotonic()

        def on_update(item):
            if item.outcome == "done":
                done_times.append(time.monotonic() - t0)

        timer = threading.Timer(duration, stop.set)
        timer.start()
        report = analyze_many(images, "redness", ledger=Ledger(Path(tmp) / "l.sqlite"), client=client,
                              max_workers=workers, progress=False, stop=stop, on_update=on_update,
                              timeout=120 * scale * 10)
        timer.cancel()
        client.close()
    ok = sum(1 for t in done_times if t <= duration)
    return {"requests": counter.n, "successes": report.count("done"), "in_window": ok}


def run_sample(images, scale, duration, workers, seed):
    """The service's sample code: upload, create, then poll every 2 s (at most 300 polls)."""
    counter = RequestCounter()
    with server_for(scale, seed, images) as server:
        base = server.url
        headers = {"Authorization": "Bearer bench-sample", "Content-Type": "application/json"}
        uploader = Client("bench-sample", base_url=base, rate_limiter=False,
                          retry=RetryPolicy(base=2.0 * scale, cap=2.0 * scale, max_retries_429=1000),
                          session=counter.attach(requests.Session()))
        t0 = time.monotonic()
        done_times: list[float] = []
        successes = [0]
        lock = threading.Lock()

        def call(session, method, path, **kw):
            while True:
                resp = session.request(method, base + path, headers=headers, **kw)
                if resp.status_code != 429:
                    return resp
                time.sleep(2.0 * scale)  # the sample code's pause, then the same call again

        def one(data: bytes):
            if time.monotonic() - t0 > duration:
                return
            session = counter.attach(requests.Session())
            file_id = uploader.upload(data)
            resp = call(session, "POST", "/s2s/v2.0/task/skin-analysis",
                        json={"src_file_id": file_id, "dst_actions": ["redness"], "format": "zip"})
            task_id = resp.json()["data"]["task_id"]
            for _ in range(300):
                time.sleep(2.0 * scale)
                body = call(session, "GET", f"/s2s/v2.0/task/skin-analysis/{task_id}").json()
                state = body["data"]["task_status"]
                if state == "success":
                    session.get(body["data"]["results"]["url"])  # download the ZIP (storage, not counted)
                    with lock:
                        successes[0] += 1
                        done_times.append(time.monotonic() - t0)
                    return
                if state == "error":
                    return

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, images))
    ok = sum(1 for t in done_times if t <= duration)
    return {"requests": counter.n, "successes": successes[0], "in_window": ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.1, help="time scale (0.1: 300 s become 30 s)")
    ap.add_argument("--windows", type=float, default=2.0, help="run length in 300 s windows")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    duration = 300 * args.scale * args.windows
    images = make_images(args.images)
    print(f"skinlab {skinlab.__version__}: {args.images} distinct images, time scale {args.scale}, "
          f"{args.windows:g} x 300 s windows ({duration:.0f} s wall), {args.workers} in flight, latency model "
          "5-7 s with 3% at 30-60 s, limit 250 requests / 300 s")
    ours = run_skinlab(images, args.scale, duration, args.workers, args.seed)
    sample = run_sample(images, args.scale, duration, args.workers, args.seed)
    rows = []
    for name, r in (("skinlab", ours), ("sample client (2 s polls)", sample)):
        per_task = r["requests"] / max(1, r["successes"])
        per_window = r["in_window"] / args.windows
        rows.append((name, r["successes"], r["requests"], per_task, per_window))
        print(f"{name:<26} successes {r['successes']:4d}  API requests {r['requests']:5d}  "
              f"requests/task {per_task:5.2f}  tasks per 5 min {per_window:6.1f}")
    ratio = rows[0][4] / max(1e-9, rows[1][4])
    print(f"requests per task: skinlab {rows[0][3]:.2f} (target <= 3.2: {'OK' if rows[0][3] <= 3.2 else 'MISSED'})")
    print(f"throughput ratio skinlab / sample: {ratio:.2f} (target >= 1.5: {'OK' if ratio >= 1.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
