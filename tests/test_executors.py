"""Plan executors (local, slurm, submitit-local) without running a notebook: the scheduler's order, failures, Slurm's
resubmission and reattachment, resources and their errors, dry runs; `diffret train --nproc` and the bench dispatch.

A stand-in for submitit "runs" an entry by writing its metrics.json (or error.txt, or nothing: a killed job), so these
tests take seconds; tests/test_plans.py runs a real tiny plan through submitit's LocalExecutor."""
import json
import sys
import types
from pathlib import Path

import pytest

from diffusionret_nb import cli, plans
from diffusionret_nb.plans import (PlanError, ResourceError, check_resources, job_record_path, load_plan, plan_jobs, plan_status,
                                   run_plan, slurm_parameters)

TOY = """
title: toy
paper: diffusionret
tables: [3a]
seeds: [0]
minutes: {synthetic: 20}
profiles:
  synthetic: {params: {dataset: synthetic, preset: tiny, syn_n_train: 16, syn_n_val: 8, syn_n_test: 24, syn_size: 32, n_frames: 2, rerank_topk: 4}, resources: {cpus: 4}}
  paper: {params: {dataset: synthetic, preset: tiny}}
entries:
  s1: {per_seed: false, params: {stage2: false}, resources: {time_min: "1:00:00", paper: {gpus: 2, partition: big}}}
  kl: {stage1: s1, params: {stage2: true}}
  mse: {stage1: s1, params: {stage2: true, gen_loss: mse}}
  ev: {template: evaluate, checkpoint: kl, params: {diff_eval_steps: 5}}
"""


def write(tmp_path, text=TOY):
    p = tmp_path / "toy.yaml"
    p.write_text(text)
    return p


class FakeSubmitit:
    "Jobs that finish on their second look: `done` writes metrics.json, `fail` error.txt (exit 1), `kill` nothing (no result)."
    def __init__(self, outcome=None, states=None):
        self.outcome, self.states, self.submitted, self.params = outcome or {}, states or {}, [], {}
        fake = self

        class Job:
            def __init__(self, folder=None, job_id=None, entry=None):
                self.folder, self.job_id, self.entry, self.looks = folder, str(job_id), entry, 0
                self.paths = types.SimpleNamespace(stdout=Path(str(folder)) / f"{job_id}_0_log.out")
                if self.entry is None: self.entry = fake.states.get(f"{self.job_id}:entry")

            @property
            def state(self): return fake.states.get(self.job_id, "UNKNOWN")             # what sacct says

            def done(self):
                self.looks += 1
                if self.looks < 2: return False
                what = fake.outcome.get(Path(self.entry).name, "done")
                if what == "done": (Path(self.entry) / "metrics.json").write_text("{}")
                if what == "fail": (Path(self.entry) / "error.txt").write_text("ValueError: a bad entry\n")
                fake.states[self.job_id] = "TIMEOUT" if what == "kill" else "COMPLETED"
                return True

            def result(self):
                if fake.outcome.get(Path(self.entry).name) == "kill": raise RuntimeError("Job 3 (task: 0) with path x\nhas not produced any output (state: TIMEOUT)")
                return 1 if fake.outcome.get(Path(self.entry).name) == "fail" else 0

            def cancel(self, check=True): fake.cancelled.append(self.job_id)

        class Executor:
            def __init__(self, folder): self.folder = folder
            def update_parameters(self, **kw): self.kw = kw
            def submit(self, fn, entry_json, env):
                assert fn is plans.submitted_entry
                d = Path(entry_json).parent
                needs = json.loads(Path(entry_json).read_text())["needs"]
                fake.submitted.append((d.name, sorted(Path(n).name for n in needs if (Path(n) / "metrics.json").is_file())))
                fake.params[d.name] = dict(self.kw, env=env, folder=self.folder)
                fake.states[str(100 + len(fake.submitted))] = "RUNNING"
                return Job(self.folder, 100 + len(fake.submitted), str(d))

        self.cancelled = []
        self.SlurmExecutor = self.LocalExecutor = Executor
        self.SlurmJob = Job


