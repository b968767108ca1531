"""Stage 2: mining, targets and losses, the generator learning a toy problem, `train_stage2` end to end on
the synthetic world (checkpoints, exact resume, refusal of other parameters) and a short run with each
ablation switch of Table 3."""
import math

import numpy as np
import pytest
import torch

from diffusionret_nb import pipeline, training
from diffusionret_nb.core import ConfigError, DataError
from diffusionret_nb.config import build_config
from diffusionret_nb.benchmarks import get_adapter, load_records, resolve_config
from diffusionret_nb.datasets import FrameSource
from diffusionret_nb.inference import encode_gallery
from diffusionret_nb.learner import Callback
from diffusionret_nb.registry import create_model, load_model
from diffusionret_nb.rerank import rerank_metrics
from diffusionret_nb.generator import Stage2Generator, derive_num_neg, generation_loss, make_target, mine_candidates
from diffusionret_nb.training import stage_plan


pytestmark = pytest.mark.usefixtures("one_thread")

# the synthetic world of tests/test_pipeline.py (rendered once per session into the shared cache)
WORLD = dict(preset="tiny", syn_n_train=48, syn_n_val=12, syn_n_test=24, n_frames=8, device="cpu")
BASE = dict(WORLD, batch_size=16, stage2=True, stage2_epochs=2, rerank_topk=8, diff_steps=20, diff_eval_steps=20, ema=0.9)


def test_num_neg_follows_the_global_batch():
    assert derive_num_neg(127, 128) == 127 and derive_num_neg(127, 16) == 15
    with pytest.raises(ConfigError, match="global batch of 1"):
        derive_num_neg(127, 1)
    with pytest.raises(ConfigError, match="stage2_batch_size"):
        training.check_stage2_config(build_config(stage2=True, stage2_batch_size=1))


def test_mining_excludes_same_video_and_orders_hardest_first():
    g = torch.Generator().manual_seed(0)
    G = 12
    sim = torch.rand(G, G, generator=g)
    vid = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7, 8, 3, 10, 11])
    idx = mine_candidates(sim, vid, vid, torch.arange(G), 20)
    assert idx.shape == (G, 11)                            # rows 0, 3, 4, 9 have only 10 other-video entries
    assert (idx[:, 0] == torch.arange(G)).all()
    for i in range(G):
        neg = idx[i, 1:]
        assert (vid[neg] != vid[i]).all()
        assert (sim[i, neg][:-1] >= sim[i, neg][1:]).all()         # hardest first
        others = [j for j in range(G) if vid[j] != vid[i] and j not in neg.tolist()]
        assert all(sim[i, j] <= sim[i, neg].min() for j in others)  # nothing harder was left out
    with pytest.raises(DataError, match="no negative"):
        mine_candidates(sim, torch.zeros(G), torch.zeros(G), torch.arange(G), 3)


def test_targets_and_losses():
    x0 = make_target(3, 5)
    assert x0[:, 0].eq(1).all() and x0[:, 1:].eq(0).all()
    assert make_target(1, 4, "onehot_neg1").tolist() == [[1, -1, -1, -1]]
    x = torch.randn(3, 5)
    kl = generation_loss(x, x0, "kl", 100.0)
    logp = torch.log_softmax(100 * x, -1)
    torch.testing.assert_close(kl, -logp[:, 0].mean())                       # KL(one-hot ‖ softmax(100 x̂0))
    torch.testing.assert_close(generation_loss(x, x0, "mse"), ((x - x0) ** 2).mean())


