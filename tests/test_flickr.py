"""Smoke version of the optional Flickr8k benchmark: the 1000-image subset in ../shared/data loaded as
one-frame videos through the image-folder adapter, the tiny model trained from scratch for a few steps
through `pipeline.train_eval`, and multi-caption retrieval evaluated on the test images. (The full
run, `diffret train --set flickr8k`, takes minutes; its numbers are in the README.)"""
import json

import pytest
import torch

from conftest import shared_data
from diffusionret_nb.config import load_paramset
from diffusionret_nb.pipeline import train_eval
from diffusionret_nb.config import build_config
from diffusionret_nb.benchmarks import load_records, resolve_config
from diffusionret_nb.datasets import FrameSource
FLICKR8K_PARAMS = load_paramset("flickr8k")


@pytest.fixture
def one_thread():
    "One torch thread: on a busy 2-core machine small ops in 2 threads are many times slower."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_images_are_one_frame_videos():
    cfg = resolve_config(build_config(**{**FLICKR8K_PARAMS, "data_root": str(shared_data("flickr8k-mini"))}))
    assert cfg.data.n_frames == 1
    rec = load_records(cfg, "test")[0]
    frames, mask = FrameSource.from_config(cfg)(rec)
    assert frames.shape == (1, 3, 48, 48) and mask.tolist() == [True]


def test_flickr8k_smoke(tmp_path, one_thread):
    cfg = build_config(**{**FLICKR8K_PARAMS, "data_root": str(shared_data("flickr8k-mini")), "epochs": 1, "max_steps": 3})
    m = train_eval(cfg, tmp_path, progress=False)
    assert (m["n_queries"], m["n_candidates"], m["n_skipped_videos"]) == (625, 125, 0)
    assert m["chance_R@1"] == pytest.approx(0.8) and m["train"]["steps"] == 3
    assert json.loads((tmp_path / "params.json").read_text())["data"]["dataset"] == "flickr8k"


def test_frame_cache_of_images(tmp_path):
    "Images are cached like videos (no re-encoding); the read-only shared folder is left untouched."
    from diffusionret_nb.prepare import prepare
    root = shared_data("flickr8k-mini")
    params = dict(preset="tiny", frame_cache_dir=str(tmp_path / "cache"))
    s = prepare("flickr8k", root, params, splits=["test"], workers=2, progress=False)
    assert "reencode" not in s and (s["cache"]["cached"], s["cache"]["frames"]) == (125, 125)
    cfg = resolve_config(build_config(**{**FLICKR8K_PARAMS, **params, "data_root": str(root), "frame_cache": "disk"}))
    disk, dec = FrameSource.from_config(cfg), FrameSource.from_config(resolve_config(build_config(**{**FLICKR8K_PARAMS, "data_root": str(root)})))
    for r in load_records(cfg, "test")[:5]:
        assert torch.equal(disk(r)[0], dec(r)[0])
    assert disk.cache_misses == 0 and not (root / "frame_cache").exists()