@pytest.fixture
def fake(monkeypatch):
    f = FakeSubmitit()
    monkeypatch.setattr(plans, "_import_submitit", lambda name: f)
    monkeypatch.setattr(plans.shutil, "which", lambda name: f"/usr/bin/{name}")       # a cluster's sbatch
    return f


def run(tmp_path, executor="slurm", **kw):
    return run_plan(write(tmp_path), "synthetic", out=tmp_path / "out", progress=False, log=kw.pop("log", lambda *a: None),
                    executor=executor, poll_s=0.001, **kw)


def test_dependents_are_submitted_only_once_what_they_need_is_done(tmp_path, fake):
    res = run(tmp_path)
    assert {k: v[0] for k, v in res.items()} == dict.fromkeys(("s1", "kl-s0", "mse-s0", "ev-s0"), "done")
    order = [n for n, _ in fake.submitted]
    assert order[0] == "s1" and order.index("ev-s0") > order.index("kl-s0")
    assert dict(fake.submitted) == {"s1": [], "kl-s0": ["s1"], "mse-s0": ["s1"], "ev-s0": ["kl-s0"]}   # their needs were done
    assert [r[1] for r in plan_status(write(tmp_path), tmp_path / "out")] == ["done"] * 4
    before = len(fake.submitted)
    res = run(tmp_path)                                                           # a finished entry is skipped
    assert len(fake.submitted) == before and all(v[1] == "already complete" for v in res.values())


def test_slurm_resources_and_threads(tmp_path, fake):
    run(tmp_path, resources=dict(partition="gpu", mem_gb="16G", sbatch={"reservation": "mine"}))
    p = fake.params
    assert p["s1"]["time"] == 60 and p["kl-s0"]["time"] == 40                    # the entry's; else twice the plan's 20 minutes
    assert p["s1"]["cpus_per_task"] == 4 and p["s1"]["env"]["OMP_NUM_THREADS"] == "4"   # the profile's cpus, and torch's threads
    assert p["s1"]["partition"] == "gpu" and p["s1"]["mem"] == "16G" and "gpus_per_node" not in p["s1"]
    assert p["s1"]["additional_parameters"] == {"reservation": "mine"} and p["s1"]["job_name"] == "diffret:toy:s1"
    assert Path(p["s1"]["folder"]) == tmp_path / "out" / "toy" / "slurm"
    rec = json.loads(job_record_path(tmp_path / "out" / "toy" / "s1").read_text())
    assert rec["executor"] == "slurm" and rec["job_id"] == "101" and rec["resources"]["partition"] == "gpu"


def test_paper_profile_defaults_and_per_profile_entry_resources(tmp_path):
    jobs = {j.label: j for j in plan_jobs(load_plan(write(tmp_path)), "paper", out=tmp_path)}
    assert jobs["s1"].resources == dict(gpus=2, cpus=8, mem_gb=64, time_min=60, partition="big")
    assert jobs["kl-s0"].resources == dict(gpus=1, cpus=8, mem_gb=64, time_min=1440)         # no minutes for paper: 24 h
    assert jobs["ev-s0"].resources["time_min"] == 240                                           # an evaluation: 4 h


def test_the_submitted_parameters_are_ones_submitit_accepts(tmp_path):
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string
    res = check_resources(dict(gpus=1, cpus=8, mem_gb=64, time_min="1-00:00", partition="gpu", qos="high", setup=["module load cuda"],
                               sbatch={"reservation": "mine"}), "here")
    text = _make_sbatch_string(command="python -m x", folder=str(tmp_path), **slurm_parameters(res, "diffret:toy:s1"))
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G", "#SBATCH --time=1440",
                 "#SBATCH --partition=gpu", "#SBATCH --qos=high", "#SBATCH --reservation=mine", "#SBATCH --job-name=diffret:toy:s1",
                 "module load cuda"):
        assert line in text, line
    ex = submitit.LocalExecutor(folder=tmp_path / "l")
    ex.update_parameters(**plans.local_parameters(res))
    assert ex.parameters["timeout_min"] == 1440


