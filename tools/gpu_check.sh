#!/usr/bin/env bash
# The GPU check of issue 11, prepared to run once on a lent GPU machine (README, "The GPU check").
#
# On the GPU machine, from the repository root, with the wheels of `make gpu-wheels` in .whl/:
#     bash tools/gpu_check.sh                 # results in $OUT (set by the device tool), else /tmp/gpu_check
# A rehearsal on this CPU (small shapes, same steps):
#     DEVICE=cpu QUICK=1 PY=.venv/bin/python OUT=/tmp/gpu_rehearsal bash tools/gpu_check.sh
#
# Steps, most important first, each under its own time limit so that the whole stays within ~9 minutes, each
# logged to $OUT/gpu_check.log with its exit status (one failing step does not stop the others):
#   env           GPU, driver, torch / CUDA versions, the imports the package needs
#   bench_train   `diffret bench train` at ViT-B/32 shapes, every arch + the generator (bf16 autocast by default):
#                 step time, samples/s, peak memory, MFU against the GPU's measured bf16 matmul rate
#   bench_rerank  `diffret bench rerank --sweep full` on the GPU: Table 4's galleries and steps, the literal forms
#   runs          the same tiny run (stage 1 + stage 2, 12 steps each, fp32) without torchrun and under torchrun on
#                 1 process (NCCL): weights compared; then 2 processes: on one GPU the named error, on two or more
#                 the weights against the 1-process run
#   cuda_tests    the suite's CUDA tests (tests/test_rerank.py -k cuda)
#   bench_loader  `diffret bench loader` with pinned memory and the copy to the GPU
# $OUT keeps at most 8 files (the device tool's limit): gpu_check.log, env.txt, bench_train.json,
# bench_rerank.json, bench_rerank.ratios.json, bench_loader.json, runs.json.
set -u
DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"; : > "$LOG"
RUNS=$(mktemp -d)
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then     # packages the GPU machine lacks (open_clip, av, decord, ftfy, wcwidth)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
        || { echo "installing .whl/*.whl failed (see $LOG)"; tail -20 "$LOG"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
DIFFRET=("$PY" -c 'import sys; from diffusionret_nb.cli import main; sys.exit(main(sys.argv[1:]))')

step() {   # step NAME SECONDS COMMAND...: run it under a time limit, its output to the log, one status line to stdout
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T), limit ${limit} s): ${*: -12}" >> "$LOG"
    local t0=$SECONDS; timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1; local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    return $rc
}

{ if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; else echo "no nvidia-smi"; fi; nproc
  "$PY" -c 'import torch, open_clip, av, decord, numpy; import diffusionret_nb
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
print("open_clip", open_clip.__version__, "av", av.__version__, "numpy", numpy.__version__)'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

if [ "$QUICK" = 1 ]; then
    TRAIN=(--preset tiny --batch 2 --steps 1 --warmup 0 --archs diffusionret,generator)
    RERANK=(--sweep full --gallery 100 --steps 1,5 --ref-gallery 100 --ref-steps 5)
    LOADER=(--preset tiny --clips 4 --batches 2 --workers 0,1)
else
    TRAIN=(--steps 5 --warmup 2)
    RERANK=(--sweep full --repeats 1)   # one call per measurement: the full sweep three times over would not fit its limit
    LOADER=(--batches 8)
fi
step bench_train 150 "${DIFFRET[@]}" bench train --device "$DEVICE" "${TRAIN[@]}" --out "$OUT/bench_train.json"
step bench_rerank 150 "${DIFFRET[@]}" bench rerank --device "$DEVICE" "${RERANK[@]}" --out "$OUT/bench_rerank.json"

TINY=(--set demo -p syn_n_train=24 -p syn_n_val=8 -p syn_n_test=16 -p epochs=1 -p batch_size=8 -p stage2=true
      -p stage2_epochs=1 -p rerank_topk=8 -p eval_untrained=false -p ckpt_every_steps=2 -p precision=fp32
      -p device="$DEVICE" --quiet --out "$RUNS")
TORCHRUN=("$PY" -m torch.distributed.run --standalone)
step run_plain 75 "$PY" -m diffusionret_nb.train "${TINY[@]}" --name plain
step run_torchrun1 75 "${TORCHRUN[@]}" --nproc-per-node 1 -m diffusionret_nb.train "${TINY[@]}" --name torchrun1
step run_torchrun2 75 "${TORCHRUN[@]}" --nproc-per-node 2 -m diffusionret_nb.train "${TINY[@]}" --name torchrun2
"$PY" - "$RUNS" "$OUT/runs.json" >> "$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
import torch
runs, out = Path(sys.argv[1]), sys.argv[2]
def folder(name): return next((p for p in runs.glob(f"*{name}*") if p.is_dir()), None)
def weights(f): return torch.load(f / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) if f and (f / "checkpoints" / "last.pt").is_file() else None
def flat(d, prefix=""):
    for k, v in (d.items() if isinstance(d, dict) else ()):
        if torch.is_tensor(v) and v.is_floating_point(): yield prefix + str(k), v.float()
        elif isinstance(v, dict): yield from flat(v, prefix + str(k) + ".")
res = {"world": {n: (json.loads((folder(n) / "launch.json").read_text()) if folder(n) and (folder(n) / "launch.json").is_file() else None)
                 for n in ("plain", "torchrun1", "torchrun2")}}
base = dict(flat(weights(folder("plain")) or {}))
for n in ("torchrun1", "torchrun2"):
    other = dict(flat(weights(folder(n)) or {}))
    common = base.keys() & other.keys()
    res[n] = dict(tensors=len(common), max_abs_diff=max((float((base[k] - other[k]).abs().max()) for k in common), default=None))
for n in ("plain", "torchrun1", "torchrun2"):
    m = folder(n) and folder(n) / "metrics.json"
    res.setdefault("metrics", {})[n] = json.loads(m.read_text()) if m and m.is_file() else None
Path(out).write_text(json.dumps(res, indent=1, default=str))
print(json.dumps({k: res[k] for k in ("torchrun1", "torchrun2")}))
EOF
echo "=== runs compared: $(tail -1 "$LOG")" | tee -a "$LOG"
grep -h "LOCAL_RANK=\|Error" "$LOG" | tail -3

step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_rerank.py -k cuda
step bench_loader 60 "${DIFFRET[@]}" bench loader --device "$DEVICE" "${LOADER[@]}" --out "$OUT/bench_loader.json"

echo "--- summary"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(n):
    p = out / n
    try: return json.loads(p.read_text())
    except (OSError, ValueError): return None
for r in load("bench_train.json") or []:
    if isinstance(r, dict) and "arch" in r:
        print("train", r.get("arch"), "stage", r.get("stage"), r.get("precision"), "batch", r.get("batch"), "step ms", r.get("step_ms"),
              "samples/s", r.get("samples_per_s"), "peak MiB", r.get("peak_mib"), "MFU %", r.get("mfu_pct"))
for r in load("bench_rerank.ratios.json") or []: print("ratio", json.dumps(r))
EOF
rm -rf "$RUNS"
