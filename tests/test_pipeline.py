"""The demo's entry point end to end with tiny parameters: the run folder, the metrics file, learning
(a clear improvement over the untrained model), exact resume after an interruption, and the clear
non-zero exit of bad parameters."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusionret_nb import pipeline, training
from diffusionret_nb.cli import demo, main
from diffusionret_nb.config import load_paramset
DEMO_PARAMS = load_paramset("demo")
from diffusionret_nb.config import build_config
from diffusionret_nb.learner import Callback

# small enough for seconds on 2 CPU cores, large enough to learn something measurable
TINY = dict(syn_n_train=48, syn_n_val=12, syn_n_test=24, epochs=4, batch_size=16, lr=1e-3, n_frames=4,
            stage2_epochs=2, rerank_topk=8, diff_steps=10, diff_eval_steps=10)
NO_STAGE2 = dict(stage2=False)
KEYS = {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR", "Rsum"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo(out=out, progress=False, **TINY)


def test_demo_writes_the_run_folder(demo_run):
    for f in ("params.json", "metrics.json", "table.md", "executed.ipynb", "history.json", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (demo_run / f).exists(), f
    m = json.loads((demo_run / "metrics.json").read_text())
    assert set(m["t2v"]) == KEYS and set(m["v2t"]) == KEYS
    assert m["n_queries"] == m["n_candidates"] == TINY["syn_n_test"]
    assert m["model"] == "stage 2" and set(m["stage1"]["t2v"]) == KEYS      # the demo trains stage 2 after stage 1
    assert "stage 1 T2V" in (demo_run / "table.md").read_text() and "stage 2 T2V" in (demo_run / "table.md").read_text()
    assert 0 <= m["stage1"]["twin_t2v"] <= 100 and m["n_twin_pairs"] == TINY["syn_n_test"] // 2
    assert m["chance_R@1"] == pytest.approx(100 / TINY["syn_n_test"])
    assert m["n_skipped_videos"] == 0
    params = json.loads((demo_run / "params.json").read_text())
    assert params["train"]["epochs"] == TINY["epochs"] and params["model"]["preset"] == "tiny"
    nb = json.loads((demo_run / "executed.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])


def test_demo_learns(demo_run):
    "Stage 1 beats the untrained model clearly, in both directions, by mean rank and by Rsum."
    m = json.loads((demo_run / "metrics.json").read_text())
    s1 = m["stage1"]
    for d in ("t2v", "v2t"):
        assert s1[d]["MnR"] < 0.8 * m["untrained"][d]["MnR"], (d, s1[d], m["untrained"][d])
        assert s1[d]["Rsum"] > m["untrained"][d]["Rsum"] + 10, (d, s1[d], m["untrained"][d])


def test_finished_run_is_recognised(demo_run, capsys):
    again = demo(out=demo_run.parent, progress=False, **TINY)
    assert again == demo_run and "already complete" in capsys.readouterr().out


class _Interrupt(Callback):
    order = 100
    def after_epoch(self):
        if self.learn.epoch == 1: raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    params = {**DEMO_PARAMS, **TINY, **NO_STAGE2, "epochs": 2, "eval_untrained": False}
    cfg = build_config(**params)
    straight = pipeline.train_eval(cfg, tmp_path / "straight", progress=False)

    make = training.make_learner
    def make_interrupted(*a, **k):
        learn = make(*a, **k)
        cb = _Interrupt(); cb.learn = learn; learn.cbs.append(cb)
        return learn
    monkeypatch.setattr(training, "make_learner", make_interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_eval(cfg, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(training, "make_learner", make)
    resumed = pipeline.train_eval(cfg, tmp_path / "resumed", progress=False)

    assert resumed["t2v"] == straight["t2v"] and resumed["v2t"] == straight["v2t"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "best.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_parameters(tmp_path, monkeypatch):
    cfg = build_config(**{**DEMO_PARAMS, **TINY, **NO_STAGE2, "epochs": 1, "eval_untrained": False})
    pipeline.train_eval(cfg, tmp_path, progress=False)
    (tmp_path / "metrics.json").unlink()
    other = build_config(**{**DEMO_PARAMS, **TINY, **NO_STAGE2, "epochs": 1, "eval_untrained": False, "lr": 1e-2})
    with pytest.raises(Exception, match=r"other values of \['lr'\]"):
        pipeline.train_eval(other, tmp_path, progress=False)


@pytest.mark.parametrize("args,needle", [
    (["train", "-p", "epochz=1"], "unknown parameter 'epochz'"),
    (["train", "-p", "epochs=two"], "parameter 'epochs' expects int"),
    (["train", "-p", "temporal=lstm"], "must be one of ['transformer', 'mean']"),
    (["train", "-p", "data_root=/no/such/folder"], "data folder not found: /no/such/folder"),
    (["train", "-p", "checkpoint=/no/such/ckpt.pt"], "checkpoint not found: /no/such/ckpt.pt"),
    (["train", "-p", "pretrained=/no/such/ViT-B-32.pt"], "CLIP weights not found: /no/such/ViT-B-32.pt"),
    (["eval", "--checkpoint", "/no/such/best.pt"], "checkpoint not found: /no/such/best.pt"),
    (["demo", "--params", "/no/such/params.json"], "params file not found"),
])
def test_bad_parameters_exit_nonzero_without_traceback(args, needle):
    diffret = Path(sys.executable).parent / "diffret"     # the installed console script
    r = subprocess.run([str(diffret), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_failed_run_leaves_notebook_and_error_not_metrics(tmp_path, capsys):
    "Valid parameters that fail inside the notebook (a batch larger than the 16 training pairs)."
    rc = main(["demo", "--out", str(tmp_path), "--name", "broken", "--quiet",
               "-p", "syn_n_train=4", "-p", "syn_n_val=4", "-p", "syn_n_test=4", "-p", "batch_size=32", "-p", "rerank_topk=2"])
    run = tmp_path / "broken"
    assert rc == 1
    assert (run / "executed.ipynb").exists() and (run / "error.txt").exists() and not (run / "metrics.json").exists()
    err = capsys.readouterr().err
    assert "batch_size=32 is larger than the 16 training pairs" in err and "executed.ipynb" in err
