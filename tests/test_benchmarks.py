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
from diffusionret_nb.benchmarks import ADAPTERS, is_synthetic, load_records, resolve_config
from diffusionret_nb.datasets import eval_texts


def recs(dataset, root, split, **kw):
    return load_records(build_config(dataset=dataset, data_root=str(root), **kw), split)


def card_counts(name, variant=None):
    c = CARDS[name].counts
    return c[variant] if variant else next(iter(c.values()))


def test_every_adapter_has_a_card_and_a_data_card_file():
    for name in ADAPTERS:
        assert (ROOT / "data_cards" / f"{name}.md").is_file(), name
        if not is_synthetic(name): assert name in CARDS, name


def test_protocols_and_defaults():
    want = {"msrvtt": ("single", 32, 12), "msvd": ("multi", 32, 12), "lsmdc": ("single", 32, 12),
            "activitynet": ("paragraph", 64, 64), "didemo": ("paragraph", 64, 64), "vatex": ("multi", 32, 12),
            "charades": ("single", 32, 12), "flickr8k": ("multi", 32, 1), "frames_folder": ("multi", 32, 1),
            "synthetic": ("single", 32, 8), "synthetic_multi": ("multi", 32, 8), "synthetic_paragraph": ("paragraph", 32, 8)}
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


# --- every malformed annotation file is a named DataError (issue 8) ---------------------------------

from diffusionret_nb.core import DataError  # noqa: E402

NONUTF8 = b"id\xff\xfe,x\n"
_MSR_TEST = "key,vid_key,video_id,sentence\nret0,msr7,video7,a cat\n"


def _msrvtt_train(data, lst="video_id\nvideo0\n"):
    return {"MSRVTT_train.9k.csv": lst, "MSRVTT_data.json": data}


