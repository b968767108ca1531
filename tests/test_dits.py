"""DITS (arch=dits): the schedule by hand, T' = 0 is X-Pool exactly (the model and a whole `train_eval` run), the
sampler with ε forced to zero is the identity, gradients reach CLIP, the pooling and ε_γ through the unrolled steps,
deterministic evaluation, one test per ablation switch, the gap diagnostics, checkpoints (behaviour from the run's
config, structure checked), a workbook checkpoint as CLIP weights, and the plan keys `init:` / `clip_from:`."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusionret_nb import pipeline
from diffusionret_nb.clip import read_weights
from diffusionret_nb.config import build_config
from diffusionret_nb.core import CheckpointError, ConfigError
from diffusionret_nb.dits import truncated_schedule
from diffusionret_nb.losses import symmetric_infonce
from diffusionret_nb.plans import PlanError, check_jobs, for_profile, load_plan, plan_jobs
from diffusionret_nb.registry import create_model, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **p):
    torch.manual_seed(seed)
    return create_model(build_config(preset="tiny", **{"arch": "dits", "dits_heads": 4, "dits_depth": 2, **p}))


def _wake(m, std=0.05, seed=1):
    "Move ε_γ away from its zero initialisation (adaLN-Zero makes it output 0 and pass no gradient inward)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.eps.parameters(): p.add_(torch.randn(p.shape, generator=g) * std)
    return m


def _enc(m, batch):
    return m.encode_text(batch["tokens"], batch["word_mask"]), m.encode_video(batch["frames"], batch["frame_mask"])


def test_chi_and_lambda_by_hand():
    s = truncated_schedule(2, 0.2, 0.6)                     # α = (0.8, 0.4), ᾱ = (0.8, 0.32)
    assert torch.allclose(s["chi"], torch.tensor([0.2 / math.sqrt(0.8 * 0.2), 0.6 / math.sqrt(0.4 * 0.68)]), atol=1e-6)
    assert torch.allclose(s["lam"], torch.tensor([math.sqrt(0.2), math.sqrt(0.6)]), atol=1e-6)


def test_truncation_zero_is_xpool_exactly(batch):
    torch.manual_seed(0)
    x = create_model(build_config(preset="tiny", arch="xpool")).eval()
    d = _model(dits_truncation=0).eval()
    sx, sd = x.state_dict(), d.state_dict()
    assert all(torch.equal(sx[k], sd[k]) for k in sx)                            # ε_γ was drawn aside
    assert set(sd) - set(sx) and all(k.startswith("eps.") for k in set(sd) - set(sx))
    with torch.no_grad():
        tx, vx = _enc(x, batch); td, vd = _enc(d, batch)
        assert torch.equal(x.similarity(tx, vx), d.similarity(td, vd))
        assert torch.equal(x.gallery_similarity(tx, vx, block=2), d.gallery_similarity(td, vd, block=2))


def test_zero_epsilon_without_noise_is_the_identity(batch):
    m = _wake(_model(dits_truncation=10, dits_train_noise=False)).train()
    m.eps.forward = lambda v, tau, cond=None: torch.zeros_like(v)
    t = torch.randn(5, 128)
    assert torch.equal(m.align(t), t)


def test_gradients_reach_clip_pool_and_epsilon_through_the_unrolled_steps(batch):
    m = _wake(_model(dits_truncation=5)).train()
    m(batch)["loss"].backward()
    for name, mod in (("clip", m.clip), ("pool", m.pool), ("eps", m.eps)):
        got = [p.grad for p in mod.parameters() if p.requires_grad]
        assert got and sum(g.abs().sum().item() for g in got if g is not None) > 0, name
    blocks = [p.grad for p in m.eps.blocks[0].parameters()]                    # the first block: reached through every step
    assert all(g is not None for g in blocks) and sum(g.abs().sum() for g in blocks) > 0


def test_evaluation_is_deterministic_and_eval_noise_is_seeded(batch):
    m = _wake(_model(dits_truncation=5)).eval()
    with torch.no_grad():
        t, v = _enc(m, batch)
        a, b = m.gallery_similarity(t, v), m.gallery_similarity(*_enc(m, batch))
        assert torch.equal(a, b)
        assert torch.allclose(m.similarity(t, v), a, atol=1e-6)                 # the blocked gallery is the batch similarity
        m.configure_from(build_config(preset="tiny", arch="dits", dits_truncation=5, dits_eval_noise=True))
        n1, n2 = _enc(m, batch)[0]["aligned"], _enc(m, batch)[0]["aligned"]
    assert torch.equal(n1, n2) and not torch.equal(n1, t["aligned"])         # drawn, from the seeded generator


def test_truncation_sets_the_number_of_epsilon_calls():
    for T in (1, 3, 7):
        m = _model(dits_truncation=T).eval()
        calls = []
        f = m.eps.forward
        m.eps.forward = lambda v, tau, cond=None: calls.append(int(tau[0])) or f(v, tau, cond)
        m.align(torch.randn(2, 128))
        assert calls == list(range(T, 0, -1))


def test_schedule_steps_reading():
    assert len(_model(dits_truncation=5).schedule["beta"]) == 5                 # β_1 .. β_T' by default
    m = _model(dits_truncation=5, dits_schedule_steps=40)
    assert len(m.schedule["beta"]) == 40 and abs(float(m.schedule["beta"][-1]) - 0.99) < 1e-6
    with pytest.raises(ConfigError, match="exceeds"):
        _model(dits_truncation=10, dits_schedule_steps=5)


def test_fixed_prior_adds_gaussian_noise_of_the_given_variance():
    m = _model(dits_alignment="fixed_prior", dits_prior_var=0.1)
    assert m.eps is None
    t = torch.zeros(2000, 128)
    d = m.train().align(t)
    assert abs(d.var().item() - 0.1) < 0.005
    assert torch.equal(m.eval().align(t), t)                                  # no test-time noise by default
    with pytest.raises(ConfigError, match="no network to condition"):
        _model(dits_alignment="fixed_prior", dits_condition="t")


def test_denoise_objective_trains_epsilon_only_with_the_chosen_loss(batch):
    losses = {}
    for kind in ("l2", "l1"):
        m = _model(dits_alignment="diffusion", dits_condition="t", dits_objective="denoise", dits_denoise_loss=kind).train()
        torch.manual_seed(3)
        out = m(batch)
        out["loss"].backward()
        losses[kind] = out["loss"].item()
        assert all(p.grad is None for p in m.clip.parameters()) and all(p.grad is None for p in m.pool.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.eps.parameters())
    # ε_γ outputs 0 at initialisation, so L2 = E[ε²] ≈ 1 and L1 = E|ε| ≈ √(2/π) ≈ 0.80 over 4 × 128 draws
    assert 0.8 < losses["l2"] < 1.2 and 0.7 < losses["l1"] < 0.9
    with pytest.raises(ConfigError, match="denoise"):
        _model(dits_objective="denoise")


def test_diffusion_alignment_is_t_plus_a_ddpm_sample():
    m = _model(dits_alignment="diffusion", dits_diffusion_steps=3).eval()
    t = torch.randn(4, 128)
    a1, a2 = m.align(t), m.align(t)
    assert torch.equal(a1, a2)                                                # seeded at test time
    g = torch.Generator().manual_seed(m.noise_seed)
    d = torch.randn(4, 128, generator=g)                                      # ε_γ = 0: δ_{τ-1} = δ_τ/√α_τ + σ_τ z
    s = m.schedule
    for tau in (3, 2, 1):
        d = d / s["alpha"][tau - 1].sqrt()
        if tau > 1: d = d + s["beta"][tau - 1].sqrt() * torch.randn(4, 128, generator=g)
    assert torch.allclose(a1, t + d, atol=1e-5)


def test_conditions_widen_epsilon_and_pairwise_chains_score_each_pair(batch):
    assert _model().eps.c_embed is None
    assert _model(dits_condition="t").eps.c_embed.in_features == 128
    assert _model(dits_condition="tv").eps.c_embed.in_features == 256
    m = _wake(_model(dits_condition="v", dits_truncation=3)).eval()
    with torch.no_grad():
        t, v = _enc(m, batch)
        assert "aligned" not in t                                             # the chain needs the video
        sim = m.similarity(t, v)
        i, j = 2, 1
        vij = m.pool.pool(m.pool.prepare_text(t["eot"][i:i + 1]), m.pool.prepare_video(v["frames"][j:j + 1], v["mask"][j:j + 1]))[0]
        a = m.align(t["eot"][i:i + 1], cond=vij)
        assert torch.allclose(sim[i, j], F.cosine_similarity(a, vij)[0], atol=1e-5)
        assert torch.allclose(m.gallery_similarity(t, v, block=2, mem_budget=4 * 40 * 128 * 3), sim, atol=1e-5)
    with pytest.raises(ConfigError, match="dits_pool_query"):
        _model(dits_condition="v", dits_pool_query="aligned")


def test_gap_t_minus_v_carries_the_video_towards_the_text(batch):
    m = _wake(_model(dits_gap="t-v", dits_truncation=3)).eval()
    with torch.no_grad():
        t, v = _enc(m, batch)
        sim = m.similarity(t, v)
        i, j = 0, 3
        vij = m.pool.pool(m.pool.prepare_text(t["eot"][i:i + 1]), m.pool.prepare_video(v["frames"][j:j + 1], v["mask"][j:j + 1]))[0]
        assert torch.allclose(sim[i, j], F.cosine_similarity(t["eot"][i:i + 1], m.align(None, start=vij))[0], atol=1e-5)
        ref = _wake(_model(dits_truncation=3)).eval()
        assert not torch.allclose(ref.similarity(*_enc(ref, batch)), sim, atol=1e-3)


def test_pool_query_normalize_and_xpool_loss(batch):
    m = _wake(_model(dits_pool_query="aligned")).eval()
    with torch.no_grad():
        t, v = _enc(m, batch)
        want = m.pool.score(m.pool.prepare_text(t["aligned"], t["aligned"]), m.pool.prepare_video(v["frames"], v["mask"]))
        assert torch.allclose(m.similarity(t, v), want, atol=1e-6)
    n = _model(dits_normalize=True, dits_train_noise=False).train()            # ε_γ = 0 at init: v_0 = t/|t|
    x = torch.randn(3, 128) * 5
    assert torch.allclose(n.align(x), F.normalize(x, dim=-1), atol=1e-6)
    k = _wake(_model(dits_xpool_loss=True, dits_train_noise=False)).eval()   # eval: no dropout, so the sums are exact
    with torch.no_grad():
        t, v = _enc(k, batch)
        both = k(batch)["loss"]
        plain = symmetric_infonce(k.similarity(t, v), k.logit_scale) + symmetric_infonce(k.pool(t["eot"], v["frames"], v["mask"]), k.logit_scale)
    assert torch.allclose(both, plain, atol=1e-5)


def test_diagnostics_per_relevant_pair(batch):
    m = _model(dits_truncation=0).eval()
    with torch.no_grad():
        t, v = _enc(m, batch)
        d = m.alignment_diagnostics(t, v, [0, 1, 2, 3], block=3)
    assert set(d) == {"gap_l1", "gap_l2", "cos", "gap_l1_unaligned", "gap_l2_unaligned", "cos_unaligned"}
    assert all(a.shape == (4,) for a in d.values())
    assert (d["gap_l2"] == d["gap_l2_unaligned"]).all()                        # T' = 0: nothing moves
    sim = m.similarity(t, v).detach().diagonal().numpy()
    assert abs(d["cos"] - sim).max() < 1e-5 and abs(d["gap_l2"] ** 2 - (2 - 2 * d["cos"])).max() < 1e-4
    w = _wake(_model(dits_truncation=5)).eval()
    with torch.no_grad():
        dw = w.alignment_diagnostics(*_enc(w, batch), [3, 2, 1, 0])
    assert not (dw["gap_l2"] == dw["gap_l2_unaligned"]).all()


def _checkpoint(m, **p):
    cfg = build_config(preset="tiny", arch="dits", dits_heads=4, dits_depth=2, **p)
    from diffusionret_nb.config import params_dict
    return dict(model=m.state_dict(), params=params_dict(cfg), stage="stage1", arch="dits")


def test_checkpoints_take_the_runs_behaviour_and_check_the_structure(tmp_path):
    m = _model(dits_alignment="diffusion", dits_condition="t", dits_objective="denoise")
    torch.save(_checkpoint(m, dits_alignment="diffusion", dits_condition="t", dits_objective="denoise"), tmp_path / "pre.pt")
    tune = build_config(preset="tiny", arch="dits", dits_heads=4, dits_depth=2, dits_alignment="diffusion", dits_condition="t")
    got, _ = load_model(tmp_path / "pre.pt", tune, stage=1)
    assert got.objective == "contrastive" and torch.equal(got.eps.linear.weight, m.eps.linear.weight)
    other = build_config(preset="tiny", arch="dits", dits_heads=4, dits_depth=2, dits_alignment="diffusion", dits_condition="none")
    with pytest.raises(CheckpointError, match="built with"):
        load_model(tmp_path / "pre.pt", other, stage=1)


def test_a_workbook_checkpoint_gives_its_clip_weights(tmp_path):
    m = _model()
    torch.save(_checkpoint(m), tmp_path / "best.pt")
    sd, info = read_weights(tmp_path / "best.pt")
    assert info.kind == "workbook" and set(sd) == set(m.clip.clip.state_dict())
    torch.manual_seed(5)
    n = create_model(build_config(preset="tiny", arch="xpool", pretrained=str(tmp_path / "best.pt")))
    assert all(torch.equal(a, b) for a, b in zip(n.clip.clip.state_dict().values(), m.clip.clip.state_dict().values()))
    torch.save(dict(model={"generator.w": torch.zeros(1)}, params={}), tmp_path / "gen.pt")
    with pytest.raises(CheckpointError, match="without CLIP weights"):
        read_weights(tmp_path / "gen.pt")


RUN = dict(dataset="synthetic", preset="tiny", device="cpu", syn_n_train=32, syn_n_val=8, syn_n_test=16, syn_size=32, n_frames=3,
           epochs=1, batch_size=8, max_steps=3, eval_batch_size=8, eval_untrained=False, lr=1e-3, clip_lr_coef=1.0, seed=7,
           dits_heads=4, dits_depth=2)


def test_a_dits_run_with_truncation_zero_gives_xpools_metrics_and_weights(tmp_path):
    ms = {}
    for name, p in (("xpool", dict(arch="xpool")), ("dits0", dict(arch="dits", dits_truncation=0))):
        cfg = build_config(**{**{k: v for k, v in RUN.items() if not k.startswith("dits") or name != "xpool"}, **p})
        ms[name] = pipeline.train_eval(cfg, tmp_path / name, progress=False)
    drop = ("eval_seconds", "peak_memory_mib", "memory_kind", "alignment", "selected", "train", "feature_cache")   # run-specific
    a, b = ({k: v for k, v in m.items() if k not in drop} for m in ms.values())
    assert a == b and ms["xpool"]["train"]["steps"] == ms["dits0"]["train"]["steps"] == 3
    wa = torch.load(tmp_path / "xpool/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "dits0/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    d = ms["dits0"]["alignment"]
    assert d["mean_gap_l2"] == d["mean_gap_l2_unaligned"]


PLAN = """
title: dits keys
paper: dits
seeds: [0]
profiles:
  synthetic: {params: %s}
  paper: {params: {dataset: synthetic, preset: tiny}}
