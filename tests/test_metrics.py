"""Median rank as the reference computes it: np.median(ranks) + 1 (a half rank) for one caption per video,
torch.median (the lower middle value) for the text-to-video direction of the multi-caption protocol."""
import numpy as np
import pytest
import torch

from diffusionret_nb.core import DiffRetError
from diffusionret_nb.metrics import (both_directions, median_rank, metrics_from_ranks, multi_caption_metrics, multi_caption_sim_v2t,
                                     positive_ranks)


def test_one_caption_median_is_numpy_median_plus_one():
    sim = np.random.default_rng(1).normal(size=(50, 50)) + 0.5 * np.eye(50)
    r = np.sort(positive_ranks(sim))
    assert r[24] != r[25] and (r[24] + r[25]) % 2 == 1, "the example needs middle ranks of different parity"
    m = both_directions(sim)
    assert m["t2v"]["MdR"] == float(np.median(positive_ranks(sim)) + 1)
    assert m["v2t"]["MdR"] == float(np.median(positive_ranks(sim.T)) + 1)
    assert m["t2v"]["MdR"] % 1 == 0.5                              # a half rank, as the reference reports it


def test_half_rank_example():
    assert metrics_from_ranks([3, 94, 95, 200])["MdR"] == 95.5    # the floor would give 95.0
    assert median_rank([3, 94, 95, 200]) == 95.5


def _with_ranks(caption_video, ranks, n_vid) -> np.ndarray:
    "A captions × videos similarity in which caption i's video has 0-based rank ranks[i]."
    sim = np.zeros((len(ranks), n_vid))
    for i, (v, r) in enumerate(zip(caption_video, ranks)):
        sim[i, [j for j in range(n_vid) if j != v][:r]] = 1.0     # r other videos score above the positive
        sim[i, v] = 0.5
    return sim


def test_multi_caption_t2v_uses_the_lower_median_like_torch():
    cv = np.repeat(np.arange(10), 2)                             # 20 captions, 2 per video
    ranks = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 5, 5, 8, 8, 9, 9, 9, 9, 9, 9]   # middle ranks 2 and 5
    sim = _with_ranks(cv, ranks, 10)
    assert list(positive_ranks(sim, cv)) == ranks
    m = multi_caption_metrics(sim, cv)
    assert m["t2v"]["MdR"] == float(torch.median(torch.tensor(ranks) + 1)) == 3.0   # the reference's torch.median
    assert np.median(ranks) + 1 == 4.5 and np.floor(np.median(ranks)) + 1 == 4.0     # neither the midpoint nor the floor
    # V2T of the multi-caption protocol goes through the one-caption metric (np.median) of the video × video matrix
    assert m["v2t"]["MdR"] == float(np.median(positive_ranks(multi_caption_sim_v2t(sim, cv))) + 1)


def test_one_caption_per_video_through_the_multi_path_is_the_plain_protocol():
    r = np.random.default_rng(1).normal(size=(40, 40))
    assert multi_caption_metrics(r, np.arange(40)) == both_directions(r)
    assert multi_caption_metrics(r, np.arange(40), multi_sentence=True)["t2v"]["MdR"] == median_rank(positive_ranks(r), "lower")


def test_bad_median():
    with pytest.raises(DiffRetError, match="median must be one of"):
        median_rank([1, 2], "upper")
    with pytest.raises(DiffRetError, match="no queries"):
        median_rank([])