def test_generator_learns_a_toy_problem():
    "Positives whose frames resemble the query text: after a few hundred steps the sampler ranks them first."
    torch.manual_seed(0)
    D, G, T = 32, 16, 3
    gen = Stage2Generator(D, num_steps=10, num_neg=7)
    opt = torch.optim.Adam(gen.parameters(), lr=2e-3)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        eot = torch.randn(G, D, generator=g)
        frames = 0.5 * torch.randn(G, T, D, generator=g) + eot[:, None, :]
        return dict(eot=eot, frames=frames, frame_mask=torch.ones(G, T), video_id=torch.arange(G),
                    sim=torch.randn(G, G, generator=g))        # uninformative mining: the generator must find the positive
    first = [gen(batch(s))["loss"].item() for s in range(5)]
    for step in range(150):
        loss = gen(batch(100 + step))["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    last = np.mean([gen(batch(1000 + s))["loss"].item() for s in range(5)])
    assert last < 0.3 * np.mean(first), (first, last)


@pytest.fixture(scope="module")
def world():
    cfg = resolve_config(build_config(**BASE))
    torch.manual_seed(0)
    s1 = create_model(cfg)
    test = encode_gallery(s1, load_records(cfg, "test"), FrameSource.from_config(cfg), cfg.data.n_words,
                          get_adapter(cfg.data.dataset).protocol)
    return cfg, s1, test


class _Interrupt(Callback):
    order = 100
    def after_epoch(self):
        if self.learn.epoch == 1: raise KeyboardInterrupt


def test_train_stage2_end_to_end_and_exact_resume(world, tmp_path, monkeypatch):
    cfg, s1, test = world
    learn, gen = pipeline.run_stage2(cfg, s1, tmp_path / "straight", "cpu", progress=False)
    folder = tmp_path / "straight" / "checkpoints" / "stage2"
    assert (folder / "last.pt").exists() and (folder / "best.pt").exists()
    assert learn.epoch == 2 and len(learn.evals) == 4                       # live + EMA after each epoch
    assert not any(p.requires_grad for p in s1.parameters())
    loaded = load_model(folder / "best.pt", stage=2)[0]
    assert all(torch.equal(loaded.state_dict()[k], gen.state_dict()[k]) for k in gen.state_dict())
    m = rerank_metrics(test, gen, cfg.diffusion)
    assert m["n_queries"] == 24 and set(m["t2v"]) >= {"R@1", "MnR"}

    make = training.make_learner
    def interrupted(*a, **k):
        learn = make(*a, **k); cb = _Interrupt(); cb.learn = learn; learn.cbs.append(cb)
        return learn
    monkeypatch.setattr(training, "make_learner", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage2(cfg, s1, tmp_path / "resumed", "cpu", progress=False)
    monkeypatch.setattr(training, "make_learner", make)
    _, gen2 = pipeline.run_stage2(cfg, s1, tmp_path / "resumed", "cpu", progress=False)
    assert all(torch.equal(gen2.state_dict()[k], gen.state_dict()[k]) for k in gen.state_dict())

    big = resolve_config(build_config(**{**BASE, "rerank_topk": 13}))             # the validation gallery has 12 videos
    with pytest.raises(ConfigError, match="rerank_topk=13 exceeds the validation gallery"):
        pipeline.run_stage2(big, s1, tmp_path / "big", "cpu", progress=False)
    assert not (tmp_path / "big" / "checkpoints" / "stage2" / "last.pt").exists()

    other = resolve_config(build_config(**{**BASE, "stage2_lr": 1e-3}))
    with pytest.raises(ConfigError, match=r"other values of \['stage2_lr'\]"):
        pipeline.run_stage2(other, s1, tmp_path / "straight", "cpu", progress=False)


ABLATIONS = [dict(gen_loss="mse"), dict(diff_sampler="ddpm"), dict(diff_schedule="linear"), dict(diff_steps=10, diff_eval_steps=10),
             dict(diff_steps=100, diff_eval_steps=50), dict(diff_beta_scale=0.1), dict(diff_beta_scale=2.0),
             dict(gen_target="onehot_neg1"), dict(denoiser_renorm=True), dict(denoiser_tau=0.5), dict(diff_eta=0.5),
             dict(diff_eval_steps=1), dict(num_neg=3), dict(rerank_n_seeds=2), dict(rerank_alpha=0.5, rerank_temp=0.1)]


@pytest.fixture(scope="module")
def cached_bank(world):
    "Encode the training videos once for all ablation runs (encode_bank itself runs in the end-to-end test)."
    cfg, s1, _ = world
    return pipeline.encode_bank(s1, load_records(cfg, "train"), FrameSource.from_config(cfg), cfg.data.n_words)


@pytest.mark.parametrize("switch", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_ablation_switch_runs_and_is_recorded(world, cached_bank, switch, tmp_path, monkeypatch):
    _, s1, test = world
    cfg = resolve_config(build_config(**{**BASE, "val_split": "", "stage2_epochs": 1, "ema": 0.0, **switch}))
    monkeypatch.setattr(pipeline, "encode_bank", lambda *a, **k: cached_bank)
    learn, gen = pipeline.run_stage2(cfg, s1, tmp_path, "cpu", progress=False)
    assert learn.epoch == 1 and all(math.isfinite(h["loss"]) for h in learn.history)
    params = torch.load(tmp_path / "checkpoints" / "stage2" / "last.pt", weights_only=False)["params"]
    assert all(params["diffusion"][k] == v for k, v in switch.items())
    m = rerank_metrics(test, gen, cfg.diffusion)
    assert len(m["seeds"]) == cfg.diffusion.rerank_n_seeds and 0 <= m["t2v"]["R@1"] <= 100


def test_stage_plan_and_early_checks():
    assert stage_plan(build_config(stage2=True)) == (True, True)
    assert stage_plan(build_config(stage2=True, train_strategy="discrimination")) == (True, False)
    assert stage_plan(build_config(stage2=True, train_strategy="generation")) == (False, True)
    with pytest.raises(ConfigError, match="diff_eval_steps=50 exceeds diff_steps=10"):
        training.check_stage2_config(build_config(stage2=True, diff_steps=10))


@pytest.mark.parametrize("arch", ["clip4clip_meanp", "clip4clip_seqtransf", "xpool"])
def test_any_arch_can_be_the_stage_1_of_a_generator(world, arch, tmp_path):
    "The generator only reads the contract's features (EOT, frames) and similarity, so a baseline can be its stage 1."
    cfg = resolve_config(build_config(**{**BASE, "arch": arch, "val_split": "", "stage2_epochs": 1, "ema": 0.0}))
    torch.manual_seed(0)
    s1 = create_model(cfg)
    learn, gen = pipeline.run_stage2(cfg, s1, tmp_path, "cpu", progress=False)
    assert learn.epoch == 1 and all(math.isfinite(h["loss"]) for h in learn.history)
    ck = torch.load(tmp_path / "checkpoints" / "stage2" / "last.pt", weights_only=False)
    assert ck["stage"] == "stage2" and ck["arch"] == arch
    test = encode_gallery(s1, load_records(cfg, "test"), FrameSource.from_config(cfg), cfg.data.n_words, "single")
    m = rerank_metrics(test, gen, cfg.diffusion)
    assert m["n_queries"] == 24 and 0 <= m["t2v"]["R@1"] <= 100
