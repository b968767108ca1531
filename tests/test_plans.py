"The plan layer end to end on a tiny plan: papermill entries, failures kept to themselves, skipping, reuse, the report."
import json

import pytest

from diffusionret_nb.plans import (PlanError, check_jobs, for_profile, job_status, load_plan, plan_jobs, plan_names, plan_runs, plan_status,
                                   report_plan, run_plan, select_jobs)

TINY = dict(dataset="synthetic", preset="tiny", device="cpu", syn_n_train=16, syn_n_val=8, syn_n_test=24, syn_size=32, n_frames=2,
            epochs=1, batch_size=8, max_steps=2, stage2_epochs=1, rerank_topk=4, diff_steps=10, diff_eval_steps=10,
            eval_batch_size=8, eval_untrained=False)

PLAN = """
title: tiny plan
paper: diffusionret
tables: [3a]
seeds: [0]
profiles:
  synthetic: {params: %s}
entries:
  a: {params: {stage2: true}}
  mse: {stage1: a, params: {stage2: true, gen_loss: mse}}
  bad: {template: evaluate, checkpoint: a, params: {test_limit: 3}}
  ev: {template: evaluate, checkpoint: mse, params: {diff_eval_steps: 5}}
cells:
  - {table: 3a, row: KL, entry: a}
  - {table: 3a, row: MSE, entry: bad}
compare:
  - {label: MSE − KL, a: mse, b: a}
""" % json.dumps(TINY)


