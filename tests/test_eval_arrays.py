"""The arrays an evaluation saves beside its metrics (eval_arrays.npz): per-query ranks that reproduce the
metrics exactly (one and several captions per video, ties), seeded positive/negative similarity samples
(Figure 4), `rerank_metrics(arrays=True)` and the x̂0 trace of a few queries (Figure 5) against `rerank`."""
import numpy as np
import pytest
import torch

from diffusionret_nb.bench import random_gallery
from diffusionret_nb.config import build_config
from diffusionret_nb.core import DiffRetError
from diffusionret_nb.encoders import TokenWeightedSimilarity
from diffusionret_nb.generator import Stage2Generator
from diffusionret_nb.inference import Gallery, gallery_arrays, gallery_metrics, score_samples
from diffusionret_nb.metrics import median_rule, metrics_from_ranks, multi_caption_metrics, query_ranks
from diffusionret_nb.rerank import gallery_similarity_fast, rerank, rerank_metrics, trace_queries, trace_rerank


pytestmark = pytest.mark.usefixtures("one_thread")

D = 32


def _cases():
    rng = np.random.default_rng(0)
    single = rng.normal(size=(30, 30))
    tied = np.round(rng.normal(size=(30, 30)), 1)                       # many ties, positives among them
    tied[:5] = 0.0                                                      # rows of one constant value: worst rank
    cv = np.concatenate([np.arange(12), rng.integers(0, 12, 18)])       # 30 captions of 12 videos
    multi = np.round(rng.normal(size=(30, 12)), 1)
    multi[np.arange(30), cv] += 0.5
    return [("single", single, np.arange(30)), ("single-ties", tied, np.arange(30)),
            ("single-permuted", single, rng.permutation(30)), ("multi-ties", multi, cv),
            ("multi-torch", torch.from_numpy(multi).float(), cv)]


@pytest.mark.parametrize("name,sim,cv", _cases(), ids=[c[0] for c in _cases()])
def test_query_ranks_reproduce_the_metrics(name, sim, cv):
    r = query_ranks(sim, cv)
    n_vid = sim.shape[1]
    assert r["t2v"].dtype == np.int32 and r["v2t"].dtype == np.int32
    assert r["t2v"].shape == (len(cv),) and r["v2t"].shape == (n_vid,)
    m = multi_caption_metrics(sim, cv)
    assert metrics_from_ranks(r["t2v"], median_rule(cv)) == m["t2v"]
    assert metrics_from_ranks(r["v2t"]) == m["v2t"]
    if name.startswith("single"):                                        # one caption per video: the default median
        assert metrics_from_ranks(r["t2v"]) == m["t2v"]
    # the rule itself, literally: ties count against the positive; V2T takes each video's best caption
    s = np.asarray(sim, dtype=np.float64)
    assert r["t2v"].tolist() == [int((s[i] >= s[i, cv[i]]).sum() - 1) for i in range(len(cv))]
    best = np.stack([s[np.asarray(cv) == v].max(0) for v in range(n_vid)])   # best[v, j]: video v's best caption on video j
    assert r["v2t"].tolist() == [int((best[:, j] >= best[j, j]).sum() - 1) for j in range(n_vid)]


def test_ties_rank_last():
    r = query_ranks(np.zeros((4, 4)), np.arange(4))
    assert r["t2v"].tolist() == [3] * 4 and r["v2t"].tolist() == [3] * 4
    assert metrics_from_ranks(r["t2v"]) == multi_caption_metrics(np.zeros((4, 4)), np.arange(4))["t2v"]


