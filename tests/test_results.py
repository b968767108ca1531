"""The report layer on fabricated run folders: tables laid out as the paper's (mean ± std over seeds, — with
the command that fills it, × with its reason), the paired bootstrap's known answers, the comparisons, the
synthetic banner, the CSV / LaTeX / figure files, and the report notebook executed end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffusionret_nb import results as R

ROOT = Path(__file__).resolve().parents[1]
PAPER_CSV = """paper,table,row,column,metric,value,note
toy,3a,MSE,Text-to-Video,R@1,48.1,
toy,3a,MSE,Text-to-Video,R@5,73.9,
toy,3a,KL,Text-to-Video,R@1,49.0,
toy,3a,KL,Text-to-Video,R@5,75.2,
toy,3e,10,10,R@1,47.2,
toy,3e,10,50,R@1,,× eval steps above train steps
toy,3e,50,10,R@1,48.5,
toy,3e,50,50,R@1,49.0,
toy,4,"DiffusionRet (Ours), 1 steps","1,000",Inference Time (s),59.02,
toy,4,"DiffusionRet (Ours), 1 steps","1,000",GPU Memory (M),3253,
toy,4,"DiffusionRet (Ours), 1 steps","1,000",R@1,23.4,
toy,4,"DiffusionRet (Ours), 10 steps","1,000",Inference Time (s),59.70,
toy,4,"DiffusionRet (Ours), 10 steps","1,000",GPU Memory (M),3253,
toy,4,"DiffusionRet (Ours), 10 steps","1,000",R@1,48.6,
"""


def ranks_metrics(r):
    m = {f"R@{k}": 100 * float((r < k).mean()) for k in (1, 5, 10, 50)}
    return {**m, "MdR": float(np.median(r) + 1), "MnR": float(r.mean() + 1), "Rsum": m["R@1"] + m["R@5"] + m["R@10"]}


def fake_run(d, seed=0, n=200, stage2=True, dataset="synthetic", trace=False, r1_value=None):
    "A finished run folder: params.json, metrics.json made from 0-based ranks, eval_arrays.npz."
    d = Path(d); d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(seed)
    r1 = np.minimum(rng.geometric(0.3, n) - 1, 99).astype(np.int32)
    a = dict(text_video=np.arange(n), stage1_t2v_ranks=r1, stage1_v2t_ranks=r1.copy(),
             stage1_pos=rng.normal(0.6, 0.1, n).astype(np.float32), stage1_neg=rng.normal(0.2, 0.1, 4 * n).astype(np.float32))
    m = dict(n_queries=n, n_candidates=n, eval_seconds=3.0, peak_memory_mib=800.0, memory_kind="cpu peak RSS",
             t2v=ranks_metrics(r1), v2t=ranks_metrics(r1), model="stage 1")
    if stage2:
        r2 = r1.copy(); r2[:40] = 0
        a.update(stage2_t2v_ranks=r2, stage2_v2t_ranks=r1.copy(), stage2_pos=a["stage1_pos"] + 0.1, stage2_neg=a["stage1_neg"])
        m = dict(m, t2v=ranks_metrics(r2), model="stage 2", stage1=dict(t2v=m["t2v"], v2t=m["v2t"]))
    if r1_value is not None: m["t2v"]["R@1"] = r1_value
    if trace:
        a.update(trace_queries=np.arange(2), trace_candidates=np.tile(np.arange(6), (2, 1)), trace_positive=np.array([1, -1]),
                 trace_timesteps=np.array([30, 20, 10, 0]), trace_x0=rng.dirichlet(np.ones(6), (2, 4)).astype(np.float32))
    (d / "params.json").write_text(json.dumps(dict(data=dict(dataset=dataset), model=dict(preset="tiny"), train=dict(seed=seed))))
    np.savez(d / "eval_arrays.npz", **a)
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def make_plan(**kw):
    e = dict(template="train_eval", params={}, stage1=None, checkpoint=None, per_seed=True)
    plan = dict(name="toy/table3", paper="toy", title="Toy", tables=["3a", "3e", "4"], seeds=[0, 1, 2], minutes={},
                entries=dict(base=e, mse=dict(e, stage1="base"), steps1=dict(e, per_seed=False)),
                cells=[dict(table="3a", row="KL", column="Text-to-Video", entry="base", block="final", direction="t2v"),
                       dict(table="3a", row="MSE", column="Text-to-Video", entry="mse", block="final", direction="t2v"),
                       dict(table="3e", row="10", column="10", entry="base", block="stage1", direction="t2v"),
                       dict(table="3e", row="10", column="50", na="eval steps above train steps: no such sampler step"),
                       dict(table="4", row="DiffusionRet (Ours), 1 steps", column="1,000", entry="steps1", block="final", direction="t2v")],
                compare=[dict(label="MSE − KL", a="mse", b="base", a_block="final", b_block="final")],
                figures=[dict(kind="similarity_hist", entries={"in-domain": "base", "out-domain": "steps1"}),
                         dict(kind="traces", entry="base"), dict(kind="cost_lines", table="4")])
    return {**plan, **kw}


def make_runs(root, plan, done=("base", "steps1"), **kw):
    runs = []
    for e, spec in plan["entries"].items():
        for s in (plan["seeds"] if spec["per_seed"] else [None]):
            d = Path(root) / plan["name"] / (e if s is None else f"{e}-s{s}")
            runs.append(dict(entry=e, seed=s, dir=d))
            if e in done: fake_run(d, seed=s or 0, trace=s == 0, **kw)
    return runs


@pytest.fixture
def paper(tmp_path):
    p = tmp_path / "toy.csv"; p.write_text(PAPER_CSV)
    return R.load_paper_numbers("toy", p)


@pytest.fixture
def setup(tmp_path, paper):
    plan = make_plan()
    runs = make_runs(tmp_path / "results", plan)
    return plan, runs, paper


def cells_of(setup):
    plan, runs, paper = setup
    return R.cell_values(plan, R.collect(plan, runs), paper, runs)


def test_load_paper_numbers(paper, tmp_path):
    assert paper["value"].dtype == np.float64 and math.isnan(paper["value"].iloc[5])
    assert paper["row"].iloc[8] == "DiffusionRet (Ours), 1 steps" and paper["column"].iloc[8] == "1,000"
    with pytest.raises(R.DiffRetError, match="no published numbers for paper 'nope'"): R.load_paper_numbers("nope")


def test_the_real_paper_numbers_load():
    if not (R.PAPERS / "diffusionret.csv").exists(): pytest.skip("diffusionret_nb/papers/diffusionret.csv not written yet")
    df = R.load_paper_numbers("diffusionret")
    assert {"1", "3a", "3e", "4"} <= set(df.table) and df["value"].notna().sum() > 100


def test_collect_reads_finished_runs_only(setup):
    plan, runs, _ = setup
    (runs[3]["dir"]).mkdir(parents=True); (runs[3]["dir"] / "error.txt").write_text("boom")     # mse-s0 failed
    tidy = R.collect(plan, runs)
    assert set(tidy.entry) == {"base", "steps1"} and set(tidy.block) == {"final", "stage1", "run"}
    assert sorted(tidy[tidy.entry == "base"].seed.unique()) == [0, 1, 2]


def test_mean_and_std_over_three_seeds(tmp_path, paper):
    plan = make_plan()
    runs = make_runs(tmp_path, plan, done=())
    for r, v in zip(runs[:3], (30.0, 33.0, 39.0)): fake_run(r["dir"], seed=r["seed"], r1_value=v)
    cells = R.cell_values(plan, R.collect(plan, runs), paper, runs)
    kl = cells[(cells.row == "KL") & (cells.metric == "R@1")].iloc[0]
    assert (kl.status, kl.n_seeds) == ("done", 3)
    assert kl.ours_mean == pytest.approx(34.0) and kl.ours_std == pytest.approx(np.std([30, 33, 39], ddof=1))
    assert kl["diff"] == pytest.approx(34.0 - 49.0)
    assert R.layout(cells, "3a").loc["KL", ("Text-to-Video", "R@1")] == "34.0 ± 4.6 (49.0, −15.0)"


def test_missing_cells_show_a_dash_and_the_command(setup):
    cells = cells_of(setup)
    t = R.layout(cells, "3a")
    assert t.loc["MSE", ("Text-to-Video", "R@1")] == "— (48.1)"
    mse = cells[cells.row == "MSE"].iloc[0]
    assert (mse.status, mse.command) == ("missing", "diffret plan run toy/table3 --only mse")
    assert any("`diffret plan run toy/table3 --only mse`" in line for line in R.footnotes(cells, "3a"))


def test_na_cells_show_a_cross_with_the_reason(setup):
    cells = cells_of(setup)
    t = R.layout(cells, "3e")
    assert t.loc["10", ("50", "R@1")] == "×"
    assert "- × (10 / 50): eval steps above train steps: no such sampler step" in R.footnotes(cells, "3e")
    assert t.loc["50", ("50", "R@1")] == "(49.0)"      # the paper's number, for a cell this plan does not run


def test_layout_keeps_the_papers_rows_and_columns(setup):
    cells = cells_of(setup)
    t4 = R.layout(cells, "4")
    assert t4.index.tolist() == ["DiffusionRet (Ours), 1 steps", "DiffusionRet (Ours), 10 steps"]
    assert t4.columns.tolist() == [("1,000", "Inference Time (s)"), ("1,000", "GPU Memory (M)"), ("1,000", "R@1")]
    assert t4.iloc[0, 0] == "3.00 (59.02, −56.02)"                  # the paper's precision
    assert t4.iloc[0, 1] == "800 [peak RSS (MiB), CPU] (3253)"       # CPU memory: labelled, no difference


def test_paired_bootstrap_known_answers():
    r = np.random.default_rng(1).integers(0, 30, 1000)
    same = R.paired_bootstrap([r, r, r], [r, r, r])
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    b = np.full(4000, 3); a = b.copy(); a[:1000] = 0                    # a hits 25 % of queries, b none
    res = R.paired_bootstrap([a], [b], n_boot=2000)
    half = 100 * 1.96 * math.sqrt(0.25 * 0.75 / 4000)
    assert res["diff"] == pytest.approx(25.0) and res["lo"] < 25 < res["hi"]
    assert res["hi"] - res["lo"] == pytest.approx(2 * half, abs=0.4) and res["p_gt0"] == 1.0
    a2 = b.copy(); a2[:200] = 0
    assert R.paired_bootstrap([a, a2], [b, b])["diff"] == pytest.approx(15.0)      # mean over seeds of 25 and 5
    assert R.paired_bootstrap([b], [a], k=5)["diff"] == pytest.approx(0.0)       # rank 3 is a hit at k=5
    assert R.paired_bootstrap([a], [b], seed=7) == R.paired_bootstrap([a], [b], seed=7)
    with pytest.raises(R.DiffRetError, match="same queries"): R.paired_bootstrap([a], [b[:5]])


def test_comparisons_verdicts_and_stage_comparisons(setup):
    plan, runs, _ = setup
    c = R.comparisons(plan, runs, n_boot=200)
    assert c[c.label == "MSE − KL"].verdict.iloc[0] == "not run yet: diffret plan run toy/table3 --only mse"
    s = c[(c.label == "stage 2 vs stage 1 (base)") & (c.direction == "t2v") & (c.metric == "R@1")].iloc[0]
    assert s.verdict == "stage 2 better" and s.lo > 0 and (s.n_seeds, s.n_queries) == (3, 200)
    assert (c[(c.label == "stage 2 vs stage 1 (base)") & (c.direction == "v2t")].verdict == "no detectable difference").all()
    assert "stage 2 vs stage 1 (steps1)" in set(c.label)


def test_report_files_carry_the_papers_labels(setup, tmp_path):
    plan, runs, paper = setup
    rep = R.write_report(dict(plan, figures=[]), runs, tmp_path / "report", "synthetic", numbers=paper, n_boot=100)
    csv = pd.read_csv(rep["csv"], dtype=str, keep_default_na=False)
    assert csv.columns.tolist()[:13] == ["paper", "table", "row", "column", "metric", "paper_value", "ours_mean", "ours_std",
                                         "n_seeds", "diff", "entry", "block", "status"]
    assert {"KL", "MSE", "DiffusionRet (Ours), 1 steps"} <= set(csv.row) and {"Text-to-Video", "1,000"} <= set(csv.column)
    tex = rep["tex"].read_text()
    for label in ("DiffusionRet (Ours), 1 steps", r"\multicolumn{2}{c}{Text-to-Video}", r"\multicolumn{3}{c}{1,000}",
                  "Inference Time (s)", "GPU Memory (M)", r"\toprule", r"\midrule", r"\bottomrule", r"KL & "):
        assert label in tex, label
    assert "±" not in tex and r"$\pm$" in tex
    md = rep["md"].read_text()
    assert "| KL |" in md and "Text-to-Video R@1" in md and "## Comparisons" in md


def test_synthetic_banner_only_for_synthetic_runs(tmp_path, paper):
    plan = make_plan(figures=[])
    syn = R.write_report(plan, make_runs(tmp_path / "a", plan), tmp_path / "ra", numbers=paper, n_boot=50)["md"].read_text()
    real = R.write_report(plan, make_runs(tmp_path / "b", plan, dataset="msrvtt"), tmp_path / "rb", numbers=paper, n_boot=50)["md"].read_text()
    assert syn.startswith("> **Synthetic analogue on the embedded synthetic world, not the paper's experiment: "
                          "compare directions and intervals, not absolute numbers.")
    assert "Synthetic analogue" not in real


def test_figures_are_written(setup, tmp_path):
    plan, runs, paper = setup
    rep = R.write_report(plan, runs, tmp_path / "report", numbers=paper, n_boot=50)
    names = sorted(p.name for p in rep["figures"])
    assert names == ["cost_lines.pdf", "cost_lines.png", "similarity_hist.pdf", "similarity_hist.png", "traces.pdf", "traces.png"]
    assert all(p.stat().st_size > 1000 for p in rep["figures"])
    assert "![](figures/traces.png)" in rep["md"].read_text()


def test_unknown_figure_kind_names_the_plan(setup, tmp_path):
    plan, runs, paper = setup
    with pytest.raises(R.DiffRetError, match="plan toy/table3: unknown figure kind 'pie'"):
        R.write_report(dict(plan, figures=[dict(kind="pie")]), runs, tmp_path / "r", numbers=paper)
    assert not (tmp_path / "r").exists()


def test_results_loads_without_torch():
    code = "import sys, diffusionret_nb.results; assert not {'torch', 'matplotlib', 'seaborn'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


FAKE_PLANS = '''import json, sys, types
from pathlib import Path
m = types.ModuleType("diffusionret_nb.plans")
m.load_plan = lambda name: json.loads(Path({plan_json!r}).read_text())
def plan_runs(plan, out):
    return [dict(r, dir=Path(out) / plan["name"] / Path(r["dir"]).name) for r in json.loads(Path({runs_json!r}).read_text())]
m.plan_runs = plan_runs
m.for_profile = lambda plan, profile: plan
sys.modules["diffusionret_nb.plans"] = m
import diffusionret_nb.results as R
R.PAPERS = Path({papers!r})
'''


def test_report_notebook_runs(setup, tmp_path):
    "experiments/report.ipynb end to end with papermill, the plan layer replaced by a stand-in that returns the fake plan."
    import nbformat
    import papermill as pm
    plan, runs, _ = setup
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "runs.json").write_text(json.dumps([dict(r, dir=str(r["dir"])) for r in runs]))
    (tmp_path / "papers").mkdir(); (tmp_path / "papers" / "toy.csv").write_text(PAPER_CSV)
    nb = nbformat.read(ROOT / "experiments" / "report.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FAKE_PLANS.format(plan_json=str(tmp_path / "plan.json"),
                                                                   runs_json=str(tmp_path / "runs.json"), papers=str(tmp_path / "papers"))))
    nbformat.write(nb, tmp_path / "report.ipynb")
    pm.execute_notebook(str(tmp_path / "report.ipynb"), str(tmp_path / "executed.ipynb"), kernel_name="python3", progress_bar=False,
                        parameters=dict(plan="toy/table3", out=str(tmp_path / "results"), profile="synthetic"), cwd=str(tmp_path))
    rep = tmp_path / "results" / "toy/table3" / "report"
    md = (rep / "table.md").read_text()
    assert "Synthetic analogue" in md and "profile `synthetic`" in md and "— (48.1)" in md
    assert (rep / "table.tex").exists() and (rep / "figures" / "traces.png").stat().st_size > 0


DITS_CSV = """paper,table,row,column,metric,value,note
toy,5a,0,MSRVTT,R@1,46.9,
toy,5a,10,MSRVTT,R@1,51.9,
toy,9,DITS,MSRVTT,mean L1 modality gap,18.13,
toy,9,DITS,MSRVTT,mean similarity,0.168,
toy,9,DITS,MSRVTT,R@1,51.9,
toy,11,DITS,MSRVTT,GPU memory (MB),5464,
toy,11,DITS,MSRVTT,time (s),70.17,
"""


def test_dits_gap_metrics_and_figures(tmp_path):
    "DITS's Table 9 cells read metrics.json's `alignment`, Table 11's the run's time and memory; gap_hist and sweep are drawn."
    p = tmp_path / "dits.csv"; p.write_text(DITS_CSV)
    paper = R.load_paper_numbers("toy", p)
    e = dict(template="train_eval", params={}, stage1=None, checkpoint=None, per_seed=True)
    plan = dict(name="toy/dits", paper="toy", title="Toy DITS", tables=["5a", "9", "11"], seeds=[0, 1], minutes={},
                entries=dict(xpool=e, dits=e),
                cells=[dict(table="5a", row="0", column="MSRVTT", entry="xpool"), dict(table="5a", row="10", column="MSRVTT", entry="dits"),
                       dict(table="9", row="DITS", column="MSRVTT", entry="dits"), dict(table="11", row="DITS", column="MSRVTT", entry="dits")],
                compare=[], figures=[dict(kind="gap_hist", entries={"DITS": "dits"}, unaligned=True),
                                     dict(kind="sweep", table="5a", metric="R@1", xlabel="T'")])
    runs = make_runs(tmp_path / "results", plan, done=("xpool", "dits"), stage2=False)
    rng = np.random.default_rng(0)
    for r in runs:
        if r["entry"] != "dits": continue
        m = json.loads((r["dir"] / "metrics.json").read_text())
        m["alignment"] = dict(mean_gap_l1=10.0 + r["seed"], mean_cos=0.5, mean_gap_l2=0.9)
        (r["dir"] / "metrics.json").write_text(json.dumps(m))
        a = dict(np.load(r["dir"] / "eval_arrays.npz"))
        a.update(align_gap_l2=rng.normal(0.5, 0.05, 200).astype(np.float32), align_gap_l2_unaligned=rng.normal(0.7, 0.05, 200).astype(np.float32))
        np.savez(r["dir"] / "eval_arrays.npz", **a)
    c = R.cell_values(plan, R.collect(plan, runs), paper, runs).set_index(["table", "metric"])
    assert c.loc[("9", "mean L1 modality gap"), "ours_mean"] == 10.5 and c.loc[("9", "mean similarity"), "ours_mean"] == 0.5
    assert c.loc[("11", "time (s)"), "ours_mean"] == 3.0 and c.loc[("11", "GPU memory (MB)"), "ours_mean"] == 800.0
    rep = R.write_report(plan, runs, tmp_path / "report", numbers=paper, n_boot=20)
    assert sorted(p.name for p in rep["figures"] if p.suffix == ".png") == ["gap_hist.png", "sweep.png"]