def test_a_failed_or_killed_entry_blocks_only_what_needs_it(tmp_path, fake):
    fake.outcome.update({"kl-s0": "kill", "mse-s0": "fail"})
    res = run(tmp_path)
    assert {k: v[0] for k, v in res.items()} == {"s1": "done", "kl-s0": "failed", "mse-s0": "failed", "ev-s0": "blocked"}
    assert "slurm job" in res["kl-s0"][1] and "TIMEOUT" in res["kl-s0"][1] and "slurm/" in res["kl-s0"][1]
    assert res["mse-s0"][1] == "ValueError: a bad entry" and "needs kl-s0" in res["ev-s0"][1]
    st = {n: (s, d) for n, s, d in plan_status(write(tmp_path), tmp_path / "out")}
    assert st["kl-s0"][0] == "failed" and "TIMEOUT" in st["kl-s0"][1]      # the killed job left error.txt saying so
    fake.outcome.clear()
    res = run(tmp_path)                                                   # the same command retries them
    assert {k: v[0] for k, v in res.items()} == dict.fromkeys(("s1", "kl-s0", "mse-s0", "ev-s0"), "done")


def test_a_rerun_waits_for_a_live_slurm_job_instead_of_submitting_it_again(tmp_path, fake):
    d = tmp_path / "out" / "toy" / "s1"
    d.mkdir(parents=True)
    plans.atomic_write_json(job_record_path(d), dict(executor="slurm", job_id="77", folder=str(d.parent / "slurm"), entry=str(d)))
    fake.states.update({"77": "RUNNING", "77:entry": str(d)})
    lines = []
    res = run(tmp_path, log=lines.append)
    assert res["s1"][0] == "done" and "s1" not in [n for n, _ in fake.submitted]
    assert any("Slurm job 77 of an earlier run is RUNNING; waiting for it" in ln for ln in lines)


def test_a_rerun_resubmits_an_ended_slurm_job_and_removes_its_stale_lock(tmp_path, fake):
    d = tmp_path / "out" / "toy" / "s1"
    d.mkdir(parents=True)
    (d / ".lock").write_text(json.dumps(dict(pid=4242, host="node-17", since="earlier")))
    plans.atomic_write_json(job_record_path(d), dict(executor="slurm", job_id="78", folder=str(d.parent / "slurm"), entry=str(d)))
    fake.states.update({"78": "TIMEOUT", "78:entry": str(d)})
    lines = []
    res = run(tmp_path, log=lines.append)
    assert res["s1"][0] == "done" and fake.submitted[0][0] == "s1" and not (d / ".lock").exists()
    assert any("removed the lock left by Slurm job 78 (TIMEOUT)" in ln for ln in lines)


def test_ctrl_c_leaves_submitted_slurm_jobs_running_and_says_so(tmp_path, fake, monkeypatch):
    lines = []
    def interrupt(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(fake.SlurmJob, "done", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, log=lines.append)
    assert fake.cancelled == [] and any("keep running" in ln and "scancel 101" in ln for ln in lines)
    assert json.loads(job_record_path(tmp_path / "out" / "toy" / "s1").read_text())["job_id"] == "101"   # what a rerun waits for


def test_submitit_local_jobs_are_stopped_on_ctrl_c(tmp_path, fake, monkeypatch):
    def done(self):
        if not fake.cancelled: raise KeyboardInterrupt
        return True
    monkeypatch.setattr(fake.SlurmJob, "done", done)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, executor="submitit-local")
    assert fake.cancelled == ["101"]


