"""Re-ranking: the fast form against the straightforward reference (both directions, DDIM and DDPM, η,
chunk sizes, one step), what changes in the matrix, determinism and seeds, the multi-caption protocol,
bad input, the faster stage-1 similarity against the module's (fixed blocks and blocks from a memory budget), the
per-chunk precomputed sampling path against the literal denoiser at every step, the sampling step in C against the
torch operations, and the benchmark command's records and target ratios."""
import json

import numpy as np
import pytest
import torch

from diffusionret_nb.bench import TARGETS, bench_main, bench_rerank, random_gallery, ratios
from diffusionret_nb.core import DiffRetError
from diffusionret_nb.config import build_config
from diffusionret_nb.encoders import TokenWeightedSimilarity, similarity_blocks
from diffusionret_nb.inference import Gallery
from diffusionret_nb.rerank import (_direction, _noise, _sample_direction, gallery_similarity_fast, gallery_similarity_reference,
                                    rerank, rerank_metrics, stage_metrics, stage_rows)
from diffusionret_nb.generator import Stage2Generator
from diffusionret_nb.native import native_active, native_switch


pytestmark = pytest.mark.usefixtures("one_thread")


D = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    gen, simmod = Stage2Generator(D, num_steps=20), TokenWeightedSimilarity(D)
    text, video = random_gallery(60, D, n_frames=5, n_words=12, seed=1)
    video["mask"][3, 2:] = 0; video["mask"][10, 1:] = 0
    S = gallery_similarity_fast(simmod, text, video)
    return gen, simmod, text, video, S


