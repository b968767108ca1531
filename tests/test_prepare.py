"""Preparation, frame cache and verification end to end on the 4 real MSR-VTT test clips in
../shared/data: an MSRVTT folder made in tmp_path (symlinks, the real 1k-A csv restricted to those
clips) goes through the adapter, `prepare` (PyAV when there is no ffmpeg), the frame cache and the
evaluation of a randomly initialised tiny model; `verify` on the unrestricted csv lists the 996
missing videos."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data
from diffusionret_nb.config import build_config
from diffusionret_nb.benchmarks import get_adapter, load_records, resolve_config
from diffusionret_nb.datasets import FrameSource
from diffusionret_nb.inference import encode_gallery, gallery_metrics
from diffusionret_nb.registry import create_model as build_model
from diffusionret_nb.prepare import (decode_throughput, prepare, prepare_main, reencoded_path, verify, verify_main,
                                     write_cache_index)
from diffusionret_nb.video import VideoReadError, video_info


def msrvtt_root(root: Path, restrict: bool) -> Path:
    src = shared_data("msrvtt")
    (root / "videos").mkdir(parents=True)
    clips = sorted((src / "videos").glob("*.mp4"))
    for v in clips: os.symlink(v, root / "videos" / v.name)
    lines = (src / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()
    keep = {v.stem for v in clips}
    rows = [l for l in lines[1:] if not restrict or l.split(",")[2] in keep]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join([lines[0]] + rows) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = msrvtt_root(tmp_path_factory.mktemp("msrvtt"), restrict=True)
    summary = prepare("msrvtt", root, dict(preset="tiny"), splits=["test"], workers=2, progress=False)
    return root, summary


def test_prepare_reencodes_and_caches(prepared):
    root, s = prepared
    assert s["records"] == 4
    assert (s["reencode"]["reencoded"], s["reencode"]["failed"], s["reencode"]["missing"]) == (4, {}, [])
    for v in (root / "videos").iterdir():
        info = video_info(reencoded_path(v, root, root / "reencoded"))
        assert info.fps == 3.0 and min(info.height, info.width) == 224
        assert abs(info.duration - video_info(v).duration) <= 0.5
    c = s["cache"]
    assert (c["cached"], c["failed"], c["records"]) == (4, {}, 4)
    assert Path(c["folder"]).name == "s48-t12-reference-1fps" and (Path(c["folder"]) / "index.json").is_file()
    assert not [p for p in root.rglob(".*") if p.is_file()]                 # no temporary file left anywhere


def test_prepare_resumes(prepared):
    root, _ = prepared
    s = prepare("msrvtt", root, dict(preset="tiny"), splits=["test"], workers=1, progress=False)
    assert (s["reencode"]["reencoded"], s["reencode"]["already_done"]) == (0, 4)
    assert (s["cache"]["cached"], s["cache"]["already_cached"]) == (0, 4)


def test_interrupted_shard_is_ignored(prepared, tmp_path):
    "A shard .npy without its .json (an interrupted write) is not part of the index."
    root, s = prepared
    folder = Path(s["cache"]["folder"])
    spec = json.loads((folder / "index.json").read_text())["spec"]
    np.save(folder / "shard_00099.npy", np.zeros((1, 48, 48, 3), np.uint8))
    try:
        idx = write_cache_index(folder, spec)
        assert "shard_00099.npy" not in idx["shards"] and len(idx["entries"]) == 4
    finally:
        (folder / "shard_00099.npy").unlink()


def test_evaluation_end_to_end_from_the_cache(prepared):
    root, _ = prepared
    cfg = resolve_config(build_config(dataset="msrvtt", data_root=str(root), preset="tiny", frame_cache="disk", device="cpu"))
    records = load_records(cfg, "test")
    assert sorted(r.video_id for r in records) == [7020, 7021, 7024, 7025]        # in csv order
    src = FrameSource.from_config(cfg)
    torch.manual_seed(0)
    g = encode_gallery(build_model(cfg), records, src, cfg.data.n_words, get_adapter("msrvtt").protocol)
    m = gallery_metrics(g)
    assert (m["n_queries"], m["n_candidates"], m["n_skipped_videos"], m["chance_R@1"]) == (4, 4, 0, 25.0)
    assert src.cache_misses == 0 and set(m["t2v"]) >= {"R@1", "R@5", "MdR", "MnR"}
    # the cache holds exactly what decoding the re-encoded copy gives
    copy = [type(r)(r.video_id, str(reencoded_path(r.path, root, root / "reencoded")), r.captions, r.split) for r in records]
    dec = FrameSource.from_config(resolve_config(build_config(dataset="msrvtt", data_root=str(root), preset="tiny", frame_cache="none")))
    for r, c in zip(records, copy):
        a, b = src(r), dec(c)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t = decode_throughput(cfg, records, root / "reencoded", repeats=1)
    assert t["frames"] == int(sum(src(r)[1].sum() for r in records)) and t["cache_fps"] > t["decode_fps"] > 0


def test_missing_video_skipped_or_strict(prepared):
    root, _ = prepared
    cfg = resolve_config(build_config(dataset="msrvtt", data_root=str(root), preset="tiny", frame_cache="disk"))
    rec = load_records(cfg, "test")[0]
    gone = type(rec)(rec.video_id, str(root / "videos" / "video1.mp4"), rec.captions, "test")
    src = FrameSource.from_config(cfg)
    assert src(gone) is None and len(src.skipped) == 1 and src.cache_misses == 1
    strict = FrameSource.from_config(resolve_config(build_config(dataset="msrvtt", data_root=str(root), preset="tiny",
                                                                 frame_cache="disk", video_policy="strict")))
    with pytest.raises(VideoReadError, match="video1.mp4: file not found"): strict(gone)


def test_disk_cache_for_other_settings_is_refused(prepared):
    root, _ = prepared
    with pytest.raises(Exception, match="diffret prepare"):
        FrameSource.from_config(resolve_config(build_config(dataset="msrvtt", data_root=str(root), preset="tiny",
                                                            n_frames=8, frame_cache="disk")))


def test_verify_lists_the_996_missing_videos(tmp_path, capsys):
    root = msrvtt_root(tmp_path / "full", restrict=False)
    rep = verify("msrvtt", root, splits=["test"], workers=2, progress=False)
    assert not rep.ok and rep.counts["test"] == (1000, 1000)
    assert len(rep.missing["test"]) == 996 and rep.unreadable["test"] == {}
    assert str(root / "videos" / "video9770.mp4") in rep.missing["test"]
    assert verify_main(["msrvtt", "--root", str(root), "--splits", "test", "--quiet", "--list", str(tmp_path / "l.txt")]) == 1
    out = capsys.readouterr().out
    assert "996 missing" in out and "... and 976 more" in out
    assert len((tmp_path / "l.txt").read_text().splitlines()) == 996


def test_verify_reports_missing_annotations_and_wrong_counts(prepared):
    root, _ = prepared
    rep = verify("msrvtt", root, workers=1, progress=False)
    text = rep.format()
    assert not rep.ok and "MISSING: " + str(root / "MSRVTT_data.json") in text
    assert "test: 1,000 videos expected (data card msrvtt, 1k-A, 9k training list), found 4" in text   # 4 test videos
    assert "test: 4 of 4 videos readable" in text


def test_cli_exit_codes(tmp_path, capsys):
    assert prepare_main(["msrvtt", "--root", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert verify_main(["nosuch", "--root", str(tmp_path), "--quiet"]) == 1
    assert prepare_main(["msrvtt", "--root", str(tmp_path), "-p", "n_frames=many", "--quiet"]) == 2
    assert "expects int" in capsys.readouterr().err


# --- verify reports schema errors and count differences; prepare counts videos, not attempts (issue 8) ---

def _msvd_folder(root: Path, captions: dict, test_ids: list) -> Path:
    (root / "videos").mkdir(parents=True)
    (root / "captions_msvd.json").write_text(json.dumps(captions))
    (root / "test_list.txt").write_text("\n".join(test_ids) + "\n")
    for v in test_ids: (root / "videos" / f"{v}.avi").write_bytes(b"x")       # present (verify --quick checks existence)
    return root


def test_verify_reports_a_schema_error_instead_of_a_traceback(tmp_path):
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"sentences": [{"video_id": "video0", "text": "a", "sen_id": 0}]}))
    rep = verify("msrvtt", tmp_path, splits=["train"], check_decode=False, progress=False)
    assert not rep.ok
    assert any(l == "error" and "sentences[0] has no field 'caption'" in m for l, m in rep.lines), rep.format()


def test_verify_rejects_msvd_caption_strings(tmp_path):
    root = _msvd_folder(tmp_path, {"a_1_2": "a dog runs", "b_1_2": ["a cat"]}, ["a_1_2", "b_1_2"])
    rep = verify("msvd", root, splits=["test"], check_decode=False, progress=False, subset=True)
    assert not rep.ok and "video 'a_1_2' should be a list of strings" in rep.format()


def test_verify_compares_counts_with_the_card(tmp_path, capsys):
    root = _msvd_folder(tmp_path, {"a_1_2": ["a dog runs", "a dog plays"], "b_1_2": ["a cat"]}, ["a_1_2", "b_1_2"])
    rep = verify("msvd", root, splits=["test"], check_decode=False, progress=False)
    text = rep.format()
    assert not rep.ok
    assert "test: 670 videos expected (data card msvd, official), found 2" in text
    assert "test: 27,763 captions expected (data card msvd, official), found 3" in text
    sub = verify("msvd", root, splits=["test"], check_decode=False, progress=False, subset=True)
    assert sub.ok and "declared subset" in sub.format() and "2 of 670 videos" in sub.format()
    args = ["msvd", "--root", str(root), "--splits", "test", "--quick", "--quiet"]
    assert verify_main(args) == 1 and verify_main(args + ["--subset"]) == 0
    out = capsys.readouterr().out
    assert "670 videos expected" in out and "RESULT: OK" in out


def test_verify_subset_larger_than_the_card_is_an_error(tmp_path):
    ids = [f"v{i}_1_2" for i in range(3)]
    root = _msvd_folder(tmp_path, {v: ["c"] for v in ids}, ids)
    (root / "val_list.txt").write_text("\n".join(ids) + "\n")     # 3 val videos, the card has 100: fine as a subset
    assert verify("msvd", root, splits=["val"], check_decode=False, progress=False, subset=True).ok
    from diffusionret_nb.benchmarks import CARDS
    card = CARDS["msvd"]
    old = card.counts
    card.counts = {"official": {**old["official"], "val": 2}}
    try:
        rep = verify("msvd", root, splits=["val"], check_decode=False, progress=False, subset=True)
        assert not rep.ok and "val: 2 videos expected (data card msvd, official), found 3" in rep.format()
    finally:
        card.counts = old


def test_verify_counts_match_the_card_on_real_msvd():
    rep = verify("msvd", shared_data("msvd"), check_decode=False, progress=False)
    text = rep.format()
    assert any(l == "ok" and "counts match the data card msvd (official)" in m for l, m in rep.lines), text
    assert "expected (data card" not in text


def test_prepare_counts_each_video_once(tmp_path, capsys):
    "4 video files (2 good, 2 unreadable) and a 5th listed but missing: 2 unreadable and 1 missing, not 5 failures."
    from diffusionret_nb.video import write_video
    root = tmp_path / "m"; (root / "videos").mkdir(parents=True)
    grey = np.arange(20, dtype=np.uint8)[:, None, None, None] * 8 * np.ones((1, 48, 64, 3), np.uint8)
    for i in (1, 2): write_video(root / "videos" / f"video{i}.mp4", grey, fps=10)
    (root / "videos" / "video3.mp4").write_bytes(b"junk")
    (root / "videos" / "video4.mp4").write_bytes(b"")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n"
                                                   + "".join(f"r{i},m{i},video{i},c{i}\n" for i in range(1, 6)))
    s = prepare("msrvtt", root, dict(preset="tiny"), splits=["test"], workers=1, progress=False)
    assert (s["records"], s["videos"]) == (5, 5)
    assert sorted(Path(p).name for p in s["unreadable"]) == ["video3.mp4", "video4.mp4"]
    assert [Path(p).name for p in s["missing"]] == ["video5.mp4"]
    assert prepare_main(["msrvtt", "--root", str(root), "--splits", "test", "--quiet", "--workers", "1",
                         "--bench", "0", "-p", "preset=tiny"]) == 1
    out = capsys.readouterr().out
    assert "3 of 5 videos could not be prepared: 2 unreadable, 1 missing" in out, out
    lines = out.splitlines()                                        # each video on one line (its reason may repeat the path)
    assert sum("video3.mp4" in l for l in lines) == 1 and sum("video5.mp4" in l for l in lines) == 1, out