@pytest.mark.parametrize("old,new,msg", [
    ("resources: {cpus: 4}", "resources: {cpus: 0}", r"profile 'synthetic': resources: cpus must be an integer >= 1"),
    ('time_min: "1:00:00"', 'time_min: "an hour"', r"entry 's1': resources: time_min must be"),
    ("gpus: 2, partition: big", "gpus: two, partition: big", r"entry 's1': resources: paper: gpus must be an integer >= 0"),
    ("resources: {cpus: 4}", "resources: {cpu: 4}", r"profile 'synthetic': resources: unknown resource 'cpu'"),
    ("partition: big", "partition: 'big queue'", r"paper: partition must be a word"),
])
def test_bad_resources_in_a_plan_are_named_errors(tmp_path, old, new, msg):
    assert old in TOY
    with pytest.raises(ResourceError, match=msg) as e:
        load_plan(write(tmp_path, TOY.replace(old, new)))
    assert str(tmp_path / "toy.yaml") in str(e.value)                   # the file


def test_executor_errors_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(PlanError, match="unknown executor 'slurmm'"):
        run(tmp_path, executor="slurmm")
    with pytest.raises(ResourceError, match="apply to --executor slurm or submitit-local, not local"):
        run(tmp_path, executor="local", resources=dict(gpus=1))
    monkeypatch.setattr(plans.shutil, "which", lambda name: None)
    pytest.importorskip("submitit")
    with pytest.raises(PlanError, match="no Slurm here .*submitit-local"):
        run(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)                        # submitit not installed
    with pytest.raises(PlanError, match="needs submitit: pip install submitit"):
        run(tmp_path, executor="submitit-local")
    with pytest.raises(PlanError, match="--jobs must be an integer >= 1"):
        run(tmp_path, executor="local", n_jobs=0)
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_jobs_resources_and_dependencies(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)                        # a dry run needs neither submitit nor Slurm
    rc = cli.main(["plan", "run", str(write(tmp_path)), "--out", str(tmp_path / "out"), "--executor", "slurm", "--dry-run",
                   "--slurm-partition", "gpu", "--slurm-time", "2:00:00", "--slurm-option", "reservation=mine"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "out").exists()
    assert "# s1 (not run)\n#   slurm job: gpus=0 cpus=4 mem=8G time=120min partition=gpu --reservation=mine; submitted at once" in out
    assert "# ev-s0 (not run), after kl-s0\n#   slurm job: gpus=0 cpus=4 mem=8G time=120min partition=gpu --reservation=mine; " \
           "submitted once kl-s0 is done" in out
    assert out.count("papermill ") == 4
    rc = cli.main(["plan", "run", str(write(tmp_path)), "--out", str(tmp_path / "out"), "--dry-run"])       # local: as before
    assert rc == 0 and "slurm job" not in capsys.readouterr().out


@pytest.mark.parametrize("flags,msg", [
    (["--slurm-gpus", "-1"], "--slurm-gpus: gpus must be an integer >= 0"),
    (["--slurm-time", "tomorrow"], "--slurm-time: time_min must be"),
    (["--slurm-mem", "lots"], "--slurm-mem: mem_gb must be"),
    (["--slurm-cpus", "0"], "--slurm-cpus: cpus must be an integer >= 1"),
    (["--slurm-option", "time=10"], "--slurm-option: sbatch: 'time' is set by the resource keys"),
    (["--slurm-option", "reservation"], "--slurm-option expects NAME=VALUE"),
])
def test_bad_resource_options_exit_2_naming_the_option(tmp_path, capsys, flags, msg):
    rc = cli.main(["plan", "run", str(write(tmp_path)), "--out", str(tmp_path / "out"), "--executor", "slurm", "--dry-run", *flags])
    assert rc == 2 and msg in capsys.readouterr().err


def test_slurm_options_need_a_submitit_executor(tmp_path, capsys):
    rc = cli.main(["plan", "run", str(write(tmp_path)), "--out", str(tmp_path / "out"), "--slurm-gpus", "1", "--dry-run"])
    assert rc == 2 and "apply to --executor slurm or submitit-local" in capsys.readouterr().err


# --- diffret train --nproc ---

def args(*argv):
    return cli._parser().parse_args(list(argv))


def test_torchrun_command_single_and_multi_node():
    cmd = cli.torchrun_command(args("train", "--set", "demo", "-p", "epochs=1", "-p", "lr=1e-4", "--params", "p.json",
                                    "--nproc", "4", "--name", "r1", "--quiet"))
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone", "-m",
                   "diffusionret_nb.train", "--set", "demo", "-p", "epochs=1", "-p", "lr=1e-4", "--params", "p.json",
                   "--out", "results/train", "--name", "r1", "--quiet"]
    cmd = cli.torchrun_command(args("train", "--nproc", "8", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "10.0.0.1:29500",
                                    "--force"))
    assert cmd[3:] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                       "10.0.0.1:29500", "-m", "diffusionret_nb.train", "--out", "results/train", "--force"]
    assert "--nproc" not in cmd and "--standalone" not in cmd


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--nproc", "2"], "--nproc: distributed training is `diffret train --nproc N`, not `diffret demo`"),
    (["train", "--nproc", "-1"], "--nproc must be >= 1"),
    (["train", "--nproc", "2", "--nnodes", "0"], "--nnodes must be >= 1"),
    (["train", "--node-rank", "1"], "need --nproc N"),
    (["train", "--nproc", "2", "--nnodes", "2", "--node-rank", "1"], "needs --rdzv-endpoint HOST:PORT"),
    (["train", "--nproc", "2", "--nnodes", "3", "--node-rank", "3", "--rdzv-endpoint", "h:1"], "--node-rank must be in 0 .. 2"),
    (["train", "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:99999"], "port 1-65535"),
])
def test_bad_torchrun_options_exit_2_naming_them(capsys, argv, msg):
    assert cli.main(argv) == 2 and msg in capsys.readouterr().err