def write_plan(tmp_path, text=PLAN, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    "The tiny plan run once: `a` and `mse` train, `bad` fails (3 test videos < rerank_topk 4), `ev` evaluates mse."
    tmp = tmp_path_factory.mktemp("plan")
    plan = write_plan(tmp)
    out = tmp / "results"
    res = run_plan(plan, "synthetic", out=out, progress=False, log=lambda *a: None)
    return plan, out, res


def test_every_paper_plan_loads_and_expands_under_both_profiles():
    names = plan_names()
    want = {f"diffusionret/{t}" for t in ("table1", "table2", "tableA", "table3", "table4", "table5", "tableB", "fig4", "fig5")}
    want |= {f"dits/{t}" for t in ("table1", "table2", "table4", "table5a", "table5b", "table6a", "table6b", "table11")}
    assert want <= set(names), sorted(want - set(names))
    env = dict.fromkeys(("MSRVTT_ROOT", "CLIP_WEIGHTS", "CLIP_WEIGHTS_B16", "LSMDC_ROOT", "MSVD_ROOT", "ACTIVITYNET_ROOT", "DIDEMO_ROOT",
                         "VATEX_ROOT", "CHARADES_ROOT"), "/x")
    for n in names:
        p = load_plan(n)
        assert p["minutes"].get("synthetic", 99) <= 60, n                      # no plan over an hour on 2 cores
        for profile in ("synthetic", "paper"):
            jobs = plan_jobs(p, profile, variables=env)
            assert len({j.key for j in jobs}) == len(jobs), n
            known = {j.key for j in jobs}
            assert all(d in known for j in jobs for d in j.needs), n        # every job's needs are in the plan


def test_table4_encodes_every_gallery_it_times():
    "Table 4 times feature extraction, so none of its cells may read features a checkpoint's earlier evaluation kept."
    p, env = load_plan("diffusionret/table4"), dict(MSRVTT_ROOT="/x", CLIP_WEIGHTS="/x")
    for profile in ("synthetic", "paper"):
        own = [j for j in plan_jobs(p, profile, variables=env) if j.plan == "diffusionret/table4"]
        assert len(own) == 24 and all(j.params["feature_cache"] is False for j in own), profile


def test_table3e_cells_above_the_diagonal_are_x_with_the_reason():
    p = load_plan("diffusionret/table3")
    e = [c for c in p["cells"] if c["table"] == "3e"]
    assert len(e) == 16
    na = {(c["row"], c["column"]) for c in e if "na" in c}
    assert na == {(r, c) for r in ("10", "50", "100", "1000") for c in ("10", "50", "100", "1000") if int(c) > int(r)}
    assert all("exceed" in c["na"] for c in e if "na" in c)


def test_per_profile_entries(tmp_path):
    p = load_plan("diffusionret/table2")
    syn, pap = for_profile(p, "synthetic"), for_profile(p, "paper")
    assert "dr-msvd" in pap["entries"] and "dr-msvd" not in syn["entries"] and "dr-msvd-eval" in syn["entries"]
    msvd = [c for c in syn["cells"] if c["column"] == "MSVD" and c["row"] == "DiffusionRet (Ours)"]
    assert msvd[0]["entry"] == "dr-msvd-eval"
    c4c = [c for c in syn["cells"] if c["column"] == "LSMDC" and c["row"] == "CLIP4Clip"][0]
    assert "not run under the synthetic profile" in c4c["na"]


@pytest.mark.parametrize("old,new,msg", [
    ("gen_loss: mse}", "gen_loss: mse, epoks: 2}", "entry 'mse': unknown parameter 'epoks'"),
    ("template: evaluate, checkpoint: a, params: {test_limit: 3}", "template: evaluat, checkpoint: a, params: {}", "entry 'bad': template 'evaluat'"),
    ("params: {diff_eval_steps: 5}", "params: {lr: 0.1}", "entry 'ev': parameter 'lr' changes the trained model"),
    ("stage1: a,", "stage1: b,", "entry 'mse': stage1: 'b' is not an entry"),
])
def test_a_bad_plan_fails_before_anything_runs(tmp_path, old, new, msg):
    assert old in PLAN
    plan = write_plan(tmp_path, PLAN.replace(old, new))
    with pytest.raises(PlanError, match=msg.replace("(", r"\(")):
        run_plan(plan, "synthetic", out=tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()


def test_a_bad_value_and_a_stage1_mismatch_fail_before_anything_runs(tmp_path):
    plan = write_plan(tmp_path, PLAN.replace("gen_loss: mse}", "gen_loss: mse, lr: 0.5}"))
    with pytest.raises(PlanError, match="entry 'mse'.*reuses the stage 1 of a-s0, trained with other values of \\['lr'\\]"):
        run_plan(plan, "synthetic", out=tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()


def test_a_results_folder_reached_through_a_link(tmp_path):
    "The entries' paths are resolved (here a plan's folder is a link to another disk); they still name the jobs they need."
    (tmp_path / "elsewhere").mkdir(); (tmp_path / "results").mkdir(); (tmp_path / "results" / "tiny").symlink_to(tmp_path / "elsewhere")
    jobs = plan_jobs(load_plan(write_plan(tmp_path)), "synthetic", out=tmp_path / "results")
    by, mse = {j.key: j for j in jobs}, next(j for j in jobs if j.entry == "mse")
    assert mse.params["stage1_checkpoint"] == str(tmp_path / "elsewhere" / "a-s0") and by[mse.params["stage1_checkpoint"]].entry == "a"
    check_jobs(jobs, records=False)                       # found its stage 1 (a KeyError before)


def test_only_selects_an_entry_and_what_it_needs(tmp_path):
    jobs = plan_jobs(load_plan(write_plan(tmp_path)), "synthetic", out=tmp_path)
    assert [j.label for j in select_jobs(jobs, only=["ev"])] == ["a-s0", "mse-s0", "ev-s0"]
    with pytest.raises(PlanError, match="no entry 'zz'"):
        select_jobs(jobs, only=["zz"])


def test_a_failed_entry_does_not_stop_the_others(ran):
    plan, out, res = ran
    assert {k: v[0] for k, v in res.items()} == {"a-s0": "done", "mse-s0": "done", "bad-s0": "failed", "ev-s0": "done"}
    assert "exceeds" in res["bad-s0"][1] or "rerank_topk" in res["bad-s0"][1], res["bad-s0"]
    d = out / "tiny"
    for e in ("a-s0", "mse-s0", "ev-s0"):
        for f in ("params.json", "metrics.json", "executed.ipynb", "log.txt", "entry.json", "eval_arrays.npz"):
            assert (d / e / f).is_file(), (e, f)
    assert (d / "bad-s0" / "error.txt").is_file() and (d / "bad-s0" / "executed.ipynb").is_file()
    assert not (d / "bad-s0" / "metrics.json").exists()
    st = dict((n, (s, detail)) for n, s, detail in plan_status(plan, out))
    assert st["bad-s0"][0] == "failed" and st["bad-s0"][1] and st["a-s0"] == ("done", "")
    assert plan_status(load_plan(plan), out) == plan_status(plan, out)          # a plan already read, as `plan status` passes it


def test_stage1_is_reused_not_retrained(ran):
    plan, out, res = ran
    mse = json.loads((out / "tiny" / "mse-s0" / "metrics.json").read_text())
    assert mse["stage1"]["selected"] == {"stage1_checkpoint": str(out.resolve() / "tiny" / "a-s0" / "checkpoints" / "best.pt")}
    a = json.loads((out / "tiny" / "a-s0" / "metrics.json").read_text())
    assert mse["stage1"]["t2v"] == a["stage1"]["t2v"]                         # the same stage 1 on the same test split
    assert not (out / "tiny" / "mse-s0" / "checkpoints" / "best.pt").exists()
    ev = json.loads((out / "tiny" / "ev-s0" / "metrics.json").read_text())
    assert ev["rerank"]["steps"] == 5 and ev["stage1"]["t2v"] == a["stage1"]["t2v"]


def test_a_rerun_skips_finished_entries_and_retries_the_failed_one(ran, tmp_path):
    plan, out, _ = ran
    before = {e: (out / "tiny" / e / "metrics.json").stat().st_mtime_ns for e in ("a-s0", "mse-s0", "ev-s0")}
    res = run_plan(plan, "synthetic", out=out, progress=False, log=lambda *a: None)
    assert {k: v[0] for k, v in res.items()} == {"a-s0": "done", "mse-s0": "done", "bad-s0": "failed", "ev-s0": "done"}
    assert all(res[e][1] == "already complete" for e in before)
    assert before == {e: (out / "tiny" / e / "metrics.json").stat().st_mtime_ns for e in before}
    with pytest.raises(PlanError, match="made with other values of \\['epochs'\\]"):     # another -p: refuse, do not mix
        run_plan(plan, "synthetic", {"epochs": 2}, out=out, progress=False)


def test_the_report_renders_missing_cells_and_the_paper_labels(ran):
    plan, out, _ = ran
    rep = report_plan(plan, out)
    md = (rep / "table.md").read_text()
    assert "Synthetic analogue" in md and "profile `synthetic`" in md
    assert "—" in md and "diffret plan run" in md and "--only bad" in md             # the failed cell and its command
    tex, csv = (rep / "table.tex").read_text(), (rep / "table.csv").read_text()
    for label in ("KL", "MSE", "R@1", "MnR"): assert label in tex and label in csv, label
    assert "\\toprule" in tex and "\\bottomrule" in tex
    assert (rep / "report.ipynb").is_file()


def test_a_report_before_any_run_shows_the_profiles_cells(tmp_path):
    # Table 2 names some cells' entries per profile (MSVD); with nothing run the report used to fail on them
    rep = report_plan("diffusionret/table2", tmp_path)
    md = (rep / "table.md").read_text()
    assert "profile `synthetic`" in md and "0 of" in md
    assert "dr-msvd-eval" in md and "dr-lsmdc" in md                          # the synthetic entries' commands
    assert md.count("—") >= 9                                                 # 3 rows x 3 columns run here, none finished
    rep = report_plan("diffusionret/table2", tmp_path / "paper", profile="paper")
    md = (rep / "table.md").read_text()
    assert "profile `paper`" in md and "`dr-msvd` not run yet" in md and "dr-msvd-eval" not in md


def test_plan_runs_name_the_folders(tmp_path):
    p = load_plan(write_plan(tmp_path))
    assert [r["dir"].name for r in plan_runs(p, tmp_path)] == ["a-s0", "mse-s0", "bad-s0", "ev-s0"]
    assert job_status(tmp_path / "nothing") == ("not run", "")


def test_parallel_entries_share_the_cores():
    from diffusionret_nb.plans import _threads
    import os
    cores = len(os.sched_getaffinity(0))
    assert _threads(1) == {}                                                    # one entry: torch's default
    assert _threads(2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert _threads(cores * 4)["OMP_NUM_THREADS"] == "1"


# --- executors: the same plan through submitit's LocalExecutor (real subprocesses, the path `--executor slurm` takes) ---

def _same(x, y, out_x, out_y, where=""):
    "Differences between two metrics.json trees (run folders' own paths and timings aside)."
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y): return [f"{where}: keys {sorted(set(x) ^ set(y))}"]
        return [d for k in x if not any(t in k for t in ("time", "second", "sec_", "per_s", "_s", "wall", "date", "memory"))
                for d in _same(x[k], y[k], out_x, out_y, f"{where}.{k}")]
    if isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y): return [f"{where}: length {len(x)} != {len(y)}"]
        return [d for i, (a, b) in enumerate(zip(x, y)) for d in _same(a, b, out_x, out_y, f"{where}[{i}]")]
    if isinstance(x, str) and isinstance(y, str): x, y = x.replace(str(out_x), "<out>"), y.replace(str(out_y), "<out>")
    return [] if x == y else [f"{where}: {x!r} != {y!r}"]


@pytest.fixture(scope="module")
def ran_submitit(ran, tmp_path_factory):
    "Two entries of the tiny plan run again through `--executor submitit-local`: `bad` (fails) and `a`, whose stage 1 it needs."
    pytest.importorskip("submitit")
    plan = ran[0]
    out = tmp_path_factory.mktemp("plan_submitit") / "results"
    res = run_plan(plan, "synthetic", out=out, progress=False, log=lambda *a: None, executor="submitit-local", n_jobs=2, poll_s=0.2,
                   only=["bad"])
    return plan, out, res


def test_submitit_local_ends_as_the_local_executor(ran, ran_submitit):
    plan, out_l, res_l = ran
    _, out_s, res_s = ran_submitit
    assert {k: v[0] for k, v in res_s.items()} == {k: res_l[k][0] for k in ("a-s0", "bad-s0")}   # bad-s0 failed, a-s0 done
    for e in ("a-s0", "bad-s0"):
        dl, ds = out_l / "tiny" / e, out_s / "tiny" / e
        assert sorted(p.name for p in ds.iterdir()) == sorted(p.name for p in dl.iterdir()), e
        if e == "bad-s0":
            assert (ds / "error.txt").read_text().splitlines()[0] == (dl / "error.txt").read_text().splitlines()[0]
            continue
        ml, ms = (json.loads((d / "metrics.json").read_text()) for d in (dl, ds))
        assert not _same(ml, ms, out_l.resolve(), out_s.resolve()), _same(ml, ms, out_l.resolve(), out_s.resolve())[:5]
    status_l = {r[0]: r[1] for r in plan_status(plan, out_l)}
    assert {r[0]: r[1] for r in plan_status(plan, out_s) if r[0] in ("a-s0", "bad-s0")} == {e: status_l[e] for e in ("a-s0", "bad-s0")}


def test_submitit_local_waits_for_dependencies_and_records_its_jobs(ran_submitit):
    plan, out, _ = ran_submitit
    d = out / "tiny"
    started = lambda e: (d / e / "entry.json").stat().st_mtime
    finished = lambda e: (d / e / "metrics.json").stat().st_mtime
    assert started("bad-s0") >= finished("a-s0")                                    # it needs a's stage 1
    for e in ("a-s0", "bad-s0"):
        rec = json.loads((d / "slurm" / "jobs" / f"{e}.json").read_text())
        assert rec["executor"] == "submitit-local" and rec["entry"] == str(d / e)
        assert (d / "slurm" / f"{rec['job_id']}_0_log.out").is_file()                       # submitit's log, beside the entries
        assert "exit status" in (d / "slurm" / f"{rec['job_id']}_0_log.out").read_text()
    res = run_plan(plan, "synthetic", out=out, progress=False, log=lambda *a: None, executor="submitit-local", only=["a"], poll_s=0.2)
    assert {k: v[1] for k, v in res.items()} == {"a-s0": "already complete"}


def test_a_background_plan_stops_on_sigterm_and_resumes(tmp_path):
    # `diffret plan run ... &` ignores SIGINT (the shell's doing) and `kill` sends SIGTERM: both must stop the command *and*
    # its entries like Ctrl-C (exit 130), not leave the entries running unwatched, and the same command must then finish
    import os, signal, subprocess, sys, time
    text = PLAN.split("  mse:")[0] + "cells:\n  - {table: 3a, row: KL, entry: a}\n"       # entry a alone
    plan = write_plan(tmp_path, text)
    out = tmp_path / "res"
    from pathlib import Path
    cmd = [str(Path(sys.executable).parent / "diffret"), "plan", "run", str(plan), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    log = out / "tiny" / "a-s0" / "log.txt"
    t0 = time.time()
    while not (log.is_file() and "kernel" in log.read_text().lower()) and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=90)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text and "interrupted: the same command resumes this entry" in log.read_text()
    assert job_status(out / "tiny" / "a-s0")[0] != "done"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert job_status(out / "tiny" / "a-s0")[0] == "done"


def test_status_lists_the_runs_of_one_profile(tmp_path):
    "`plan status` counts the runs the profile makes (another plan's it needs included), not every profile's entries."
    syn = {n: s for n, s, _ in plan_status("diffusionret/table2", tmp_path)}           # nothing run: the synthetic profile
    assert "dr-msvd-eval-s0" in syn and "dr-msvd-s0" not in syn and "clip4clip-lsmdc-s0" not in syn
    assert {"diffusionret/table1:dr-s0", "diffusionret/table1:clip4clip-s2"} <= set(syn)  # the MSVD analogue evaluates them
    assert len([n for n in syn if ":" not in n]) == 33 and set(syn.values()) == {"not run"}
    pap = {n for n, _, _ in plan_status("diffusionret/table2", tmp_path, profile="paper")}
    assert "dr-msvd-s0" in pap and "clip4clip-lsmdc-s0" in pap and "dr-msvd-eval-s0" not in pap
    with pytest.raises(PlanError, match="no profile 'papr'"):
        plan_status("diffusionret/table2", tmp_path, profile="papr")