@pytest.mark.parametrize("kw", [dict(), dict(chunk=1), dict(chunk=7), dict(chunk=1000), dict(sampler="ddpm", chunk=8),
                                dict(eta=0.7), dict(steps=1), dict(steps=3), dict(alpha=2.0, temp=0.3)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_fast_equals_reference(setup, kw):
    gen, _, text, video, S = setup
    kw = {"steps": 20, "topk": 8, "seed": 5, **kw}
    fast, ref = rerank(gen, S, text, video, **kw), rerank(gen, S, text, video, reference=True, **kw)
    for d in ("t2v", "v2t"):
        torch.testing.assert_close(fast[d], ref[d], rtol=1e-5, atol=1e-5)


def test_chunking_does_not_change_the_result(setup):
    gen, _, text, video, S = setup
    a = rerank(gen, S, text, video, topk=8, steps=20, chunk=3, sampler="ddpm")
    b = rerank(gen, S, text, video, topk=8, steps=20, chunk=64, sampler="ddpm")
    for d in a: torch.testing.assert_close(a[d], b[d], rtol=1e-6, atol=1e-6)


def test_only_topk_entries_change_by_alpha_softmax(setup):
    gen, _, text, video, S = setup
    r = rerank(gen, S, text, video, topk=8, steps=20, alpha=0.5)
    for d, base in (("t2v", S), ("v2t", S.t())):
        changed = r[d] != base
        top = torch.zeros_like(changed).scatter_(1, base.topk(8, 1).indices, True)
        assert torch.equal(changed & ~top, torch.zeros_like(changed))
        torch.testing.assert_close((r[d] - base).sum(1), torch.full((len(base),), 0.5), rtol=1e-5, atol=1e-5)
        assert ((r[d] - base)[top] > 0).all()


def test_temperature_multiplies_x0(setup):
    """The reference adds alpha·softmax(x̂0·temp): with the same seed (same x̂0) and p = softmax(x̂0) read off temp = 1,
    temp = 2 must add alpha·p²/Σp² (x̂0/temp would add alpha·√p/Σ√p)."""
    gen, _, text, video, S = setup
    kw = dict(topk=8, steps=20, seed=5, alpha=0.5)
    one, two = rerank(gen, S, text, video, temp=1.0, **kw), rerank(gen, S, text, video, temp=2.0, **kw)
    for d, base in (("t2v", S), ("v2t", S.t())):
        idx = base.topk(8, 1).indices
        p = (one[d] - base).gather(1, idx) / 0.5                              # softmax(x̂0)
        added = (two[d] - base).gather(1, idx)
        torch.testing.assert_close(added, 0.5 * p ** 2 / (p ** 2).sum(1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_seeded_and_deterministic(setup):
    gen, _, text, video, S = setup
    a, b = rerank(gen, S, text, video, topk=8, steps=20, seed=1), rerank(gen, S, text, video, topk=8, steps=20, seed=1)
    c = rerank(gen, S, text, video, topk=8, steps=20, seed=2)
    assert torch.equal(a["t2v"], b["t2v"]) and torch.equal(a["v2t"], b["v2t"])
    assert not torch.equal(a["t2v"], c["t2v"])
    one = rerank(gen, S, text, video, topk=8, steps=20, seed=1, directions=("v2t",))
    assert set(one) == {"v2t"} and torch.equal(one["v2t"], a["v2t"])     # directions draw independent noise


def _gallery(text, video, S, caption_video=None):
    n = len(S)
    cv = np.arange(n) if caption_video is None else caption_video
    return Gallery([f"t{i}" for i in range(n)], text, video, S, cv, np.arange(S.shape[1]))


def test_metrics_over_seeds(setup):
    gen, _, text, video, S = setup
    g = _gallery(text, video, S + 0.3 * torch.eye(60))
    dcfg = build_config(rerank_topk=8, diff_steps=20, diff_eval_steps=20, rerank_n_seeds=3, rerank_seed=7).diffusion
    m = rerank_metrics(g, gen, dcfg)
    assert m["seeds"] == [7, 8, 9] and len(m["per_seed"]) == 3
    assert m["t2v"]["R@1"] == pytest.approx(np.mean([p["t2v"]["R@1"] for p in m["per_seed"]]))
    assert m["t2v_std"]["MnR"] == pytest.approx(np.std([p["t2v"]["MnR"] for p in m["per_seed"]], ddof=1))
    assert rerank_metrics(g, gen, dcfg, n_seeds=1)["t2v"] == m["per_seed"][0]["t2v"]
    rows = stage_rows(stage_metrics(g, gen, dcfg))
    assert list(rows) == ["stage 1 T2V", "stage 1 V2T", "stage 2 T2V (mean of 3 seeds)", "stage 2 V2T (mean of 3 seeds)"]


def test_multi_caption_gallery(setup):
    "60 captions of 20 videos: T2V ranks each caption's video; V2T re-ranks captions and takes each video's best."
    gen, simmod, text, video, _ = setup
    video20 = {k: v[:20] for k, v in video.items()}
    S = gallery_similarity_fast(simmod, text, video20)
    cv = np.repeat(np.arange(20), 3)
    g = _gallery(text, video20, S, cv)
    dcfg = build_config(rerank_topk=8, diff_steps=20, diff_eval_steps=20).diffusion
    m = rerank_metrics(g, gen, dcfg)
    assert m["n_queries"] == 60 and m["n_candidates"] == 20
    r = rerank(gen, S, text, video20, topk=8, steps=20)
    assert r["t2v"].shape == (60, 20) and r["v2t"].shape == (20, 60)


def test_bad_input(setup):
    gen, _, text, video, S = setup
    with pytest.raises(DiffRetError, match=r"rerank_topk=61 must lie in \[1, 60\]"):
        rerank(gen, S, text, video, topk=61)
    with pytest.raises(DiffRetError, match="empty gallery"):
        rerank(gen, S[:0], {k: v[:0] for k, v in text.items()}, video)
    with pytest.raises(DiffRetError, match="59 video columns"):
        rerank(gen, S[:, :59], text, video, topk=8)
    with pytest.raises(DiffRetError, match="frame mask has shape"):
        rerank(gen, S, text, dict(video, mask=video["mask"][:, :3]), topk=8)
    with pytest.raises(DiffRetError, match="feature width mismatch"):
        rerank(Stage2Generator(16, num_steps=20), S, text, video, topk=8)
    bad = S.clone(); bad[4, 2] = float("nan")
    with pytest.raises(DiffRetError, match="1 NaN entries"):
        rerank(gen, bad, text, video, topk=8)
    with pytest.raises(DiffRetError, match="diff_eval_steps"):
        rerank(gen, S, text, video, topk=8, steps=21)


@pytest.mark.parametrize("lengths", ["msrvtt", "full"])
def test_fast_similarity_equals_the_module(lengths):
    torch.manual_seed(3)
    simmod = TokenWeightedSimilarity(D)
    text, video = random_gallery(70, D, n_frames=6, n_words=32, lengths=lengths, seed=4)
    video["mask"][5, 3:] = 0; video["mask"][9, 1:] = 0
    ref = simmod(text["words"], text["mask"], video["frames"], video["mask"])
    torch.testing.assert_close(gallery_similarity_fast(simmod, text, video, block_t=16, block_v=32), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gallery_similarity_reference(simmod, text, video, block=32), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mem_mb", [1e-9, 0.05, 4])
def test_fast_similarity_blocks_from_a_memory_budget(mem_mb):
    "Blocks chosen from a memory budget (one text per block, a few, all texts at once) give the module's numbers."
    torch.manual_seed(5)
    simmod = TokenWeightedSimilarity(D)
    text, video = random_gallery(45, D, n_frames=6, n_words=16, seed=6)
    video["mask"][2, 4:] = 0
    ref = simmod(text["words"], text["mask"], video["frames"], video["mask"])
    torch.testing.assert_close(gallery_similarity_fast(simmod, text, video, block_v=16, mem_mb=mem_mb), ref, rtol=1e-5, atol=1e-5)
    lengths = text["mask"].sum(1)
    blocks = similarity_blocks(lengths, 6, 16, mem_mb)
    assert sorted(torch.cat(blocks).tolist()) == list(range(45))                  # every text exactly once
    rows = int(mem_mb * 2**20 / 4 / (6 * 16))
    assert all(len(b) == 1 or len(b) * int(lengths[b].max()) <= rows for b in blocks)   # within the budget, or a single text
    assert all(len(set(lengths[b].tolist())) == 1 for b in blocks)                # texts of one length: no padded words
    firsts = [int(lengths[b[0]]) for b in blocks]
    assert firsts == sorted(firsts, reverse=True)                                 # longest first


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("direction", ["t2v", "v2t"])
def test_precomputed_chunk_path_equals_recomputing_every_step(setup, sampler, eta, renorm, direction):
    """x̂0 of every step when the step-independent parts (pooling, P_n, logits, projected candidates C_n) are
    computed once per chunk, against the literal denoiser recomputing everything at every step."""
    _, _, text, video, S = setup
    torch.manual_seed(7)
    gen = Stage2Generator(D, num_steps=20, renorm=renorm).eval()
    smp = gen.diffusion.sampler(sampler, **(dict(eta=eta) if sampler == "ddim" else {})).set_timesteps(20)
    s = S if direction == "t2v" else S.t()
    idx = s.topk(8, dim=1).indices
    x_start, z = _noise(3, 0 if direction == "t2v" else 1, len(s), 8, 20, sampler == "ddpm")
    eot, frames, fmask = text["eot"].float(), video["frames"].float(), video["mask"]
    x0 = {}
    for reference in (False, True):
        den, prep, ref = _direction(gen, direction, eot, frames, fmask, idx, reference)
        rec = torch.empty(len(s), 20, 8)
        def record(sl, si, o): rec[sl, si] = o.pred_original_sample
        with torch.no_grad(): _sample_direction(den, smp, len(s), prep, ref, x_start, z, 7, reference, on_step=record)
        x0[reference] = rec
    torch.testing.assert_close(x0[False], x0[True], rtol=1e-4, atol=1e-5)
    assert x0[False].std() > 0.01                                                 # a non-trivial x̂0


@pytest.mark.parametrize("dim", [D, 512])
def test_sampling_step_in_c_equals_torch_operations(setup, dim):
    """The re-ranking with the fused C step (nbs/08_native, the CPU default) and with torch operations: the same
    numbers to float32 rounding, both directions, both samplers, at the real width too."""
    if not native_active(): pytest.skip("the fused C step is not built here (no C compiler): nothing to compare")
    if dim == D: gen, _, text, video, S = setup
    else:
        torch.manual_seed(3)
        gen, simmod = Stage2Generator(dim, num_steps=50).eval(), TokenWeightedSimilarity(dim)
        text, video = random_gallery(80, dim, seed=4)
        S = gallery_similarity_fast(simmod, text, video)
    for kw in (dict(topk=32 if dim > D else 8, steps=10), dict(topk=8, steps=5, sampler="ddpm")):
        c = rerank(gen, S, text, video, seed=2, **kw)
        with native_switch(False): t = rerank(gen, S, text, video, seed=2, **kw)
        for d in ("t2v", "v2t"):
            torch.testing.assert_close(c[d], t[d], rtol=1e-5, atol=1e-5)
            assert not torch.equal(c[d], S if d == "t2v" else S.t())                # the re-ranking changed something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(setup):
    gen, simmod, text, video, S = setup
    a = rerank(gen, S, text, video, topk=8, steps=20, sampler="ddpm")
    b = rerank(gen.to("cuda"), S, text, video, topk=8, steps=20, sampler="ddpm")
    gen.to("cpu")
    for d in a: torch.testing.assert_close(a[d], b[d], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gallery_similarity_fast(simmod.to("cuda"), text, video, device="cuda"),
                               gallery_similarity_fast(simmod.to("cpu"), text, video), rtol=1e-4, atol=1e-5)


def test_bench_records(tmp_path):
    recs = bench_rerank(galleries=(30,), steps=(1, 2), dim=16, topk=4, ref_gallery=30, ref_steps=2, train_batch=8, matmul_n=128,
                        repeats=1, verbose=False)
    assert all({"gallery", "steps", "seconds", "peak_mb", "direction"} <= set(r) for r in recs)
    assert {r["runs"] for r in recs if r["direction"] != "matmul"} == {1}
    assert {(r["direction"], r["impl"]) for r in recs} >= {("t2v", "fast"), ("t2v", "reference"), ("v2t", "reference"),
                                                           ("similarity", "reference"), ("train_step", "reference"), ("matmul", "fast")}
    assert all(r["max_abs_diff"] < 1e-4 for r in recs if "max_abs_diff" in r)
    rs = ratios(recs)
    assert {r["name"] for r in rs} == set(TARGETS)
    sec = {(r["direction"], r["impl"], r["steps"]): r for r in recs}
    steps = {r["what"].split(":")[0]: r["value"] for r in rs if r["name"] == "steps"}
    for d in ("t2v", "v2t"):
        assert steps[d] == pytest.approx(sec[(d, "fast", 2)]["seconds"] / sec[(d, "fast", 1)]["seconds"], rel=0.02, abs=0.006)  # value: 2 decimals
    peak = next(r for r in rs if r["name"] == "similarity_peak")
    assert peak["value"] == pytest.approx(sec[("similarity", "fast", 0)]["peak_mb"] / max(sec[("similarity", "reference", 0)]["peak_mb"], 0.1),
                                          rel=0.02, abs=0.01)
    assert all(r["meets"] == (r["value"] <= float(r["target"][2:]) if r["target"][0] == "≤" else r["value"] >= float(r["target"][2:]))
               for r in rs)
    out = tmp_path / "b.json"
    assert bench_main(["rerank", "--gallery", "40", "--steps", "1", "--topk", "4", "--no-reference", "--no-train-step",
                       "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["gallery"], r["steps"], r["direction"]) for r in data} >= {(40, 1, "t2v"), (40, 1, "v2t"), (40, 0, "similarity")}
    assert json.loads((tmp_path / "b.ratios.json").read_text()) == []              # one step, no reference: nothing to compare
    out2 = tmp_path / "c.json"
    assert bench_main(["rerank", "--gallery", "40", "--steps", "1,2", "--topk", "4", "--no-train-step", "--sweep", "full",
                       "--ref-gallery", "40", "--ref-steps", "2", "--repeats", "1", "--out", str(out2)]) == 0
    assert {r["name"] for r in json.loads((tmp_path / "c.ratios.json").read_text())} == set(TARGETS)
    assert bench_main(["rerank", "--gallery", "abc"]) == 2
