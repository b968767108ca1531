"""The two denoisers: parameter count, the fast form against the literal one (values and gradients, in
training and in sampling use), the pieces of Eqs. 4-6, and the strict converter to and from the
reference checkpoint layout."""
import re

import numpy as np
import pytest
import torch

from diffusionret_nb.core import CheckpointError
from diffusionret_nb.denoiser import (OFFICIAL_PREFIX, QueryCandidateDenoiser, T2VDenoiser, V2TDenoiser, from_official,
                                      load_official_denoisers, sinusoidal_embedding, to_official)
from diffusionret_nb.generator import Stage2Generator


pytestmark = pytest.mark.usefixtures("one_thread")

D = 64


def _inputs(B=5, G=9, N=6, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, frames, s = torch.randn(B, D, generator=g) * .3, torch.randn(G, T, D, generator=g) * .3, torch.randn(G, D, generator=g) * .3
    fm = torch.ones(G, T, dtype=torch.long); fm[1, 2:] = 0; fm[4, 1:] = 0
    qframes, qmask = frames[:B], fm[:B]
    idx = torch.stack([torch.randperm(G, generator=g)[:N] for _ in range(B)])
    return c, frames, fm, s, qframes, qmask, idx, torch.randn(B, N, generator=g), torch.randint(0, 50, (B,), generator=g)


def test_parameter_count_at_512():
    for cls in (T2VDenoiser, V2TDenoiser):
        assert sum(p.numel() for p in cls(512).parameters()) == 2_625_025


def test_sinusoidal_table():
    pe = sinusoidal_embedding(torch.arange(50), 512)
    assert pe.shape == (50, 512)
    torch.testing.assert_close(pe[:, 0], torch.sin(torch.arange(50.)))
    torch.testing.assert_close(pe[:, 1], torch.cos(torch.arange(50.)))
    torch.testing.assert_close(pe[7, 510], torch.sin(torch.tensor(7 / 10000 ** (510 / 512))))


@pytest.mark.parametrize("renorm,tau", [(False, 1.0), (True, 1.0), (False, 0.3)])
@pytest.mark.parametrize("N", [6, 9])      # candidates: part of the bank, or all of it
def test_fast_form_equals_literal(renorm, tau, N):
    torch.manual_seed(0)
    t2v, v2t = T2VDenoiser(D, renorm=renorm, tau=tau), V2TDenoiser(D, renorm=renorm, tau=tau)
    c, frames, fm, s, qf, qm, idx, xk, k = _inputs(N=N)
    for k_ in (k, 17):
        torch.testing.assert_close(t2v(c, frames, fm, idx, xk, k_), t2v.forward_reference(c, frames, fm, idx, xk, k_), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v2t(qf, qm, s, idx, xk, k_), v2t.forward_reference(qf, qm, s, idx, xk, k_), rtol=1e-4, atol=1e-5)


def test_fast_form_gradients_equal_literal():
    torch.manual_seed(1)
    c, frames, fm, s, qf, qm, idx, xk, k = _inputs()
    for den, args in ((T2VDenoiser(D), (c, frames, fm, idx, xk, k)), (V2TDenoiser(D), (qf, qm, s, idx, xk, k))):
        params = list(den.parameters())
        ga = torch.autograd.grad(torch.sin(den(*args)).sum(), params)
        gb = torch.autograd.grad(torch.sin(den.forward_reference(*args)).sum(), params)
        for a, b in zip(ga, gb): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sampling_terms_path_equals_literal():
    "The inference path (bank, prepare once, all steps' logits in one product, in-place buffer) at several timesteps."
    torch.manual_seed(2)
    c, frames, fm, s, qf, qm, idx, xk, _ = _inputs()
    ts = [40, 20, 3, 0]
    with torch.no_grad():
        t2v, v2t = T2VDenoiser(D), V2TDenoiser(D)
        ct, cv = t2v.prepare(c, t2v.prepare_bank(frames, fm), idx), v2t.prepare(qf, qm, v2t.prepare_bank(s), idx)
        for t, tt, tv in zip(ts, t2v.sampling_terms(ts), v2t.sampling_terms(ts)):
            torch.testing.assert_close(t2v.denoise(ct, xk, terms=tt), t2v.forward_reference(c, frames, fm, idx, xk, t), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v2t.denoise(cv, xk, terms=tv), v2t.forward_reference(qf, qm, s, idx, xk, t), rtol=1e-4, atol=1e-5)


def test_prepared_cache_reused_by_another_sampler_run():
    "A chunk's cache holds every step's logits of one sampler run; another run's timesteps on the same cache recompute them."
    torch.manual_seed(3)
    c, frames, fm, s, qf, qm, idx, xk, _ = _inputs()
    with torch.no_grad():
        t2v = T2VDenoiser(D)
        ct = t2v.prepare(c, t2v.prepare_bank(frames, fm), idx)
        for ts in ([40, 20], [7, 1]):                                            # the second run's steps differ
            for t, tt in zip(ts, t2v.sampling_terms(ts)):
                torch.testing.assert_close(t2v.denoise(ct, xk, terms=tt), t2v.forward_reference(c, frames, fm, idx, xk, t),
                                           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("N", [6, 9])      # candidates: part of the bank, or all of it
def test_projected_candidates_path_equals_literal(renorm, N):
    "Sampling banks: C_n = M_z cand_n computed once per chunk; every step's x̂0 as the literal form's, both directions."
    torch.manual_seed(6)
    c, frames, fm, s, qf, qm, idx, xk, _ = _inputs(N=N)
    ts = [49, 31, 7, 0]
    with torch.no_grad():
        t2v, v2t = T2VDenoiser(D, renorm=renorm, tau=0.7), V2TDenoiser(D, renorm=renorm, tau=0.7)
        ct, cv = t2v.prepare(c, t2v.prepare_bank(frames, fm, sampling=True), idx), v2t.prepare(qf, qm, v2t.prepare_bank(s, sampling=True), idx)
        torch.testing.assert_close(ct["C"], ct["v"] @ t2v.fold().T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cv["C"], s[idx] @ v2t.fold().T, rtol=1e-4, atol=1e-6)
        assert "C" not in t2v.prepare(c, t2v.prepare_bank(frames, fm), idx)        # training banks keep the (B, D) form
        for t, tt, tv in zip(ts, t2v.sampling_terms(ts), v2t.sampling_terms(ts)):
            x = xk * (1 + t / 10)                                                 # a different x_k at each step
            torch.testing.assert_close(t2v.denoise(ct, x, terms=tt), t2v.forward_reference(c, frames, fm, idx, x, t), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v2t.denoise(cv, x, terms=tv), v2t.forward_reference(qf, qm, s, idx, x, t), rtol=1e-4, atol=1e-5)


def test_gathered_path_for_large_banks():
    "A bank much larger than the candidates takes the gather branch of T2V pooling; same numbers."
    torch.manual_seed(3)
    t2v = T2VDenoiser(D)
    g = torch.Generator().manual_seed(4)
    frames, fm = torch.randn(400, 3, D, generator=g) * .3, torch.ones(400, 3)
    c, idx, xk = torch.randn(2, D, generator=g) * .3, torch.randint(0, 400, (2, 4), generator=g), torch.randn(2, 4, generator=g)
    torch.testing.assert_close(t2v(c, frames, fm, idx, xk, 5), t2v.forward_reference(c, frames, fm, idx, xk, 5), rtol=1e-4, atol=1e-5)


def test_pooling_follows_eq4():
    "τ' → 0 pools the best-matching frame; padded frames get no weight; renorm makes real weights sum to 1."
    den = QueryCandidateDenoiser(4, tau=1e-4)
    scores = torch.tensor([[[0.1, 0.9, 0.3]]])
    torch.testing.assert_close(den.pool_weights(scores, torch.ones(1, 1, 3)), torch.tensor([[[0., 1., 0.]]]))
    w = QueryCandidateDenoiser(4).pool_weights(scores, torch.tensor([[[1, 0, 1]]]))
    assert w[0, 0, 1] == 0 and w.sum() < 1
    w = QueryCandidateDenoiser(4, renorm=True).pool_weights(scores, torch.tensor([[[1, 0, 1]]]))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_noisy_distribution_enters_attention_as_bias():
    "A huge x_k on one candidate puts all the attention there: x̂0 then carries the +1 residual a_n on it alone."
    torch.manual_seed(5)
    den = T2VDenoiser(D)
    c, frames, fm, _, _, _, idx, xk, _ = _inputs(B=1)
    big = xk.clone(); big[0, 2] = 1e4
    with torch.no_grad():
        # with a one-hot attention on candidate 2, h = W_o W_v (v_2 + e_k) + b_o; rebuild x̂0 from that by hand
        Fn = frames[idx]; w = torch.softmax(torch.einsum("bd,bntd->bnt", c, Fn), -1) * fm[idx]
        v = torch.einsum("bnt,bntd->bnd", w, Fn); e = den.embed_time(3)
        h = den.w_o(den.w_v(v[:, 2] + e))
        expect = den.decoder(torch.cat([h[:, None].expand(-1, v.shape[1], -1), v], -1)).squeeze(-1)
        expect[0, 2] += 1
        torch.testing.assert_close(den(c, frames, fm, idx, big, 3), expect, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(den.forward_reference(c, frames, fm, idx, big, 3), expect, rtol=1e-4, atol=1e-5)


REFERENCE_INNER = {   # the reference's names and shapes inside diffusion_model. / diffusion_model_v. (D = 512)
    "q_proj.weight": (512, 512), "k_proj.weight": (512, 512), "v_proj.weight": (512, 512),
    "proj.weight": (512, 512), "proj.bias": (512,),
    "sequence_pos_encoder.pe": (5000, 1, 512), "embed_timestep.sequence_pos_encoder.pe": (5000, 1, 512),
    "embed_timestep.time_embed.0.weight": (512, 512), "embed_timestep.time_embed.0.bias": (512,),
    "embed_timestep.time_embed.2.weight": (512, 512), "embed_timestep.time_embed.2.bias": (512,),
    "decoder.0.weight": (1024, 1024), "decoder.0.bias": (1024,), "decoder.2.weight": (1, 1024), "decoder.2.bias": (1,)}


def _reference_pe(length=5000, d=512):
    "The reference's sinusoidal buffer, written out: sin on even, cos on odd dims, (length, 1, d)."
    pos = torch.arange(length, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2).float() * (-np.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe.unsqueeze(0).transpose(0, 1)


@pytest.fixture(scope="module")
def official512():
    torch.manual_seed(6)
    gen = Stage2Generator(512)
    return gen, to_official(gen.state_dict())


def test_to_official_writes_the_reference_layout(official512):
    gen, off = official512
    want = {pre + k: shape for pre in ("diffusion_model.", "diffusion_model_v.") for k, shape in REFERENCE_INNER.items()}
    assert {k: tuple(v.shape) for k, v in off.items()} == want
    for k in [k for k in off if k.endswith(".pe")]:
        torch.testing.assert_close(off[k], _reference_pe(), rtol=0, atol=1e-5)
    assert torch.equal(off["diffusion_model_v.proj.bias"], gen.v2t.w_o.bias)
    assert torch.equal(off["diffusion_model.embed_timestep.time_embed.2.weight"], gen.t2v.time_embed[2].weight)


def test_reference_layout_loads_strictly(official512):
    gen, off = official512
    other = Stage2Generator(512)
    full = {"module.clip.visual.conv1.weight": torch.zeros(1), **{f"module.{k}": v.half() for k, v in off.items()}}
    full["module.diffusion_model.sequence_pos_encoder.pe"] = _reference_pe().half()   # as the reference saves it, in fp16
    load_official_denoisers(other, full)
    assert all(torch.equal(gen.state_dict()[k].half().float(), other.state_dict()[k]) for k in gen.state_dict())


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("diffusion_model.embed_timestep.time_embed.0.weight"), "missing keys:\n    diffusion_model.embed_timestep.time_embed.0.weight"),
    (lambda o: o.pop("diffusion_model_v.sequence_pos_encoder.pe"), "missing keys:\n    diffusion_model_v.sequence_pos_encoder.pe"),
    (lambda o: o.update({"diffusion_model.extra.weight": torch.zeros(1)}), "unexpected keys:\n    diffusion_model.extra.weight"),
    (lambda o: o.update({"diffusion_model.decoder.2.weight": torch.zeros(2, 1024)}), "diffusion_model.decoder.2.weight: expected (1, 1024)"),
    (lambda o: o.update({"diffusion_model_v.embed_timestep.sequence_pos_encoder.pe": torch.zeros(5000, 1, 512)}),
     "diffusion_model_v.embed_timestep.sequence_pos_encoder.pe: the sinusoidal table"),
    (lambda o: o.update({"diffusion_model.sequence_pos_encoder.pe": _reference_pe(d=512).roll(1, 0)}),
     "diffusion_model.sequence_pos_encoder.pe: the sinusoidal table"),
], ids=["missing", "missing-pe", "extra", "shape", "pe-zeros", "pe-shifted"])
def test_reference_layout_errors(official512, change, message):
    _, off = official512
    bad = dict(off); change(bad)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_official_denoisers(Stage2Generator(512), bad)


def test_converter_refusals():
    a = Stage2Generator(D)
    with pytest.raises(CheckpointError, match="t2v.w_q.weight: expected"):
        load_official_denoisers(a, to_official(Stage2Generator(32).state_dict()))
    with pytest.raises(CheckpointError, match="unexpected keys:\n    clip.x"):
        to_official({"clip.x": torch.zeros(1), **a.state_dict()})
    with pytest.raises(CheckpointError, match="diffusion_model_v.proj.bias"):
        to_official({k: v for k, v in a.state_dict().items() if k != "v2t.w_o.bias"})
    assert set(OFFICIAL_PREFIX.values()) == {"diffusion_model.", "diffusion_model_v."}
    assert set(from_official(to_official(a.state_dict()))) == set(a.state_dict())


def test_generator_state_dict_has_denoisers_only():
    gen = Stage2Generator(D, num_steps=10)
    assert {k.split(".")[0] for k in gen.state_dict()} == {"t2v", "v2t"}
    other = Stage2Generator(D, num_steps=50, schedule="linear")
    other.load_state_dict(gen.state_dict())               # the schedule is not part of a checkpoint
    assert other.diffusion.num_steps == 50


def test_moves_with_dtype():
    den = T2VDenoiser(8).double()
    c, frames, fm = torch.randn(2, 8).double(), torch.randn(3, 2, 8).double(), torch.ones(3, 2)
    out = den(c, frames, fm, torch.tensor([[0, 1], [2, 0]]), torch.zeros(2, 2).double(), 4)
    assert out.dtype == torch.float64
