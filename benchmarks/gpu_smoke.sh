#!/usr/bin/env bash
# GPU smoke test (a few minutes on one GPU): every CUDA path of rayad once, PASS/FAIL per step.
#
#   bash benchmarks/gpu_smoke.sh [WORK_DIR]        # from the repository root, rayad installed
#
# Each step is stopped after STEP_TIMEOUT seconds (default 300) and counts as failed.
# Trains single-process and with 1 (and 2, when present) GPU workers, runs a 2-trial GPU search, serves
# a model on a GPU replica with and without heatmaps, and scores with `predict` and `predict --ray` on
# the GPU, checking that served == predict == evaluate. Exit code: the number of failed steps (99: no GPU).
set -u
WORK=${1:-$(mktemp -d /tmp/rayad-gpu-smoke.XXXX)}
mkdir -p "$WORK"
PY=${PYTHON:-python}
RAYAD=${RAYAD:-rayad}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
TINY=(--set data.image_size=64 --set model.widths=[16,32,64] --set train.batch_size=16
      --set train.checkpoint_every=50 --set train.log_every=25)
FAILED=0
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "GPU: $($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')") x $GPUS"
echo "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'), work dir $WORK"
if [ "${GPUS:-0}" -lt 1 ]; then  # every step would run on the CPU and pass
    echo "no CUDA GPU visible to torch: nothing to check here" >&2
    exit 99
fi

step() {  # step NAME COMMAND...: run it (at most STEP_TIMEOUT s), print PASS or FAIL with the seconds it took
    local name=$1 start=$SECONDS
    shift
    if timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$WORK/$name.log" 2>&1; then
        echo "PASS  $name ($((SECONDS - start)) s)"
    else
        echo "FAIL  $name ($((SECONDS - start)) s; log: $WORK/$name.log)"
        tail -5 "$WORK/$name.log" | sed 's/^/      /'
        FAILED=$((FAILED + 1))
    fi
}

step data $RAYAD data demo --out "$WORK/data"
step train-single $RAYAD train --data "$WORK/data" --category brick --out "$WORK/single" --steps 200 "${TINY[@]}"
step train-1-gpu-worker $RAYAD train --data "$WORK/data" --category brick --out "$WORK/ddp1" --steps 100 \
    --workers 1 --gpu "${TINY[@]}"
if [ "$GPUS" -ge 2 ]; then
    step train-2-gpu-workers-nccl $RAYAD train --data "$WORK/data" --category brick --out "$WORK/ddp2" \
        --steps 100 --workers 2 --gpu "${TINY[@]}"
else
    echo "SKIP  train-2-gpu-workers-nccl (one GPU)"
fi
cat >"$WORK/space.yaml" <<'EOF'
params:
  train.steps: 100
  train.checkpoint_every: 50
  train.lr: {loguniform: [1.0e-3, 4.0e-3]}
EOF
step search-2-trials-gpu $RAYAD tune --data "$WORK/data" --category brick --space "$WORK/space.yaml" --trials 2 \
    --gpus-per-worker 1 --out "$WORK/search" --set data.image_size=64 --set model.widths=[16,32,64]
step evaluate $RAYAD evaluate --run "$WORK/single" --data "$WORK/data" --category brick --json "$WORK/eval.json"
step predict $RAYAD predict --run "$WORK/single" "$WORK/data/brick/test" --out "$WORK/predict.parquet" \
    --heatmaps "$WORK/heatmaps"
step predict-ray-gpu $RAYAD predict --run "$WORK/single" --ray --input "$WORK/data/brick/test" \
    --out "$WORK/predict-ray" --gpus-per-actor 0.5 --cpus-per-actor 1
step predict-equals-evaluate $PY - "$WORK" <<'EOF'
import json, sys
import pyarrow.parquet as pq
work = sys.argv[1]
metrics = json.load(open(f"{work}/eval.json"))
by_path = dict(zip(metrics["paths"], metrics["scores"]))
for table in (pq.read_table(f"{work}/predict.parquet"), pq.read_table(f"{work}/predict-ray")):
    for row in table.to_pylist():
        assert abs(row["score"] - by_path[row["path"]]) <= 1e-6 * abs(by_path[row["path"]]), row
print("predict, predict --ray and evaluate agree on", len(by_path), "images")
EOF
step serve-gpu-replica $PY - "$WORK" "$RAYAD" <<'EOF'
import json, shlex, signal, socket, subprocess, sys, time
import requests
work, rayad = sys.argv[1], sys.argv[2]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
server = subprocess.Popen([*shlex.split(rayad), "serve", "--run", f"{work}/single", "--port", str(port), "--replica-gpus", "0.5"])
url = f"http://127.0.0.1:{port}"
try:
    deadline = time.time() + 240
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=30).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert server.poll() is None and time.time() < deadline, "serve did not become ready"
        time.sleep(2)
    scores = dict(zip(*(lambda m: (m["paths"], m["scores"]))(json.load(open(f"{work}/eval.json")))))
    path = next(p for p in scores if "/scratch/" in p)
    for heatmap in ("false", "true"):
        reply = requests.post(f"{url}/v1/predict?heatmap={heatmap}", data=open(path, "rb").read(), timeout=60)
        assert reply.status_code == 200, reply.text
        assert abs(reply.json()["score"] - scores[path]) <= 1e-6 * scores[path], (reply.json(), scores[path])
        assert (heatmap == "true") == ("heatmap_png" in reply.json())
    print("served == evaluate, with and without heatmaps")
finally:
    server.send_signal(signal.SIGINT)
    server.wait(timeout=60)
EOF
step gpu-tests env RAYAD_TEST_GPU=1 $PY -m pytest -q -m gpu tests/gpu
echo "failed steps: $FAILED"
exit $FAILED
