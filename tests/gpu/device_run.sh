#!/usr/bin/env bash
# The gpu checks in one call on the lent nvidia-h200 machine (bare, no network): the gpu tier and
# `vitlab bench train --device cuda`. Build the kit here first (.venv/bin/python tests/gpu/device_kit.py), then:
#   run(command="bash tests/gpu/device_run.sh", carry=[".whl"], timeout_s=540)
# The timeouts below bound it to about 8 minutes (kit and versions 20 s or so, 2 minutes at most; tier 260 s; bench
# 170 s), so the call's limit holds and a rerun fits the session's 15 minutes of device time. What comes back from
# $OUT (6 files at most): nvidia_smi.csv, versions.txt, gpu_tier.log, bench_train.log, bench_train_gpu.json, and
# ray_logs.tgz after a failure.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
SITE=/tmp/site
t0=$SECONDS
step() { echo "=== $(date +%T) +$((SECONDS - t0))s $*"; }

step "kit install"
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: build the kit and carry .whl"; exit 3; }
timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl || { echo "kit install failed"; exit 3; }
# PYTHONPATH reaches every process Ray starts (workers, dashboard, agents) and the NCCL test's spawned ranks.
export PYTHONPATH="$PWD:$PWD/platform:$SITE" PATH="$SITE/bin:$PATH" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# Requirements of the kit that the image does not meet (a fallback wheel is installed where there is one).
KIT_SITE="$SITE" timeout 30 python3 tests/gpu/device_kit.py --check

step "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia_smi.csv"
timeout 30 python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "torchvision", "timm", "numpy", "pandas", "pyarrow", "pillow", "protobuf", "grpcio", "aiohttp",
             "typing_extensions", "pydantic", "ray", "mlflow-skinny", "sqlalchemy", "pytest", "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
from ray._private.accelerators import NvidiaGPUAcceleratorManager  # what Ray's resources will say: GPU trials need it

print("GPUs Ray detects:", NvidiaGPUAcceleratorManager.get_current_node_num_accelerators())
PY

# Ray counts GPUs through NVML; were that to fail here, every use_gpu=true training would wait for a GPU forever.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$(sed -n 's/^GPUs Ray detects: //p' "$OUT/versions.txt")" = 0 ] && [ "$gpus" -gt 0 ]; then
    export RAY_OVERRIDE_RESOURCES="{\"GPU\": $gpus}"
    echo "Ray's NVML count is 0 but nvidia-smi lists $gpus: RAY_OVERRIDE_RESOURCES=$RAY_OVERRIDE_RESOURCES"
fi

step "gpu tier (260 s at most; 150 s a test)"
timeout -k 10 260 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider --timeout=150 --durations=0 2>&1 |
    tee "$OUT/gpu_tier.log"
tier=${PIPESTATUS[0]}
# A tier stopped by its timeout leaves its Ray running (Ray's daemons sit in their own sessions): end it first.
[ "$tier" = 0 ] || timeout 20 python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1

step "bench train --device cuda (170 s at most)"
timeout -k 10 170 python3 -m vitlab.cli bench train --device cuda --output-json "$OUT/bench_train_gpu.json" 2>&1 |
    tee "$OUT/bench_train.log"
bench=${PIPESTATUS[0]}

if [ "$tier" != 0 ] || [ "$bench" != 0 ]; then  # Ray's and vitlab's own logs, for the failure's cause
    find $(ls -td /tmp/ray/session_2*/logs 2>/dev/null | head -3) /tmp/vitlab-*.log -type f -size -4M 2>/dev/null |
        tar -czf "$OUT/ray_logs.tgz" -T - 2>/dev/null
    [ "$(stat -c %s "$OUT/ray_logs.tgz" 2>/dev/null || echo 0)" -lt 16000000 ] || rm -f "$OUT/ray_logs.tgz"
fi

step "summary"
echo "GPU: $(tail -n +2 "$OUT/nvidia_smi.csv" | head -1)"
grep -E "^(GPUs Ray detects|torch |ray |typing_extensions )|MISSING" "$OUT/versions.txt"
[ -z "${RAY_OVERRIDE_RESOURCES:-}" ] || echo "Ray was given RAY_OVERRIDE_RESOURCES=$RAY_OVERRIDE_RESOURCES"
echo "gpu tier: exit $tier$([ "$tier" = 124 ] && echo ' (timed out)'):" \
    "$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$OUT/gpu_tier.log" | tail -1)"
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/gpu_tier.log" | cut -c1-300
grep -E "^[0-9.]+s (call|setup)" "$OUT/gpu_tier.log" | head -12
echo "bench train --device cuda: exit $bench$([ "$bench" = 124 ] && echo ' (timed out)')"
if [ -s "$OUT/bench_train_gpu.json" ]; then
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); s=r['settings']
print({k: r[k] for k in ('cpu_decode', 'gpu_decode', 'gpu_vs_cpu_decode', 'prepare_s')})
print({k: s[k] for k in ('gpu', 'ray_cpus', 'cores', 'batch_size_per_gpu', 'timed_steps', 'torch')})" \
        "$OUT/bench_train_gpu.json"
else
    tail -n 15 "$OUT/bench_train.log"
fi
echo "total $((SECONDS - t0)) s; files: $(ls "$OUT" | tr '\n' ' ')"
[ "$tier" = 0 ] && [ "$bench" = 0 ]
