"""The synthetic world's analogues of the papers' three evaluation protocols (diffusionret_nb.benchmarks):
`synthetic_multi` (MSVD/VATEX: several captions per test clip) and `synthetic_paragraph` (ActivityNet/DiDeMo:
one sentence per event joined into a paragraph) over the same rendered clips as `synthetic`; their
determinism, domains, galleries, training pairs, and an untrained and a trained tiny model evaluated on them."""
import math

import numpy as np
import pytest

from diffusionret_nb.benchmarks import (ADAPTERS, MULTI_CAPTIONS, SYNTHETIC_ADAPTERS, get_adapter, is_synthetic, load_records,
                                        paragraph, resolve_config)
from diffusionret_nb.config import build_config
from diffusionret_nb.datasets import FrameSource, VideoTextDataset, eval_texts, twin_groups
from diffusionret_nb.inference import encode_gallery, gallery_metrics
from diffusionret_nb.registry import create_model

WORLD = dict(syn_n_train=8, syn_n_val=4, syn_n_test=6, syn_size=32)
SPLITS = {"train": 8, "val": 4, "test": 6}


def cfg(dataset, **kw):
    return resolve_config(build_config(dataset=dataset, preset="tiny", device="cpu", n_frames=4, **{**WORLD, **kw}))


def recs(dataset, split, **kw):
    return load_records(cfg(dataset, **kw), split)


def two_event(r):
    "Whether a paragraph record describes two events."
    return len(r.meta["sentences"]) == 2


def test_registered_with_defaults():
    assert all(n in ADAPTERS and is_synthetic(n) for n in SYNTHETIC_ADAPTERS) and not is_synthetic("msvd")
    for name, protocol in (("synthetic", "single"), ("synthetic_multi", "multi"), ("synthetic_paragraph", "paragraph")):
        a = get_adapter(name)
        assert (a.protocol, a.n_words, a.n_frames, a.splits) == (protocol, 32, 8, ("train", "val", "test"))
        c = resolve_config(build_config(dataset=name))
        assert (c.data.n_words, c.data.n_frames) == (32, 8)


@pytest.mark.parametrize("split", ["val", "test"])
def test_multi_captions(split):
    single, multi = recs("synthetic", split), recs("synthetic_multi", split)
    assert len(multi) == SPLITS[split]
    assert [(r.video_id, r.path, r.meta["twin_id"]) for r in multi] == [(r.video_id, r.path, r.meta["twin_id"]) for r in single]
    for s, m in zip(single, multi):
        assert len(m.captions) == MULTI_CAPTIONS == len(set(m.captions)) and m.captions[0] == s.captions[0]
    caps = [c for r in multi for c in r.captions]
    assert len(set(caps)) == len(caps) == SPLITS[split] * MULTI_CAPTIONS
    assert [r.captions for r in recs("synthetic_multi", split)] == [r.captions for r in multi]        # deterministic
    texts, vid = eval_texts(multi, get_adapter("synthetic_multi").protocol)
    assert len(texts) == len(multi) * MULTI_CAPTIONS and texts == caps
    assert all(texts[q] in multi[v].captions for q, v in enumerate(vid))
    assert list(np.bincount(vid)) == [MULTI_CAPTIONS] * len(multi)


def test_multi_val_and_test_disjoint_and_train_as_single():
    caps = [c for s in ("val", "test") for r in recs("synthetic_multi", s) for c in r.captions]
    assert len(set(caps)) == len(caps)
    assert [(r.video_id, r.captions) for r in recs("synthetic_multi", "train")] == \
           [(r.video_id, r.captions) for r in recs("synthetic", "train")]


