"""Time the demo's stage-1 training step under thread settings, alone and beside one competing busy process.

    .venv/bin/python tools/bench_threads.py [--steps 6] [--out threads.json]

Each setting runs in its own process (OMP_* variables only take effect before torch loads): torch threads 1 or 2,
OpenMP's default (spinning) or passive waiting, and as competitor nothing, a Python busy loop, or another torch job
with 2 threads and default settings (the case that made the demo 7x slower). Prints the median wall seconds per
step (first step dropped) and the ratio to the quiet 2-thread default. Every competitor is killed at the end of its
setting. Compare ratios within one run, on an otherwise quiet machine."""
import argparse
import json
import os
import subprocess
import sys
import time

STEP = r"""
import json, os, statistics, sys, time, torch
from diffusionret_nb.benchmarks import load_records, resolve_config
from diffusionret_nb.config import build_config, load_paramset
from diffusionret_nb.models import param_groups
from diffusionret_nb.registry import create_model
from diffusionret_nb.training import make_learner, train_loader
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
cfg = resolve_config(build_config(**load_paramset("demo")))
torch.manual_seed(0)
model = create_model(cfg)
dl = train_loader(cfg, load_records(cfg, "train"))
batches = [b for b, _ in zip(dl, range(int(os.environ["BENCH_STEPS"])))]
t = cfg.train
learn = make_learner(cfg, model, dl, "/tmp/bench_threads_ck", groups=param_groups(model, t.lr, t.clip_lr_coef, t.weight_decay,
                     cfg.model.freeze_patch_conv), epochs=t.epochs, progress=False)
learn.n_epochs = t.epochs; learn("before_fit"); model.train()
walls = []
for b in batches:
    b.pop("n_skipped", None)
    w0 = time.perf_counter()
    learn.batch = b; learn("before_batch")
    loss = model(learn.batch)["loss"]; loss.backward(); learn.opt.step(); learn.opt.zero_grad(set_to_none=True)
    walls.append(time.perf_counter() - w0)
print(json.dumps(dict(median=statistics.median(walls[1:]), walls=[round(w, 3) for w in walls])))
"""

BUSY = {"python": [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 600: pass"],
        "torch": [sys.executable, "-c", "import time, torch\na = torch.randn(1024, 1024)\nt = time.time()\n"
                                        "while time.time() - t < 600: a @ a"]}


def run(threads: int, passive: bool, competitor: str, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(BENCH_THREADS=str(threads), BENCH_STEPS=str(steps))
    if passive: env["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = None
    if competitor != "none":
        benv = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}   # the competitor: torch's defaults
        busy = subprocess.Popen(BUSY[competitor], env=benv)
        time.sleep(2)
    try:
        out = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=900, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["median"]
    finally:
        if busy: busy.kill(); busy.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="training steps per setting (default 6; the first is not counted)")
    ap.add_argument("--out", help="write the records to this JSON file")
    a = ap.parse_args()
    settings = [(2, False), (2, True), (1, False)]
    recs = []
    print(f"{'threads':>7} {'waiting':>8} {'competitor':>10} {'s/step':>7} {'ratio':>6}", flush=True)
    for comp in ("none", "python", "torch"):
        for threads, passive in settings:
            sec = run(threads, passive, comp, a.steps)
            recs.append(dict(threads=threads, passive=passive, competitor=comp, seconds=round(sec, 3)))
            base = recs[0]["seconds"]
            print(f"{threads:>7} {'passive' if passive else 'spin':>8} {comp:>10} {sec:7.3f} {sec / base:6.2f}", flush=True)
    if a.out:
        with open(a.out, "w") as f: json.dump(recs, f, indent=2)


if __name__ == "__main__":
    main()
