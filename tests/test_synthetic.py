"""The embedded synthetic world (diffusionret_nb.synthetic): determinism, splits, temporal contrast
pairs, domains, parameter checks, resumable rendering and caption length under CLIP's tokenizer."""
import hashlib
import json
import os

import av
import numpy as np
import pytest

from diffusionret_nb.core import ConfigError, DataError
from diffusionret_nb.synthetic import (
    ARTICLES, COLOURS, FPS, N_VIDEO_FRAMES, SHAPES, SYNTHETIC_VERSION, TEMPLATES, EVENTS,
    load_annotations, plan_world, render_world, synthetic_root, twin_key, verb_phrases)

SMALL = dict(n_train=6, n_val=4, n_test=8, size=32)


def render(tmp, seed=0, domain="plain", workers=1, **kw):
    return render_world(seed=seed, domain=domain, cache_dir=tmp, workers=workers, progress=False, **{**SMALL, **kw})


def digest(root):
    "sha256 of every file under `root`, by relative path."
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def decode(path):
    "All frames of an mp4 as float (N, H, W, 3)."
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]).astype(np.float64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return render(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def ann(world):
    return load_annotations(world)


def test_layout(world, ann):
    assert world == synthetic_root(seed=0, domain="plain", cache_dir=world.parents[1], **SMALL)
    assert world.name == f"v{SYNTHETIC_VERSION}-seed0-plain-6-4-8-s32"
    assert (ann["version"], ann["seed"], ann["domain"], ann["fps"], ann["n_video_frames"]) == \
        (SYNTHETIC_VERSION, 0, "plain", FPS, N_VIDEO_FRAMES)
    assert ann["params"] == dict(seed=0, domain="plain", n_train=6, n_val=4, n_test=8, size=32)
    clips = ann["clips"]
    assert [c["video_id"] for c in clips] == list(range(18))
    assert [sum(c["split"] == s for c in clips) for s in ("train", "val", "test")] == [6, 4, 8]
    for c in clips:
        assert c["video"] == f"videos/{c['split']}/{c['video_id']:05d}.mp4" and (world / c["video"]).is_file()
        assert len(c["captions"]) == (4 if c["split"] == "train" else 1)
        assert 1 <= len(c["events"]) <= 2 and all(e["action"] for e in c["events"])
    assert decode(world / clips[0]["video"]).shape == (N_VIDEO_FRAMES, 32, 32, 3)


def x264_options(path):
    "The option string x264 writes into the stream it encoded."
    b = path.read_bytes(); i = b.find(b"options: ")
    return b[i:b.find(b"\x00", i)].decode(errors="replace")


def test_writer_runs_x264_without_mbtree(tmp_path):
    "MB-tree reads uninitialised memory on small frames (bytes would depend on the heap): it must be off."
    from diffusionret_nb.video import write_video
    p = write_video(tmp_path / "probe.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=2)
    assert " mbtree=0" in x264_options(p) and " threads=1" in x264_options(p)


def test_same_seed_same_annotations_and_frames(world, ann, tmp_path):
    again = render(tmp_path, workers=2)          # two processes: same plan, scenes and pixels as one
    assert (again / "annotations.json").read_bytes() == (world / "annotations.json").read_bytes()
    for c in ann["clips"][::5]:
        assert np.abs(decode(again / c["video"]) - decode(world / c["video"])).max() <= 16


def test_same_seed_is_byte_identical(tmp_path):
    """Render one world here and in a fresh process whose heap is filled differently (MALLOC_PERTURB_):
    every file must have the same bytes. (48 px, seed 0 shows the MB-tree problem reliably.)"""
    import subprocess, sys
    kw = dict(seed=0, domain="plain", n_train=12, n_val=0, n_test=12, size=48)
    here = render_world(cache_dir=tmp_path / "a", workers=1, progress=False, **kw)
    code = (f"from diffusionret_nb.synthetic import render_world; "
            f"render_world(cache_dir={str(tmp_path / 'b')!r}, workers=2, progress=False, **{kw!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MALLOC_PERTURB_": "170"})
    assert digest(synthetic_root(cache_dir=tmp_path / "b", **kw)) == digest(here)


def test_different_seed_differs(world, ann, tmp_path):
    other = render(tmp_path, seed=1)
    assert [c["captions"] for c in load_annotations(other)["clips"]] != [c["captions"] for c in ann["clips"]]
    assert set(digest(other).values()) != set(digest(world).values())


def test_galleries_distinct_and_unseen():
    clips = plan_world(0, 800, 100, 200)
    for split in ("val", "test"):
        caps = [c["captions"][0] for c in clips if c["split"] == split]
        assert len(caps) == len(set(caps))
    train_keys = {c["key"] for c in clips if c["split"] == "train"}
    assert not train_keys & {c["key"] for c in clips if c["split"] != "train"}


def test_contrast_twins(world, ann):
    clips = {c["video_id"]: c for c in ann["clips"]}
    test = [c for c in ann["clips"] if c["split"] == "test"]
    assert all(c["twin_id"] is not None and clips[c["twin_id"]]["split"] == "test" for c in test)
    for c in test:
        t = clips[c["twin_id"]]
        assert t["twin_id"] == c["video_id"] and t["captions"] != c["captions"]
        a, b = decode(world / c["video"]), decode(world / t["video"])
        # one frame per second (what the reference sampler reads) and all frames: the same average
        assert np.abs(a[::2].mean(0) - b[::2].mean(0)).mean() < 1.5
        assert np.abs(a.mean(0) - b.mean(0)).mean() < 1.5
        # ... but not the same clip
        assert np.abs(a - b).mean() > 3 * np.abs(a.mean(0) - b.mean(0)).mean()


def test_domains_differ(world, ann, tmp_path):
    tex = render(tmp_path, domain="textured")
    tann = load_annotations(tex)
    assert [c["captions"] for c in tann["clips"]] == [c["captions"] for c in ann["clips"]]
    assert [c["events"] for c in tann["clips"]] == [c["events"] for c in ann["clips"]]
    a, b = decode(world / ann["clips"][0]["video"]), decode(tex / tann["clips"][0]["video"])
    assert np.abs(a - b).mean() > 20
    mad = lambda f: np.median(np.abs(f - np.median(f, axis=(0, 1))), axis=(0, 1)).mean()
    assert mad(a[0]) < 2 < mad(b[0])                                        # flat vs textured background


@pytest.mark.parametrize("kw,name", [
    (dict(domain="noisy"), "'domain'"), (dict(size=33), "'size'"), (dict(size=8), "'size'"),
    (dict(n_test=100_000), "'n_test'"), (dict(n_train=0), "'n_train'"), (dict(seed=-1), "'seed'"),
    (dict(n_val="4"), "'n_val'")])
def test_bad_params(tmp_path, kw, name):
    with pytest.raises(ConfigError, match=name):
        render(tmp_path, **kw)
    with pytest.raises(ConfigError, match=name):
        synthetic_root(**{**SMALL, **kw})
    assert not (tmp_path / "synthetic").exists()


def test_resumable(tmp_path):
    root = render(tmp_path)
    before = digest(root)
    clip = load_annotations(root)["clips"][3]
    victim = root / clip["video"]
    victim.unlink(); (root / "annotations.json").unlink()
    others = {p: p.stat().st_mtime_ns for p in (root / "videos").rglob("*.mp4")}
    assert render(tmp_path) == root
    assert all(p.stat().st_mtime_ns == m for p, m in others.items())       # untouched
    assert victim.is_file() and set(digest(root)) == set(before)             # re-rendered
    assert digest(root)["annotations.json"] == before["annotations.json"]
    mtime = (root / "annotations.json").stat().st_mtime_ns
    render(tmp_path)                                                         # complete: nothing rewritten
    assert (root / "annotations.json").stat().st_mtime_ns == mtime


def test_load_annotations_errors(tmp_path):
    with pytest.raises(DataError, match="annotations.json"):
        load_annotations(tmp_path)
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt annotations file .*annotations.json"):
        load_annotations(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps({"version": "1"}))
    with pytest.raises(DataError, match="no 'clips'"):
        load_annotations(tmp_path)


def test_captions_fit_clip_context():
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    n = lambda s: len(tok.encode(s))
    caps = {c for clip in plan_world(0, 800, 100, 200) for c in clip["captions"]}
    assert max(map(n, caps)) <= 30 and all(c == c.lower() for c in caps)
    # worst case over every template: CLIP's BPE splits on spaces and punctuation, so the token count
    # of a caption is the sum over its slots and the longest fill of each slot is the longest caption
    longest = lambda xs: max(xs, key=n)
    verbs = [v for e in EVENTS + tuple(f"turn_{c}" for c in COLOURS) for v in verb_phrases(e)]
    art, col, v = longest(ARTICLES), longest(COLOURS), longest(verbs)
    s1 = longest(SHAPES); s2 = longest([s for s in SHAPES if s != s1])
    clause = lambda s: f"{art} {col} {s} {v}"
    for cat in TEMPLATES:
        for t in cat:
            cap = t.format(A=clause(s1), B=clause(s2), S=f"{art} {col} {s1}", v1=v, v2=v)
            assert n(cap) <= 30, cap


def test_twin_key_involution():
    for c in plan_world(3, 40, 10, 20):
        assert twin_key(twin_key(c["key"])) == c["key"] != twin_key(c["key"])