entries:
  clip: {params: {arch: clip4clip_meanp}, per_seed: false, only: [synthetic]}
  pre: {clip_from: clip, params: {arch: dits, dits_alignment: diffusion, dits_objective: denoise}}
  tune: {init: pre, clip_from: clip, params: {arch: dits, dits_alignment: diffusion}}
  ev: {template: evaluate, checkpoint: tune, params: {test_limit: 8}}
""" % json.dumps({k: v for k, v in RUN.items() if not k.startswith("dits")})


def test_plan_keys_init_and_clip_from(tmp_path):
    (tmp_path / "p.yaml").write_text(PLAN)
    plan = load_plan(tmp_path / "p.yaml")
    jobs = {j.entry: j for j in plan_jobs(plan, "synthetic", out=tmp_path)}
    assert jobs["pre"].params["pretrained"] == str(jobs["clip"].dir) and jobs["clip"].key in jobs["pre"].needs
    assert jobs["tune"].params["checkpoint"] == str(jobs["pre"].dir) and jobs["pre"].key in jobs["tune"].needs
    check_jobs(list(jobs.values()), records=False)        # run folders not written yet: not "weights not found" (evaluate too)
    paper = {j.entry: j for j in plan_jobs(plan, "paper", out=tmp_path)}      # no `clip` entry there: its own pretrained
    assert "clip" not in paper and paper["pre"].params.get("pretrained", "") == "" and for_profile(plan, "paper")["entries"]["pre"]["clip_from"] is None
    (tmp_path / "q.yaml").write_text(PLAN.replace("tune: {init: pre,", "tune: {template: evaluate, checkpoint: pre, init: pre,"))
    with pytest.raises(PlanError, match="`init:` belongs to train_eval"):
        load_plan(tmp_path / "q.yaml")
