"""Serving and batch-scoring throughput, measured in one run on one machine.

  1. raw `Predictor` throughput at several batch sizes (the ceiling);
  2. Ray Serve over real HTTP on loopback, closed-loop clients at concurrency 1, 8 and 32, with batching
     on (max_batch_size 16) and off (1): requests/s and p50/p95/p99 latency, bounded in count and time;
     and `/healthz` latency while a batch of 16 photo-sized PNGs decodes (it must not wait for it);
  3. `rayad predict --ray` (Ray Data actor pool) against the single-process `rayad predict` loop.

The model is the default SDC-CCM at 128², calibrated but untrained: throughput depends on the network's
size, not on its weights.

    python benchmarks/serve_load.py [--requests 400] [--seconds 30] [--images 256] [--ingress python|haproxy]
        [--tta flips|none]

`--ingress haproxy` measures Ray Serve's experimental HAProxy ingress (`rayad serve --ingress haproxy`).
"""

from __future__ import annotations

import argparse
import atexit
import io
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from rayad.artifact import Predictor, build_anomaly_model, save_artifact
from rayad.cli import count, duration, run_script
from rayad.cluster import connect
from rayad.config import Config
from rayad.cpu import use_cpus
from rayad.precision import cpu_summary
from rayad.predict import default_actor_cpus, pool_size, predict_paths, predict_with_ray
from rayad.serve import ServeSettings, start, use_haproxy_ingress

THREADS = 2


def make_model(folder: Path, tta: str) -> Path:
    cfg = Config().replace({"scoring.tta": tta})
    torch.manual_seed(0)
    model = build_anomaly_model(cfg)
    good = np.random.default_rng(0).uniform(0.001, 0.01, 64)
    model.calibrate(good, 2 * good)
    return save_artifact(model, cfg, folder)


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def raw_throughput(run: Path, images: np.ndarray, seconds: float) -> dict[int, float]:
    use_cpus(THREADS)
    predictor = Predictor.load(run, device="cpu")
    rates = {}
    for batch in (1, 4, 8, 16, 32):
        chunk = images[np.arange(batch) % len(images)]  # a full batch even from fewer --images
        predictor.predict_arrays(chunk, batch)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            predictor.predict_arrays(chunk, batch)
            done += batch
        rates[batch] = done / (time.perf_counter() - start)
    return rates