def test_score_samples_are_negatives_and_seeded():
    rng = np.random.default_rng(2)
    cv = np.concatenate([np.arange(25), rng.integers(0, 25, 15)])
    S = rng.normal(size=(40, 25)).astype(np.float32)
    # make every entry unique and identify it: value -> (query, video)
    S = S + np.arange(S.size, dtype=np.float32).reshape(S.shape) * 1e3
    where = {float(v): (i, j) for (i, j), v in np.ndenumerate(S)}
    state = np.random.get_state()
    a, b = score_samples(S, cv, n_neg=300, seed=7), score_samples(torch.from_numpy(S), cv, n_neg=300, seed=7)
    assert np.array_equal(np.random.get_state()[1], state[1])           # the global RNG is left alone
    assert a["pos"].dtype == np.float32 and a["neg"].dtype == np.float32
    assert a["pos"].shape == (40,) and a["neg"].shape == (300,)
    assert np.array_equal(a["pos"], S[np.arange(40), cv]) and np.array_equal(a["neg"], b["neg"])
    pairs = [where[float(v)] for v in a["neg"]]
    assert all(cv[i] != j for i, j in pairs)                             # never a positive
    assert len(set(pairs)) == 300                                        # without replacement
    assert not np.array_equal(score_samples(S, cv, n_neg=300, seed=8)["neg"], a["neg"])
    every = score_samples(S, cv, n_neg=10 ** 6)["neg"]                   # fewer negative pairs than n_neg: all of them
    assert len(every) == 40 * 24 and sorted(where[float(v)] for v in every) == [(i, j) for i in range(40) for j in range(25) if j != cv[i]]
    ids = np.arange(300 * 300).reshape(300, 300)                         # entry value = its flat index (exact in float32)
    big = score_samples(ids, np.arange(300), n_neg=20000, seed=1)["neg"].astype(np.int64)
    assert big.shape == (20000,) and len(np.unique(big)) == 20000 and (big // 300 != big % 300).all()
    assert score_samples(np.ones((3, 1)), [0, 0, 0])["neg"].shape == (0,)
    with pytest.raises(DiffRetError, match="one column in"):
        score_samples(S, cv[:5])


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    gen, simmod = Stage2Generator(D, num_steps=20), TokenWeightedSimilarity(D)
    text, video = random_gallery(40, D, n_frames=4, n_words=8, seed=1)
    S = gallery_similarity_fast(simmod, text, video) + 0.05 * torch.eye(40)
    return gen, text, video, S


def _gallery(text, video, S, cv):
    return Gallery([f"t{i}" for i in range(len(S))], text, video, S, np.asarray(cv), np.arange(S.shape[1]))


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi-caption"])
def test_rerank_metrics_arrays(setup, multi):
    gen, text, video, S = setup
    if multi:                                                            # 40 captions of 16 videos
        video = {k: v[:16] for k, v in video.items()}
        S = S[:, :16]
        cv = np.concatenate([np.arange(16), np.random.default_rng(3).integers(0, 16, 24)])
    else: cv = np.arange(40)
    g = _gallery(text, video, S, cv)
    dcfg = build_config(rerank_topk=6, diff_steps=20, diff_eval_steps=5, rerank_n_seeds=2, rerank_seed=4).diffusion
    plain, with_arrays = rerank_metrics(g, gen, dcfg), rerank_metrics(g, gen, dcfg, arrays=True)
    assert "arrays" not in plain
    assert {k: v for k, v in with_arrays.items() if k != "arrays"} == plain
    arr = with_arrays["arrays"]
    assert set(arr) == {"stage2_t2v_ranks", "stage2_v2t_ranks", "stage2_pos", "stage2_neg", "text_video"}
    first = plain["per_seed"][0]                                         # the arrays are the first seed's
    assert metrics_from_ranks(arr["stage2_t2v_ranks"], median_rule(cv)) == first["t2v"]
    assert metrics_from_ranks(arr["stage2_v2t_ranks"]) == first["v2t"]
    r = rerank(gen, S, text, video, topk=6, steps=5, seed=4)
    assert np.array_equal(arr["stage2_pos"], r["t2v"][np.arange(40), cv].numpy())
    one = gallery_arrays(g)                                              # stage 1: the same negative pairs
    assert np.array_equal(arr["text_video"], cv) and arr["text_video"].dtype == np.int32
    assert metrics_from_ranks(one["stage1_t2v_ranks"], median_rule(cv)) == gallery_metrics(g)["t2v"]
    assert metrics_from_ranks(one["stage1_v2t_ranks"]) == gallery_metrics(g)["v2t"]
    assert one["stage1_neg"].shape == arr["stage2_neg"].shape
    diff = arr["stage2_neg"] - one["stage1_neg"]                         # re-ranking only adds to the same pairs
    assert (diff >= -1e-6).all()


@pytest.mark.parametrize("kw", [dict(), dict(sampler="ddpm"), dict(eta=0.6), dict(direction="v2t"),
                                dict(direction="v2t", sampler="ddpm")],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "ddim")
def test_trace_last_step_is_reranks_x0(setup, kw):
    gen, text, video, S = setup
    d = kw.pop("direction", "t2v")
    qs = trace_queries(40, n=5, seed=2)
    common = dict(topk=8, steps=10, seed=3, **kw)
    tr = trace_rerank(gen, S, text, video, qs, direction=d, **common)
    assert np.array_equal(tr["queries"], qs)
    assert tr["candidates"].shape == (5, 8) and tr["timesteps"].shape == (10,) and tr["x0"].shape == (5, 10, 8)
    assert tr["x0"].dtype == np.float32 and (np.diff(tr["timesteps"]) < 0).all()
    base = S if d == "t2v" else S.t()
    assert np.array_equal(tr["candidates"], base.topk(8, 1).indices[qs].numpy())
    full = rerank(gen, S, text, video, alpha=0.8, temp=1.5, chunk=7, directions=(d,), **common)[d]
    mine = base[qs].scatter_add(1, torch.from_numpy(tr["candidates"]), 0.8 * torch.softmax(torch.from_numpy(tr["x0"][:, -1]) * 1.5, -1))
    torch.testing.assert_close(mine, full[qs], rtol=1e-5, atol=1e-5)
    other = trace_rerank(gen, S, text, video, qs, direction=d, **dict(common, seed=4))
    assert not np.allclose(other["x0"][:, 0], tr["x0"][:, 0])            # the seed matters


def test_trace_queries_and_bad_input(setup):
    gen, text, video, S = setup
    q = trace_queries(1000, n=4, seed=0)
    assert q.tolist() == sorted(set(q.tolist())) and len(q) == 4 and np.array_equal(q, trace_queries(1000, n=4, seed=0))
    assert not np.array_equal(q, trace_queries(1000, n=4, seed=1))
    assert trace_queries(3, n=4).tolist() == [0, 1, 2]
    with pytest.raises(DiffRetError, match=r"indices in \[0, 40\)"):
        trace_rerank(gen, S, text, video, [40], topk=8, steps=10)
    with pytest.raises(DiffRetError, match="direction must be"):
        trace_rerank(gen, S, text, video, [0], topk=8, steps=10, direction="both")


def test_eval_arrays_savez_roundtrip(setup, tmp_path):
    gen, text, video, S = setup
    g = _gallery(text, video, S, np.arange(40))
    dcfg = build_config(rerank_topk=6, diff_steps=20, diff_eval_steps=5).diffusion
    arrays = {**gallery_arrays(g), **rerank_metrics(g, gen, dcfg, arrays=True)["arrays"]}
    tr = trace_rerank(gen, S, text, video, trace_queries(40), topk=6, steps=5)
    arrays.update({f"trace_{k}": v for k, v in tr.items()})
    np.savez_compressed(tmp_path / "eval_arrays.npz", **arrays)
    with np.load(tmp_path / "eval_arrays.npz", allow_pickle=False) as z:
        assert set(z.files) == set(arrays)
        for k in arrays: assert np.array_equal(z[k], arrays[k]) and z[k].dtype == arrays[k].dtype