def test_train_nproc_checks_parameters_then_passes_torchruns_exit_status_through(capsys, monkeypatch):
    assert cli.main(["train", "--nproc", "2", "-p", "epochz=1"]) == 2                   # a bad parameter: before torchrun starts
    assert "unknown parameter 'epochz'" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "diffusionret_nb.train" else real(n, *a))
    seen, real_command = [], cli.torchrun_command
    def fake_command(a):
        seen.append(real_command(a))
        return [sys.executable, "-c", "import sys; print('rank stand-in'); sys.exit(3)"]
    monkeypatch.setattr(cli, "torchrun_command", fake_command)
    assert cli.main(["train", "--set", "demo", "--nproc", "2"]) == 3
    assert "torchrun: " in capsys.readouterr().out and seen[0][-4:] == ["--set", "demo", "--out", "results/train"]


def test_train_nproc_without_the_train_module_is_a_named_error(capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "diffusionret_nb.train" else real(n, *a))
    assert cli.main(["train", "--nproc", "2"]) == 2 and "nbs/71_train.ipynb" in capsys.readouterr().err


# --- diffret bench train | loader ---

def test_bench_train_and_loader_dispatch(monkeypatch, capsys):
    calls = []
    mod = types.ModuleType("diffusionret_nb.bench_train")
    mod.bench_train_main = lambda a: calls.append(("train", a)) or 0
    mod.bench_loader_main = lambda a: calls.append(("loader", a)) or 4
    monkeypatch.setitem(sys.modules, "diffusionret_nb.bench_train", mod)
    assert cli.main(["bench", "train", "--steps", "3"]) == 0 and cli.main(["bench", "loader", "-h"]) == 4
    assert calls == [("train", ["--steps", "3"]), ("loader", ["-h"])]
    monkeypatch.setitem(sys.modules, "diffusionret_nb.bench_train", None)            # not in this checkout
    assert cli.main(["bench", "train"]) == 2 and "nbs/56_bench_train.ipynb" in capsys.readouterr().err