def load_test(url: str, body: bytes, concurrency: int, total: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients, each sending its next request when the previous one returns."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    remaining = [total]

    def client():
        nonlocal errors
        session = requests.Session()
        while True:
            with lock:
                if remaining[0] <= 0 or time.perf_counter() > deadline:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            ok = session.post(f"{url}/v1/predict", data=body, timeout=60).status_code == 200
            with lock:
                latencies.append(time.perf_counter() - start)
                errors += not ok

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    elapsed = time.perf_counter() - start
    ms = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {"rps": len(latencies) / elapsed, "p50": ms[0], "p95": ms[1], "p99": ms[2], "n": len(latencies),
            "errors": errors}


def serve_runs(run: Path, body: bytes, args) -> tuple[dict[tuple[str, int], dict[str, float]], dict[str, float]]:
    """Load levels with batching on and off, and /healthz under a large batch (batching on)."""
    from ray import serve

    results, healthz = {}, {}
    for batching, batch_size in (("on", 16), ("off", 1)):
        settings = ServeSettings(models={"bench": str(run)}, max_batch_size=batch_size, batch_wait_s=0.005,
                                 replica_cpus=THREADS, max_queued_requests=1000)
        url = start(settings, port=args.port)
        requests.get(f"{url}/readyz", timeout=120)
        load_test(url, body, 4, 40, 10)  # warm-up
        for concurrency in (1, 8, 32):
            results[(batching, concurrency)] = load_test(url, body, concurrency, args.requests, args.seconds)
        if batching == "on":
            healthz = healthz_during_batch(url)
        serve.delete("rayad")
    return results, healthz


def large_png(seed: int, side: int = 2048) -> bytes:
    """A photo-sized PNG that compresses well (a gradient with faint noise): slow to decode, small to send."""
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    noise = np.random.default_rng(seed).integers(0, 4, (side, side), dtype=np.uint8)
    gray = (ramp[None, :] * 0.5 + ramp[:, None] * 0.25).astype(np.uint8) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(buffer, format="PNG")
    return buffer.getvalue()


def healthz_during_batch(url: str, images: int = 16) -> dict[str, float]:
    """/healthz latency (ms) idle, and while a batch of `images` photo-sized PNGs is decoded and scored."""
    files = [("files", (f"{i}.png", large_png(i), "image/png")) for i in range(images)]

    def latencies(stop: threading.Event | None, n: int = 50) -> list[float]:
        out = []
        while (stop is None and len(out) < n) or (stop is not None and not stop.is_set()):
            start = time.perf_counter()
            requests.get(f"{url}/healthz", timeout=30)
            out.append((time.perf_counter() - start) * 1000)
            time.sleep(0.01)
        return out

    idle = latencies(None)
    done, batch = threading.Event(), {}

    def send():
        start = time.perf_counter()
        batch["status"] = requests.post(f"{url}/v1/predict/batch?model=bench", files=files, timeout=300).status_code
        batch["seconds"] = time.perf_counter() - start
        done.set()

    sender = threading.Thread(target=send)
    sender.start()
    busy = latencies(done)
    sender.join()
    return {"idle_p50": float(np.median(idle)), "busy_p50": float(np.median(busy)), "busy_max": max(busy),
            "batch_s": batch["seconds"], "status": batch["status"], "mb": sum(len(f[1][1]) for f in files) / 2**20}


def batch_scoring(run: Path, paths: list[Path], out: Path) -> tuple[float, float, int]:
    """Images/s in one process and on Ray Data's default pool (as `rayad predict --ray`), and that pool's size."""
    start = time.perf_counter()
    predict_paths(run, paths)
    plain = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    predict_with_ray(run, [str(paths[0].parent)], out)
    return plain, len(paths) / (time.perf_counter() - start), pool_size(default_actor_cpus())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=count, default=400, help="per load level")
    parser.add_argument("--seconds", type=duration, default=30, help="per load level")
    parser.add_argument("--images", type=count, default=256, help="for batch scoring")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ingress", choices=["python", "haproxy"], default="python")
    parser.add_argument("--tta", choices=["flips", "none"], default="flips",
                        help="scoring.tta of the model (flips: what `auto` settles on for textures; 4x the network)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rayad-serve-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    run = make_model(work / "model", args.tta)
    paths = make_images(work / "images", args.images)
    images = np.stack([np.asarray(Image.open(p)) for p in paths[:32]])
    raw = raw_throughput(run, images, 3)
    best_batch = max(raw, key=raw.get)
    connect(use_haproxy_ingress(None) if args.ingress == "haproxy" else None, log_to_driver=False)
    served, h = serve_runs(run, paths[0].read_bytes(), args)
    plain, with_ray, actors = batch_scoring(run, paths, work / "scores.parquet")

    precision = Predictor.load(run, device="cpu").precision  # what the Predictor, replicas and actors score in
    print(f"machine: {cpu_summary()}, "
          f"{os.cpu_count()} CPUs; model: default SDC-CCM "
          f"at 128², scoring.tta {args.tta}, {THREADS} torch threads in the Predictor and the scorer replica; "
          f"{args.ingress} ingress; "
          f"scoring in {precision.precision} ({precision.reason})")
    print("\nraw Predictor images/s by batch size: " + ", ".join(f"{b}: {r:.1f}" for b, r in raw.items()))
    print(f"\n{'batching':<9}{'clients':>8}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'n':>6}{'err':>5}"
          f"{'served/raw':>12}")
    for (batching, concurrency), r in served.items():
        print(f"{batching:<9}{concurrency:>8}{r['rps']:>8.1f}{r['p50']:>8.0f}{r['p95']:>8.0f}{r['p99']:>8.0f}"
              f"{r['n']:>6}{r['errors']:>5}{r['rps'] / raw[best_batch]:>12.2f}")
    on, off = served[("on", 32)], served[("off", 32)]
    print(f"\nserved/raw at 32 clients with batching: {on['rps'] / raw[best_batch]:.2f} "
          f"(raw best: batch {best_batch}, {raw[best_batch]:.1f} img/s); batching on/off at 32 clients: "
          f"{on['rps'] / off['rps']:.2f}")
    print(f"/healthz while a 16-image batch of 2048² PNGs ({h['mb']:.1f} MB, HTTP {h['status']}, "
          f"{h['batch_s']:.2f} s) decodes and scores: p50 {h['busy_p50']:.1f} ms, max {h['busy_max']:.1f} ms "
          f"(idle p50 {h['idle_p50']:.1f} ms)")
    print(f"batch scoring of {len(paths)} files: single process {plain:.1f} img/s, Ray Data {actors} actors "
          f"{with_ray:.1f} img/s (ratio {with_ray / plain:.2f})")


if __name__ == "__main__":
    run_script(main)
