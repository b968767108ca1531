"""The prepared GPU check (tools/gpu_check.sh): it parses, the wheels it installs on the GPU machine are the versions
this project pins, and (DIFFRET_SLOW=1) a rehearsal of every step on this CPU passes and compares its runs."""
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_the_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_wheels_are_the_pinned_versions():
    "Each wheel of `make gpu-wheels` is requirements.txt's pin, or (for a dependency it does not pin) the installed version."
    wheels = re.search(r"^GPU_WHEELS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    pins = dict(l.split("==") for l in (ROOT / "requirements.txt").read_text().splitlines() if "==" in l and not l.startswith("#"))
    assert {w.split("==")[0] for w in wheels} >= {"open_clip_torch", "decord", "av"}
    for w in wheels:
        name, ver = w.split("==")
        assert ver == pins.get(name, version(name)), f"{w}: requirements.txt / the installed package say {pins.get(name, version(name))}"
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()                 # the wheels never get committed


def test_the_tiny_run_is_the_suites():
    "The script's tiny run is tests/test_distributed.py's (plus fp32 and the device), so the two cannot drift apart."
    from test_distributed import TINY
    body = re.search(r"^TINY=\((.*?)\)$", SCRIPT.read_text(), re.M | re.S).group(1)
    words = [w.replace('"', "") for w in body.split()]
    assert words == TINY[:-1] + ["-p", "precision=fp32", "-p", "device=$DEVICE", "--quiet", "--out", "$RUNS"], words


@pytest.mark.skipif(os.environ.get("DIFFRET_SLOW") != "1", reason="a rehearsal of the GPU check (~90 s on 2 cores); DIFFRET_SLOW=1")
def test_rehearsal_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PY": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = dict(re.findall(r"^=== (\w+) rc=(\d+)", r.stdout, re.M))
    assert steps == {s: "0" for s in ("bench_train", "bench_rerank", "run_plain", "run_torchrun1", "run_torchrun2",
                                      "cuda_tests", "bench_loader")}, r.stdout
    assert len(list(out.iterdir())) <= 8                                          # the device tool brings back 8 files
    runs = json.loads((out / "runs.json").read_text())
    assert runs["torchrun1"]["tensors"] > 100 and runs["torchrun1"]["max_abs_diff"] == 0.0   # torchrun with 1 process: the same run
    assert runs["torchrun2"]["max_abs_diff"] <= 1e-4                              # 2 processes: the suite's tolerance
    assert runs["world"]["torchrun2"]["processes"] == 2
    assert any(r["arch"] == "diffusionret" for r in json.loads((out / "bench_train.json").read_text()) if "arch" in r)
