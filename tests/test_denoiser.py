"""The two denoisers: parameter count, the fast form against the literal one (values and gradients, in
training and in sampling use), the pieces of Eqs. 4-6, and the strict converter to and from the
reference checkpoint layout."""
import pytest
import torch

from diffusionret_nb.core import CheckpointError
from diffusionret_nb.denoiser import (OFFICIAL_PREFIX, QueryCandidateDenoiser, T2VDenoiser, V2TDenoiser, from_official,
                                      load_official, sinusoidal_embedding, to_official)
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


def test_converter_round_trip_and_strict_loading():
    torch.manual_seed(6)
    a, b = Stage2Generator(D), Stage2Generator(D)
    official = {"clip.visual.conv1.weight": torch.zeros(1), **{f"module.{k}": v for k, v in to_official(a.state_dict()).items()}}
    assert all(k.startswith(tuple(OFFICIAL_PREFIX.values())) for k in to_official(a.state_dict()))
    assert set(from_official(official)) == set(a.state_dict())
    load_official(b, official)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    short = {k: v for k, v in official.items() if not k.endswith("diffusion_model.time_embed.0.weight")}
    with pytest.raises(CheckpointError, match="missing"):
        load_official(b, short)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_official(Stage2Generator(32), official)
    with pytest.raises(CheckpointError, match="not a denoiser parameter"):
        to_official({"clip.x": torch.zeros(1)})


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