def test_views_follow_the_domains():
    "Out-domain transfer: the test split comes from the other domain, with the same clips and the same queries."
    for name in SYNTHETIC_ADAPTERS:
        plain, tex = recs(name, "test"), recs(name, "test", syn_test_domain="textured")
        assert [r.captions for r in tex] == [r.captions for r in plain]
        assert all("-textured-" in r.path and "-plain-" in p.path for r, p in zip(tex, plain))
        assert all("-plain-" in r.path for r in recs(name, "val", syn_test_domain="textured"))
    single = recs("synthetic", "test", syn_test_domain="textured")
    para = recs("synthetic_paragraph", "test", syn_test_domain="textured")
    assert [(r.video_id, r.path) for r in para] == [(r.video_id, r.path) for r in single]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_paragraphs(split):
    single, para = recs("synthetic", split), recs("synthetic_paragraph", split)
    assert [(r.video_id, r.path, r.meta["twin_id"]) for r in para] == [(r.video_id, r.path, r.meta["twin_id"]) for r in single]
    for s, p in zip(single, para):
        sents = p.meta["sentences"]
        assert p.captions == [paragraph(sents)] and 1 <= len(sents) <= 2
        assert all(x[0].isupper() and x.endswith(".") and x.count(".") == 1 for x in sents)
        assert p.captions[0] != s.captions[0]
        if len(sents) == 2:
            assert p.captions[0].count(". ") == 1 and sents[1].split()[0] in ("Next,", "Afterwards,", "Later,")
            assert sents[1].split()[0].rstrip(",").lower() not in s.captions[0].split()         # wording no caption uses
    assert any(two_event(p) for p in para)
    assert [r.captions for r in recs("synthetic_paragraph", split)] == [r.captions for r in para]     # deterministic
    if split != "train": assert len({r.captions[0] for r in para}) == len(para)
    texts, vid = eval_texts(para, get_adapter("synthetic_paragraph").protocol)
    assert texts == [r.captions[0] for r in para] and list(vid) == list(range(len(para)))


def test_training_pairs():
    "Paragraph training pairs each clip with its paragraph (like ActivityNet); twin batches still pair twins."
    c = cfg("synthetic_paragraph")
    ds = VideoTextDataset(recs("synthetic_paragraph", "train"), FrameSource.from_config(c, train=True), c.data.n_words)
    assert len(ds) == SPLITS["train"] and any(len(g) == 2 for g in twin_groups(ds))
    ds = VideoTextDataset(recs("synthetic_multi", "train"), FrameSource.from_config(c, train=True), c.data.n_words)
    assert len(ds) == 4 * SPLITS["train"]


@pytest.fixture(scope="module")
def untrained(one_thread):
    import torch
    torch.manual_seed(0)
    return create_model(cfg("synthetic")).eval()


@pytest.mark.parametrize("name,per_clip", [("synthetic", 1), ("synthetic_multi", MULTI_CAPTIONS), ("synthetic_paragraph", 1)])
def test_untrained_model_evaluates(untrained, name, per_clip):
    c, a = cfg(name), get_adapter(name)
    r = load_records(c, "test")
    g = encode_gallery(untrained, r, FrameSource.from_config(c), c.data.n_words, a.protocol)
    m = gallery_metrics(g)
    assert m["n_queries"] == SPLITS["test"] * per_clip and m["n_candidates"] == SPLITS["test"]
    assert all(math.isfinite(v) for d in ("t2v", "v2t") for v in m[d].values())
    tw = a.diagnostics(g, r)
    assert tw["n_twin_pairs"] == SPLITS["test"] // 2 and 0 <= tw["twin_t2v"] <= 100 and 0 <= tw["twin_v2t"] <= 100


def test_train_on_single_evaluate_on_paragraph_and_multi(tmp_path, one_thread):
    "A protocol shift (the MSRVTT -> ActivityNet analogue): a run trained on `synthetic`, its checkpoint evaluated on the other views."
    from diffusionret_nb import pipeline
    params = dict(dataset="synthetic", preset="tiny", device="cpu", n_frames=4, batch_size=4, epochs=1, max_steps=2, stage2=False,
                  eval_untrained=False, **WORLD)
    m = pipeline.train_eval(build_config(**params), tmp_path / "run", progress=False)
    assert m["n_queries"] == SPLITS["test"]
    for name, n in (("synthetic_paragraph", SPLITS["test"]), ("synthetic_multi", SPLITS["test"] * MULTI_CAPTIONS)):
        e = pipeline.evaluate_checkpoint(tmp_path / "run", tmp_path / name, {"dataset": name, "syn_test_domain": "textured"},
                                         progress=False)
        assert e["n_queries"] == n and e["n_candidates"] == SPLITS["test"] and e["n_twin_pairs"] == SPLITS["test"] // 2
        assert all(math.isfinite(v) for d in ("t2v", "v2t") for v in e[d].values())
