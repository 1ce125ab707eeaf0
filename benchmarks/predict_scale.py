"""Batch scoring that scales out: `rayad predict` in one process against `rayad predict --ray` (Ray Data,
its default pool), on 500 and 2,000 image files, with the images/s of each and the driver's peak memory.

    python benchmarks/predict_scale.py [--counts 500 2000] [--tta flips|none] [--cpus-per-actor C]

Each measurement runs in its own process (a fresh local Ray for --ray), which prints its peak RSS. The
rows of --ray are written by Ray Data's workers into a Parquet dataset, so the driver's memory should
not grow with the number of files; the single process holds its table until it writes it. The model is
the default SDC-CCM at 128², calibrated but untrained (throughput depends on its size, not its weights).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rayad.cli import count, run_script
from rayad.cpu import use_cpus
from rayad.precision import cpu_summary
from rayad.settings import PREDICT_BATCH, cpu_count, threads_for


def make_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def measure(mode: str, run: str, images: str, out: str, cpus_per_actor: str) -> None:
    """In a child process: score `images` and print images/s and this process's peak RSS as JSON."""
    from rayad.predict import default_actor_cpus, expand_paths, pool_size, predict_paths, predict_with_ray

    n = len(expand_paths([Path(images)]))
    start, shape = time.perf_counter(), {}
    if mode == "ray":
        from rayad.cluster import connect

        connect(None, log_to_driver=False)
        cpus = float(cpus_per_actor) if cpus_per_actor != "default" else default_actor_cpus()
        shape = {"actors": pool_size(cpus), "cpus_per_actor": cpus}
        start = time.perf_counter()  # Ray's start-up is not scoring
        rows = predict_with_ray(run, [images], out, cpus_per_actor=cpus).num_rows
    else:
        use_cpus(cpu_count())  # as `rayad predict`
        rows = predict_paths(run, [Path(images)], Path(out)).num_rows
    seconds = time.perf_counter() - start
    assert rows == n
    print(json.dumps({"images_per_s": n / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 1024, **shape}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=count, nargs="+", default=[500, 2000])
    parser.add_argument("--tta", choices=["flips", "none"], default="flips",
                        help="scoring.tta of the model (flips: what `auto` settles on for textures; 4x the network)")
    parser.add_argument("--cpus-per-actor", default="default", help="as `rayad predict --ray`'s (default: its default)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(*args.child)
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import make_model

    work = Path(tempfile.mkdtemp(prefix="rayad-predict-scale-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    run = make_model(work / "model", args.tta)
    results = {}
    for n in args.counts:
        images = make_images(work / f"images-{n}", n)
        for mode, out in (("single", work / f"single-{n}.parquet"), ("ray", work / f"ray-{n}")):
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(run), str(images), str(out),
                                   str(args.cpus_per_actor)], capture_output=True, text=True)
            if done.returncode:  # its own error, not "returned non-zero exit status 1"
                sys.exit(f"predict_scale.py: error: the {mode} scoring of {n} files failed: "
                         f"{(done.stderr.strip().splitlines() or ['-'])[-1]}")
            results[(mode, n)] = json.loads(done.stdout.strip().splitlines()[-1])
    pool = results[("ray", args.counts[0])]
    print(f"machine: {cpu_summary()}, {os.cpu_count()} cores; default SDC-CCM at 128², scoring.tta {args.tta}; "
          f"Ray Data: {pool['actors']} actors x {pool['cpus_per_actor']} CPU, "
          f"{threads_for(pool['cpus_per_actor'])} thread(s) each, batches of {PREDICT_BATCH}")
    print("| files | single process images/s | Ray Data images/s | ratio | single peak RSS (MB) | "
          "Ray driver peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for n in args.counts:
        single, ray = results[("single", n)], results[("ray", n)]
        print(f"| {n} | {single['images_per_s']:.0f} | {ray['images_per_s']:.0f} | "
              f"{ray['images_per_s'] / single['images_per_s']:.2f}x | {single['peak_rss_mb']:.0f} | "
              f"{ray['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    run_script(main)
