"""QB-Norm (dynamic inverted softmax) and dual softmax on hand-built similarity matrices whose answer
is known, and their application to an encoded gallery through the config."""
import numpy as np
import pytest
import torch

from diffusionret_nb.core import ConfigError, DataError
from diffusionret_nb.config import build_config
from diffusionret_nb.benchmarks import resolve_config
from diffusionret_nb.datasets import FrameSource, VideoRecord
from diffusionret_nb.inference import encode_gallery
from diffusionret_nb.metrics import multi_caption_metrics
from diffusionret_nb.registry import create_model as build_model
from diffusionret_nb.postprocess import (apply_postprocess, dual_softmax, inverted_softmax,
                                         postprocess_gallery, postprocess_sims, qb_norm, query_bank)
from diffusionret_nb.video import write_video


def hub_matrix(n=6, hub=0, margin=0.05):
    "n texts × n videos: text i's true video is i, but video `hub` beats it by `margin` for every other text."
    s = np.full((n, n), 0.1) + 0.5 * np.eye(n)
    s[:, hub] = 0.6 + margin
    s[hub, hub] = 0.9
    return torch.tensor(s, dtype=torch.float64)


def test_qbnorm_removes_a_hub():
    S = hub_matrix()
    assert (S.argmax(1) == 0).all()                                  # raw: the hub wins every row
    bank = hub_matrix()[1:] * 0.95                                   # bank queries also all retrieve the hub
    q = qb_norm(S, bank, beta=20)
    assert q.argmax(1).tolist() == list(range(6))
    assert multi_caption_metrics(q, np.arange(6))["t2v"]["R@1"] == 100.0


def test_qbnorm_leaves_rows_outside_the_activation_set():
    S = torch.eye(4, dtype=torch.float64)
    bank = torch.tensor([[0.9, 0.1, 0.0, 0.0]], dtype=torch.float64)  # activates video 0 only
    q = qb_norm(S, bank, beta=5)
    assert torch.equal(q[1:], S[1:])
    assert torch.allclose(q[0], 5 * S[0] - torch.logsumexp(5 * bank, 0))


def test_inverted_softmax_is_a_per_column_shift():
    "Within a row, IS ranks by sim minus a column term: with a constant bank, the ranking is the raw one."
    S = torch.randn(5, 7, dtype=torch.float64)
    bank = torch.full((3, 7), 0.2, dtype=torch.float64)
    assert torch.equal(inverted_softmax(S, bank).argsort(1), S.argsort(1))


def test_dual_softmax_known_values():
    S = torch.tensor([[0.9, 0.1], [0.6, 0.5]], dtype=torch.float64)
    d = dual_softmax(S, temp=100)
    e = torch.softmax(100 * S, dim=0)
    assert torch.allclose(d, S * e)
    assert d.argmax(1).tolist() == [0, 1] and S.argmax(1).tolist() == [0, 0]
    t2v, v2t, note = postprocess_sims(S, "dsl")
    assert torch.allclose(v2t, S * torch.softmax(100 * S, dim=1)) and note == "dsl (temp 100)"


def test_dual_softmax_permutation_equivariant():
    S = torch.randn(6, 4, dtype=torch.float64)
    p = torch.randperm(6)
    assert torch.allclose(dual_softmax(S)[p], dual_softmax(S[p]))


def test_modes_and_errors():
    S = hub_matrix()
    t, v, note = postprocess_sims(S, "none")
    assert torch.equal(t, S) and torch.equal(v, S) and note == "none"
    with pytest.raises(ConfigError, match="needs a query bank"): postprocess_sims(S, "qbnorm")
    with pytest.raises(ConfigError, match="must be one of"): postprocess_sims(S, "bogus")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp")
    rng = np.random.default_rng(0)
    recs = [VideoRecord(i, str(write_video(d / f"v{i}.mp4", (rng.random((4, 32, 32, 3)) * 255).astype(np.uint8), fps=1)),
                        [f"clip {i}", f"video number {i}"], "test") for i in range(3)]
    cfg = resolve_config(build_config(preset="tiny", n_frames=4, n_words=8))
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, encode_gallery(model, recs, FrameSource(4, 48), 8, "multi"), recs


@pytest.mark.parametrize("mode", ["none", "dsl", "qbnorm"])
def test_apply_postprocess_on_a_gallery(gallery, mode):
    cfg, model, g, recs = gallery
    cfg.eval.postprocess, cfg.eval.qb_v2t = mode, True
    # training videos: the gallery's files (readable) and one that is missing
    train = [VideoRecord(i, recs[i % 3].path if i < 4 else "x.mp4", [f"a training caption {i}", f"another one {i}"], "train")
             for i in range(5)]
    m = apply_postprocess(g, cfg, model, train, frames=FrameSource(4, 48))
    assert m["n_queries"] == 6 and m["n_candidates"] == 3
    assert m["postprocess"].startswith(mode)
    if mode != "none": assert set(m["raw"]) == {"t2v", "v2t"}
    if mode == "qbnorm":
        assert "text bank 10, video bank 4; 1 unreadable" in m["postprocess"], m["postprocess"]


def test_qbnorm_v2t_uses_a_video_bank_unless_switched_off(gallery):
    cfg, model, g, recs = gallery
    cfg.eval.postprocess = "qbnorm"
    train = [VideoRecord(i, recs[0].path, [f"training caption {i}"], "train") for i in range(3)]   # every bank video is video 0
    cfg.eval.qb_v2t = True
    t2v, v2t, note = postprocess_gallery(g, cfg, model, train, frames=FrameSource(4, 48))
    assert "video bank 3)" in note
    # closed form: the bank is video 0 three times, so the activation set is video 0's raw best text, and a video whose
    # raw best text it is gets 20·(s[:, j] − s[:, 0]) − log 3 (video 0 itself: −log 3 for every text); the others stay raw
    S, hub = g.sim.double(), int(g.sim[:, 0].argmax())
    for j in range(S.shape[1]):
        want = 20 * (S[:, j] - S[:, 0]) - np.log(3) if int(S[:, j].argmax()) == hub else S[:, j]
        torch.testing.assert_close(v2t[:, j], want, atol=1e-4, rtol=0)
    cfg.eval.qb_v2t = False
    t2, v2, note2 = postprocess_gallery(g, cfg, model, train, frames=FrameSource(4, 48))
    assert note2.endswith("V2T raw: no video bank)") and torch.equal(v2, S) and torch.equal(t2, t2v)
    cfg.eval.qb_v2t = True
    with pytest.raises(DataError, match="none of its 1 training videos could be read"):
        postprocess_gallery(g, cfg, model, [VideoRecord(0, "missing.mp4", ["x"], "train")], frames=FrameSource(4, 48))


def test_query_bank_size_and_seed():
    recs = [VideoRecord(i, "x.mp4", [f"c{i}a", f"c{i}b"], "train") for i in range(50)]
    assert len(query_bank(recs)) == 100
    b = query_bank(recs, size=10, seed=3)
    assert len(b) == 10 and b == query_bank(recs, size=10, seed=3) and b != query_bank(recs, size=10, seed=4)