BAD_FILES = {   # case: (dataset, split, {file: content}, fragments the DataError must hold)
    "msrvtt: other caption field": ("msrvtt", "train", _msrvtt_train({"sentences": [{"video_id": "video0", "text": "a", "sen_id": 0}]}),
                                    ["MSRVTT_data.json", "sentences[0] has no field 'caption'", "(fields: video_id, text, sen_id)",
                                     "expected video_id, caption"]),
    "msrvtt: json is a list": ("msrvtt", "train", _msrvtt_train([{"video_id": "video0", "caption": "a"}]),
                               ["MSRVTT_data.json", "should be an object", "got a list"]),
    "msrvtt: caption a number": ("msrvtt", "train", _msrvtt_train({"sentences": [{"video_id": "video0", "caption": "a"},
                                                                                 {"video_id": "video0", "caption": 5}]}),
                                 ["MSRVTT_data.json", "sentences[1].caption should be a string, got a number (5)"]),
    "msrvtt: invalid json": ("msrvtt", "train", _msrvtt_train("{\"sentences\": ["), ["MSRVTT_data.json is not valid JSON"]),
    "msrvtt: csv without header": ("msrvtt", "test", {"MSRVTT_JSFUSION_test.csv": "ret0,msr7,video7,a cat\n"},
                                   ["MSRVTT_JSFUSION_test.csv", "header", "video_id", "sentence"]),
    "msrvtt: short csv row": ("msrvtt", "test", {"MSRVTT_JSFUSION_test.csv": _MSR_TEST + "ret1,msr9,video9\n"},
                              ["MSRVTT_JSFUSION_test.csv, line 3", "3 fields", "header has 4"]),
    "msrvtt: bad video id": ("msrvtt", "test", {"MSRVTT_JSFUSION_test.csv": _MSR_TEST + "ret1,msr9,vid9,a dog\n"},
                             ["MSRVTT_JSFUSION_test.csv", "row 2", "'vid9'", "video1234"]),
    "msvd: caption strings": ("msvd", "test", {"captions_msvd.json": {"vidA_1_5": "a man sings"}, "test_list.txt": "vidA_1_5\n"},
                              ["captions_msvd.json", "video 'vidA_1_5' should be a list of strings, got a string ('a man sings')"]),
    "msvd: caption a number": ("msvd", "test", {"captions_msvd.json": {"vidA_1_5": ["ok", 3]}, "test_list.txt": "vidA_1_5\n"},
                               ["captions_msvd.json", "video 'vidA_1_5'[1] should be a string"]),
    "msvd: json is a list": ("msvd", "test", {"captions_msvd.json": [["a"]], "test_list.txt": "x\n"},
                             ["captions_msvd.json", "should be an object", "got a list"]),
    "lsmdc: not utf-8": ("lsmdc", "test", {"LSMDC16_challenge_1000_publictect.csv": NONUTF8},
                         ["LSMDC16_challenge_1000_publictect.csv is not UTF-8 text"]),
    "activitynet: no timestamps": ("activitynet", "test", {"val_1.json": {"v_x": {"duration": 1.0, "sentences": ["a"]}}},
                                   ["val_1.json", "video 'v_x' has no field 'timestamps'", "expected duration, timestamps, sentences"]),
    "activitynet: duration a string": ("activitynet", "test", {"val_1.json": {"v_x": {"duration": "9 s", "timestamps": [[0, 1]], "sentences": ["a"]}}},
                                       ["val_1.json", "video 'v_x'.duration should be a number, got a string"]),
    "activitynet: sentence a number": ("activitynet", "test", {"val_1.json": {"v_x": {"duration": 2.0, "timestamps": [[0, 1], [1, 2]], "sentences": ["a", 3]}}},
                                       ["val_1.json", "video 'v_x'.sentences[1] should be a string"]),
    "activitynet: timestamps do not pair": ("activitynet", "test", {"val_1.json": {"v_x": {"duration": 2.0, "timestamps": [[0, 1]], "sentences": ["a", "b"]}}},
                                            ["val_1.json", "video 'v_x'", "2 sentences", "1 timestamps"]),
    "activitynet: json is a list": ("activitynet", "test", {"val_1.json": [{"duration": 1.0}]}, ["val_1.json", "should be an object", "got a list"]),
    "didemo: no times": ("didemo", "test", {"test_data.json": [{"video": "a.mov", "description": "x"}]},
                         ["test_data.json", "[0] has no field 'times'", "expected video, description, times"]),
    "didemo: json is an object": ("didemo", "test", {"test_data.json": {"video": "a.mov", "description": "x", "times": []}},
                                  ["test_data.json", "should be a list", "got an object"]),
    "didemo: description a list": ("didemo", "test", {"test_data.json": [{"video": "a.mov", "description": ["x"], "times": []}]},
                                   ["test_data.json", "[0].description should be a string, got a list"]),
    "vatex: no videoID": ("vatex", "test", {"vatex_data.json": [{"enCap": ["a"]}], "test_list.txt": "x\n"},
                          ["vatex_data.json", "[0] has no field 'videoID'"]),
    "vatex: enCap a string": ("vatex", "test", {"vatex_data.json": {"x": {"enCap": "a dog"}}, "test_list.txt": "x\n"},
                              ["vatex_data.json", "video 'x'.enCap should be a list of strings, got a string"]),
    "vatex: videoID twice": ("vatex", "test", {"vatex_data.json": [{"videoID": "x", "enCap": ["a"]}, {"videoID": "x", "enCap": ["b"]}],
                                               "test_list.txt": "x\n"}, ["vatex_data.json", "'x'", "more than once"]),
    "charades: missing column": ("charades", "test", {"Charades_v1_test.csv": "id,script\nAB12C,A person cooks.\n"},
                                 ["Charades_v1_test.csv", "descriptions"]),
    "charades: short row": ("charades", "test", {"Charades_v1_test.csv": "id,script,descriptions\nAB12C,A person cooks.\n"},
                            ["Charades_v1_test.csv, line 2", "2 fields"]),
    "frames_folder: unquoted comma": ("frames_folder", "test", {"captions.csv": "image,caption\na.jpg,a cat, asleep\n", "test.txt": "a.jpg\n"},
                                      ["captions.csv, line 2", "3 fields", "quoted"]),
    "frames_folder: other columns": ("frames_folder", "test", {"captions.csv": "img,text\na.jpg,a cat\n", "test.txt": "a.jpg\n"},
                                     ["captions.csv", "image", "caption"]),
    "flickr8k: not utf-8": ("flickr8k", "test", {"captions.txt": NONUTF8, "Flickr_8k.testImages.txt": "a.jpg\n"},
                            ["captions.txt is not UTF-8 text"]),
    "synthetic: clip without captions": ("synthetic", "test", {"annotations.json": {"clips": [{"video_id": 0, "video": "v.mp4", "split": "test"}]}},
                                         ["annotations.json", "clips[0] has no field 'captions'"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_annotations_are_named_errors(tmp_path, case):
    dataset, split, files, fragments = BAD_FILES[case]
    for name, content in files.items():
        p = tmp_path / name
        if isinstance(content, bytes): p.write_bytes(content)
        else: p.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as e:
        recs(dataset, tmp_path, split, **({"val_split": ""} if dataset == "msrvtt" else {}))
    for f in fragments: assert f in str(e.value), (case, str(e.value))


def test_msvd_captions_are_never_split_into_characters(tmp_path):
    (tmp_path / "captions_msvd.json").write_text(json.dumps({"a_1_2": ["a dog runs"], "b_1_2": "a cat"}))
    (tmp_path / "test_list.txt").write_text("a_1_2\nb_1_2\n")
    with pytest.raises(DataError, match="video 'b_1_2' should be a list of strings"):
        recs("msvd", tmp_path, "test")


class _Exploit:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_msvd_pickle_is_read_with_a_restricted_unpickler(tmp_path):
    import pickle
    (tmp_path / "test_list.txt").write_text("vid_1_2\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"vid_1_2": [["a", "man", "sings"], ("someone", "sings")]}))
    assert recs("msvd", tmp_path, "test")[0].captions == ["a man sings", "someone sings"]
    marker = tmp_path / "pwned"
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"vid_1_2": [["a"]], "x": _Exploit(marker)}))
    with pytest.raises(DataError, match=r"raw-captions.pkl.*(posix|nt)\.system"):
        recs("msvd", tmp_path, "test")
    assert not marker.exists()                                     # refused without running it
    (tmp_path / "raw-captions.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DataError, match="raw-captions.pkl is not a readable pickle"):
        recs("msvd", tmp_path, "test")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"vid_1_2": "a man sings"}))
    with pytest.raises(DataError, match="video 'vid_1_2' should be a list"):
        recs("msvd", tmp_path, "test")


def test_real_annotation_files_pass_the_schema_checks():
    "The checks accept every real file in ../shared/data (the counts tests above read them all)."
    assert len(recs("activitynet", shared_data("activitynet"), "test")) == 4917
    assert len(recs("didemo", shared_data("didemo"), "val")) == 1065


def test_cards_count_captions_where_known():
    assert CARDS["msvd"].captions["official"] == {"train": 48774, "val": 4290, "test": 27763}
    assert CARDS["charades"].captions["official v1"] == {"train": 19578, "test": 6400}
