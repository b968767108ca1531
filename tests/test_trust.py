"""The failures found when the tool was attacked (the trust issue), each as a test: runs, checkpoints,
evaluation from the CLI, locks, permissions, resume of both stages, and parameter files."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusionret_nb import pipeline, training
from diffusionret_nb.benchmarks import load_records
from diffusionret_nb.cli import main
from diffusionret_nb.config import build_config, load_paramset, save_params
from diffusionret_nb.core import CheckpointError, ConfigError, DataError, DiffRetError, run_lock
from diffusionret_nb.learner import Callback
from diffusionret_nb.runner import run_experiment
from diffusionret_nb.synthetic import render_world

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(load_paramset("demo"), syn_n_train=48, syn_n_val=12, syn_n_test=24, epochs=2, batch_size=16, lr=1e-3, n_frames=4,
            stage2_epochs=2, rerank_topk=8, diff_steps=10, diff_eval_steps=10, eval_untrained=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "One finished tiny run (both stages) to evaluate and attack."
    d = tmp_path_factory.mktemp("trust") / "run"
    m = pipeline.train_eval(build_config(**TINY), d, progress=False)
    return d, m


def cli(*args):
    return main([str(a) for a in args])


# --- parameter files -------------------------------------------------------------------------------------------

def test_params_file_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "p.json").write_text("[1, 2, 3]")
    assert cli("train", "--params", tmp_path / "p.json", "--out", tmp_path) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_a_runs_params_json_feeds_back(run, tmp_path, capsys):
    d, _ = run
    from diffusionret_nb.cli import parse_overrides
    back = build_config(**parse_overrides([], str(d / "params.json")))
    assert back.flat() == pipeline.resolve_config(build_config(**TINY)).flat()


def test_template_refuses_a_misspelled_papermill_parameter(tmp_path):
    import papermill as pm
    from diffusionret_nb.runner import template_path
    with pytest.raises(pm.PapermillExecutionError, match="unknown parameter 'epochz'"):
        pm.execute_notebook(str(template_path()), str(tmp_path / "x.ipynb"), parameters=dict(epochz=3, out_dir=str(tmp_path / "r")),
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path))


# --- checkpoints -----------------------------------------------------------------------------------------------

def test_random_tensor_as_checkpoint(tmp_path, capsys):
    torch.save(torch.randn(4), tmp_path / "t.pt")
    assert cli("eval", "--checkpoint", tmp_path / "t.pt", "--out", tmp_path) == 2
    assert "holds a Tensor" in capsys.readouterr().err


def test_checkpoints_load_without_running_code(run):
    d, _ = run
    for f in ("best.pt", "last.pt", "stage2/best.pt", "stage2/last.pt"):
        torch.load(d / "checkpoints" / f, weights_only=True)                # plain data only


def test_files_honour_the_umask(run):
    d, _ = run
    um = os.umask(0); os.umask(um)
    for f in ("params.json", "metrics.json", "checkpoints/best.pt"):
        assert stat.S_IMODE((d / f).stat().st_mode) == 0o666 & ~um, f


def test_corrupt_last_pt_says_what_to_do(tmp_path):
    cfg = build_config(**{**TINY, "stage2": False, "epochs": 1})
    (tmp_path / "checkpoints").mkdir(parents=True)
    save_params(pipeline.resolve_config(cfg), tmp_path / "params.json")
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it to start the run over.*--force"):
        pipeline.train_eval(cfg, tmp_path, progress=False)


# --- evaluation from the CLI -----------------------------------------------------------------------------------

def test_eval_of_a_run_folder_and_a_stage2_checkpoint_rerank(run, tmp_path):
    d, m = run
    for src in (d, d / "checkpoints" / "stage2" / "best.pt"):
        e = pipeline.evaluate_checkpoint(src, tmp_path / src.name, progress=False)
        assert e["model"] == "stage 2" and e["t2v"] == m["t2v"] and e["stage1"]["t2v"] == m["stage1"]["t2v"]
    s1 = pipeline.evaluate_checkpoint(d / "checkpoints" / "best.pt", tmp_path / "s1", progress=False)
    assert s1["model"] == "stage 1" and s1["t2v"] == m["stage1"]["t2v"]


def test_the_feature_cache_serves_a_checkpoints_features_exactly(run, tmp_path):
    d, m = run
    kinds = sorted(p.name.split("-")[0] for p in (d / "checkpoints" / "features").glob("*.pt"))
    assert kinds == ["texts", "texts", "videos", "videos", "videos"], kinds   # test and val galleries, stage 2's training bank
    assert m["feature_cache"]["misses"] == 5 and m["feature_cache"]["hits"] == 0
    off = pipeline.evaluate_checkpoint(d, tmp_path / "off", dict(feature_cache=False), progress=False)
    on = pipeline.evaluate_checkpoint(d, tmp_path / "on", progress=False)
    assert "feature_cache" not in off and on["feature_cache"]["hits"] == 2 and on["feature_cache"]["misses"] == 0
    for k in ("t2v", "v2t"): assert on[k] == off[k] == m[k] and on["stage1"][k] == off["stage1"][k]


def test_a_cache_hit_trains_the_same_generator_as_encoding(run, tmp_path):
    "Stage 2 on a cached stage 1 draws the random numbers an uncached one draws (a hit replays the loaders' seed draws)."
    d, _ = run
    over = dict(TINY, stage1_checkpoint=str(d / "checkpoints" / "best.pt"))
    hit = pipeline.train_eval(build_config(**over), tmp_path / "hit", progress=False)
    off = pipeline.train_eval(build_config(**over, feature_cache=False), tmp_path / "off", progress=False)
    assert hit["feature_cache"]["misses"] == 0 and hit["feature_cache"]["hits"] >= 3 and "feature_cache" not in off
    a, b = (torch.load(r / "checkpoints" / "stage2" / "last.pt", map_location="cpu", weights_only=True)["model"]
            for r in (tmp_path / "hit", tmp_path / "off"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)                         # bit for bit
    for k in ("t2v", "v2t"): assert hit[k] == off[k]


def test_a_changed_video_is_encoded_again(run, holed_world, tmp_path):
    d, _ = run
    over = dict(data_root=str(holed_world), max_missing_videos=0.05)
    first = pipeline.evaluate_checkpoint(d, tmp_path / "a", over, progress=False)["feature_cache"]
    video = Path(load_records(build_config(**{**TINY, **over}), "test")[1].path)
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))       # the file is replaced
    again = pipeline.evaluate_checkpoint(d, tmp_path / "b", over, progress=False)["feature_cache"]
    assert (first["misses"], again["misses"], again["hits"]) == (2, 1, 1)                   # videos again, texts kept


@pytest.mark.parametrize("override,needle", [("temporal=mean", "temporal='mean': cannot apply"),
                                             ("stage2=false", "stage2=False: cannot apply"),
                                             ("preset=vitb32", "preset='vitb32': cannot apply"),
                                             ("arch=xpool", "arch='xpool': cannot apply"),
                                             ("epochs=9", "epochs=9: cannot apply")])
def test_eval_refuses_overrides_that_cannot_apply(run, tmp_path, capsys, override, needle):
    d, _ = run
    assert cli("eval", "--checkpoint", d, "--out", tmp_path, "-p", override) == 2
    assert needle in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_eval_folders_differ_by_override_and_failures_leave_none(run, tmp_path, capsys):
    d, _ = run
    assert cli("eval", "--checkpoint", d, "--out", tmp_path, "--quiet") == 0
    assert cli("eval", "--checkpoint", d, "--out", tmp_path, "--quiet", "-p", "test_split=val") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run", "run-test_split=val"], names
    assert json.loads((tmp_path / "run-test_split=val" / "metrics.json").read_text())["split"] == "val"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["split"] == "test"
    assert cli("eval", "--checkpoint", d, "--out", tmp_path, "--quiet", "-p", "test_split=nosuch") == 2
    assert not (tmp_path / "run-test_split=nosuch").exists()


# --- missing videos --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def holed_world(tmp_path_factory):
    "A copy of the tiny world with one training and one test video deleted."
    src = render_world(seed=0, domain="plain", n_train=48, n_val=12, n_test=24, size=64)
    dst = tmp_path_factory.mktemp("holed") / "world"
    shutil.copytree(src, dst)
    cfg = build_config(**{**TINY, "data_root": str(dst)})
    for split in ("train", "test"): Path(load_records(cfg, split)[0].path).unlink()
    return dst


def test_missing_test_videos_fail_unless_allowed(run, holed_world, tmp_path):
    d, _ = run
    with pytest.raises(DataError, match=r"1 of the 24 videos of split 'test'.*max_missing_videos"):
        pipeline.evaluate_checkpoint(d, tmp_path / "a", dict(data_root=str(holed_world)), progress=False)
    e = pipeline.evaluate_checkpoint(d, tmp_path / "b", dict(data_root=str(holed_world), max_missing_videos=0.05), progress=False)
    assert e["n_skipped_videos"] == 1 and "skipped videos: 1" in (tmp_path / "b" / "table.md").read_text()


def test_skipped_training_videos_are_counted_as_videos(holed_world, tmp_path):
    cfg = build_config(**{**TINY, "data_root": str(holed_world), "stage2": False, "epochs": 1, "max_missing_videos": 0.05})
    m = pipeline.train_eval(cfg, tmp_path, progress=False)
    assert m["train"]["n_skipped_videos"] == 1          # one video, however many captions it has


# --- run folders -----------------------------------------------------------------------------------------------

def test_name_of_a_finished_run_with_other_parameters_is_refused(run, capsys):
    d, _ = run
    assert cli("train", "--set", "demo", "-p", "lr=0.5", "--out", d.parent, "--name", d.name, "--quiet") == 2
    err = capsys.readouterr().err
    assert "holds a finished run made with other values of" in err and "'lr'" in err


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path):
    d = tmp_path / "r"
    with run_lock(d):
        with pytest.raises(DiffRetError, match=rf"in use by another run \(process {os.getpid()}"):
            run_experiment({**TINY, "stage2": False}, out=tmp_path, name="r", progress=False)


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli("demo", "--out", tmp_path / "file" / "out", "--quiet") == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_rerank_topk_beyond_the_validation_gallery_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="rerank_topk=13 exceeds the validation gallery"):
        pipeline.train_eval(build_config(**{**TINY, "rerank_topk": 13}), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_max_steps_shorter_than_an_epoch_leaves_a_checkpoint(tmp_path):
    m = pipeline.train_eval(build_config(**{**TINY, "stage2": False, "max_steps": 2}), tmp_path, progress=False)
    assert m["train"]["steps"] == 2 and torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_force_moves_an_unfinished_run_aside(tmp_path, capsys):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.pt").write_bytes(b"damaged")
    assert cli("train", "--set", "demo", "--out", tmp_path, "--name", "r", "--force", "--quiet",
               *sum((["-p", f"{k}={v}"] for k, v in dict(TINY, stage2=False, epochs=1).items() if k in
                     ("syn_n_train", "syn_n_val", "syn_n_test", "epochs", "batch_size", "n_frames", "stage2")), [])) == 0
    assert "moved the previous unfinished run" in capsys.readouterr().out
    assert (tmp_path / "r" / "metrics.json").exists() and len(list(tmp_path.glob("r.old-*"))) == 1


# --- resume of both stages -------------------------------------------------------------------------------------

class _Kill(Callback):
    "Simulates a kill after `at` steps of stage 2 (a checkpoint is written every 2 steps)."
    order = 100
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.learn.step == self.at: raise KeyboardInterrupt


def test_stage2_resume_mid_epoch_is_exact(tmp_path, monkeypatch, capsys):
    cfg = build_config(**{**TINY, "ckpt_every_steps": 2, "ema": 0.9})
    straight = pipeline.train_eval(cfg, tmp_path / "straight", progress=False)
    make = training.make_learner
    def killed(*a, **k):
        learn = make(*a, **k)
        if k.get("stage") == 2: cb = _Kill(5); cb.learn = learn; learn.cbs.append(cb)
        return learn
    monkeypatch.setattr(training, "make_learner", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_eval(cfg, tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "stage2" / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(training, "make_learner", make)
    resumed = pipeline.train_eval(cfg, tmp_path / "resumed", progress=False)
    assert "resuming from" in capsys.readouterr().out
    assert resumed["t2v"] == straight["t2v"] and resumed["v2t"] == straight["v2t"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "stage2" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "stage2" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


# --- start-up ----------------------------------------------------------------------------------------------------

def test_the_cli_and_config_load_without_torch():
    code = "import sys, diffusionret_nb.cli, diffusionret_nb.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_of_a_reference_model_file(run, tmp_path):
    "A file in the reference code's layout (here at tiny shapes, made from the run's weights) is converted and re-ranked."
    from diffusionret_nb.official import project_to_official
    from diffusionret_nb.registry import load_model
    d, m = run
    s1, _ = load_model(d / "checkpoints" / "best.pt", stage=1)
    gen, _ = load_model(d / "checkpoints" / "stage2" / "best.pt", stage=2)
    torch.save({f"module.{k}": v for k, v in project_to_official(s1, gen).items()}, tmp_path / "pytorch_model.bin.4")
    over = {k: TINY[k] for k in ("syn_n_train", "syn_n_val", "syn_n_test", "n_frames", "rerank_topk", "diff_eval_steps")}
    e = pipeline.evaluate_checkpoint(tmp_path / "pytorch_model.bin.4", tmp_path / "eval", dict(over, preset="tiny"), progress=False)
    assert e["model"] == "stage 2" and e["stage1"]["t2v"] == m["stage1"]["t2v"] and e["n_queries"] == 24
    with pytest.raises(ConfigError, match="temporal='mean': cannot apply to a reference DiffusionRet model"):
        pipeline.evaluate_checkpoint(tmp_path / "pytorch_model.bin.4", tmp_path / "e2", dict(over, preset="tiny", temporal="mean"))
