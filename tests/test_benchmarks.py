"""The benchmark adapters on the real annotation files in ../shared/data: the counts of its README
(and of data_cards/), paragraphs built as SPEC §3 says, integer ids, and the data cards' presence."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, shared_data
from diffusionret_nb.benchmarks import CARDS
from diffusionret_nb.config import build_config
from diffusionret_nb.benchmarks import ADAPTERS, load_records, resolve_config
from diffusionret_nb.datasets import eval_texts


def recs(dataset, root, split, **kw):
    return load_records(build_config(dataset=dataset, data_root=str(root), **kw), split)


def card_counts(name, variant=None):
    c = CARDS[name].counts
    return c[variant] if variant else next(iter(c.values()))


def test_every_adapter_has_a_card_and_a_data_card_file():
    for name in ADAPTERS:
        assert (ROOT / "data_cards" / f"{name}.md").is_file(), name
        if name != "synthetic": assert name in CARDS, name


def test_protocols_and_defaults():
    want = {"msrvtt": ("single", 32, 12), "msvd": ("multi", 32, 12), "lsmdc": ("single", 32, 12),
            "activitynet": ("paragraph", 64, 64), "didemo": ("paragraph", 64, 64), "vatex": ("multi", 32, 12),
            "charades": ("single", 32, 12), "flickr8k": ("multi", 32, 1), "frames_folder": ("multi", 32, 1)}
    for name, (p, w, f) in want.items():
        a = ADAPTERS[name]
        assert (a.protocol, a.n_words, a.n_frames) == (p, w, f), name
        cfg = resolve_config(build_config(dataset=name))
        assert (cfg.data.n_words, cfg.data.n_frames) == (w, f)


def test_msrvtt_1ka_test():
    r = recs("msrvtt", shared_data("msrvtt"), "test")
    assert len(r) == 1000 == len({x.video_id for x in r}) == card_counts("msrvtt")["test"]
    assert all(len(x.captions) == 1 for x in r)
    assert r[0].video_id == 9770 and r[0].captions == ["a person is connecting something to system"]
    texts, vid = eval_texts(r, ADAPTERS["msrvtt"].protocol)
    assert len(texts) == 1000 and (vid == np.arange(1000)).all()


@pytest.mark.parametrize("lst,n", [("9k", 9000), ("7k", 7010)])
def test_msrvtt_training_lists(tmp_path, lst, n):
    "The real lists with a generated caption file (the real MSRVTT_data.json is not in ../shared/data)."
    src = shared_data("msrvtt", f"MSRVTT_train.{lst}.csv")
    os.symlink(src, tmp_path / src.name)
    ids = [row["video_id"] for row in csv.DictReader(open(src))]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"sentences": [{"video_id": v, "caption": f"{v} {k}", "sen_id": 0}
                                                                        for v in ids for k in range(2)]}))
    r = recs("msrvtt", tmp_path, "train", train_list=lst)
    assert len(r) == n == card_counts("msrvtt", f"1k-A, {lst} training list")["train"]
    assert all(len(x.captions) == 2 for x in r) and len({x.video_id for x in r}) == n


def test_msvd_counts():
    root = shared_data("msvd")
    caps = json.loads((root / "captions_msvd.json").read_text())
    assert len(caps) == 1970 and sum(map(len, caps.values())) == 80827
    got = {s: recs("msvd", root, s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in got.items()} == {"train": 1200, "val": 100, "test": 670} == card_counts("msvd")
    assert sum(len(x.captions) for r in got.values() for x in r) == 80827
    texts, vid = eval_texts(got["test"], "multi")
    assert len(texts) == 27763 and vid.max() == 669
    ids = [x.video_id for r in got.values() for x in r]
    assert len(set(ids)) == 1970                                   # unique across the dataset
    assert [x.video_id for x in recs("msvd", root, "test")] == [x.video_id for x in got["test"]]   # stable


def test_didemo_paragraphs():
    root = shared_data("didemo")
    for split, n_ann, n_names, n_videos in (("test", 4021, 1037, 1004), ("val", 4180, 1094, 1065)):
        anns = json.loads((root / f"{split}_data.json").read_text())
        assert len(anns) == n_ann and len({a["video"] for a in anns}) == n_names
        r = recs("didemo", root, split)
        assert len(r) == n_videos == card_counts("didemo")[split] == len((root / f"{split}_list.txt").read_text().split())
        assert all((x.start, x.end) == (0.0, 31.0) and len(x.captions) == 1 for x in r)
        # the paragraph of the first video: its descriptions in file order, under either extension
        stem = anns[0]["video"].rsplit(".", 1)[0]
        descs = [a["description"].strip() for a in anns if a["video"].rsplit(".", 1)[0] == stem]
        assert r[0].captions[0] == " ".join(descs)
    merged = [x for x in recs("didemo", root, "test") if "39457011@N00_5403825464_79c0f43b72" in x.path]
    assert len(merged) == 1 and "dog first rolls onto its side" in merged[0].captions[0] and "plays with the hand" in merged[0].captions[0]


def test_activitynet_paragraphs():
    root = shared_data("activitynet")
    for split, file, n_vid, n_sent in (("train", "train.json", 10009, 37421), ("test", "val_1.json", 4917, 17505)):
        d = json.loads((root / file).read_text())
        assert len(d) == n_vid and sum(len(v["sentences"]) for v in d.values()) == n_sent
        r = recs("activitynet", root, split)
        assert len(r) == n_vid == card_counts("activitynet")[split]
        k = next(iter(d))
        assert r[0].captions == [" ".join(s.strip() for s in d[k]["sentences"])] and "  " not in r[0].captions[0]
        assert r[0].start is None and r[0].end is None
    texts, _ = eval_texts(recs("activitynet", root, "test"), "paragraph")
    assert texts[0].startswith("A weight lifting tutorial is given. The coach helps")


def test_charades_split_and_queries():
    root = shared_data("charades")
    tr, te = recs("charades", root, "train"), recs("charades", root, "test")
    assert (len(tr), len(te)) == (7985, 1863) == tuple(card_counts("charades").values())
    rows = list(csv.DictReader(open(root / "Charades_v1_test.csv")))
    assert te[0].captions[0] == rows[0]["script"].strip()
    assert eval_texts(te, "single")[0][:1] == [rows[0]["script"].strip()]
    assert sum(len(x.captions) for x in tr) == 19578


def test_flickr8k_subset_counts():
    root = shared_data("flickr8k-mini")
    got = {s: recs("flickr8k", root, s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in got.items()} == {"train": 753, "val": 113, "test": 125} \
        == card_counts("flickr8k", "flickr8k-mini (first 1000 images)")
    assert all(len(x.captions) == 5 and Path(x.path).is_file() for r in got.values() for x in r)


def test_val_split_missing_is_explained(tmp_path):
    with pytest.raises(Exception, match="val_split=''"):
        recs("msrvtt", shared_data("msrvtt"), "val")
