"""Video input (diffusionret_nb.video): readers on real and self-written videos, frame sampling, transforms.

Real videos come from ../shared/data beside the repository; those tests skip when it is absent.
Everything else runs on small mp4 files the tests write themselves with `write_video`."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionret_nb import video
from diffusionret_nb.video import (BACKENDS, CLIP_MEAN, CLIP_STD, VideoInfo, VideoReadError, load_frames,
                                   normalize, read_frames, reference_indices, resize_crop, segment_indices,
                                   video_info, write_video)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# facts about the shared sample videos (data/README.md): frames, fps, height, width
REAL = {"videos/bigbuckbunny.mp4": (132, 25.0, 720, 1280), "videos/bikes.mp4": (250, 25.0, 272, 640),
        "msrvtt/videos/video7020.mp4": (35, 2.0, 224, 298), "msrvtt/videos/video7021.mp4": (38, 2.0, 224, 298),
        "msrvtt/videos/video7024.mp4": (50, 2.0, 224, 298), "msrvtt/videos/video7025.mp4": (44, 2.0, 224, 298)}
GREY_STEP = 6  # frame i of the grey test video is a flat grey of value GREY_STEP * i


def real(rel: str) -> Path:
    "Path of a shared sample video, or skip the test."
    p = DATA / rel
    if not p.exists(): pytest.skip(f"real sample video {p} not found (../shared/data is absent)")
    return p


def grey_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    "Frames whose flat grey value tells their index."
    return np.broadcast_to((np.arange(n, dtype=np.uint8) * GREY_STEP)[:, None, None, None], (n, h, w, 3)).copy()


def frame_ids(frames: np.ndarray) -> np.ndarray:
    "The index each grey frame encodes (robust to the codec's +-2 grey levels)."
    return np.rint(frames.reshape(len(frames), -1).mean(1) / GREY_STEP).astype(int)


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    "A 5 s, 8 fps, 40-frame video whose frame i has grey value 6*i."
    return write_video(tmp_path_factory.mktemp("v") / "grey.mp4", grey_frames(40), fps=8)


# ---------------------------------------------------------------- real videos

@pytest.mark.parametrize("rel", sorted(REAL))
def test_real_info_matches_known_facts_on_both_backends(rel):
    p = real(rel)
    n, fps, h, w = REAL[rel]
    for b in BACKENDS:
        assert video_info(p, b) == VideoInfo(n_frames=n, fps=fps, height=h, width=w, duration=n / fps), b


@pytest.mark.parametrize("rel", sorted(REAL))
def test_real_backends_agree_on_pixels(rel):
    p = real(rel)
    idx = np.linspace(0, REAL[rel][0] - 1, 12).astype(int)
    a, b = read_frames(p, idx, backend="decord"), read_frames(p, idx, backend="pyav")
    assert a.shape == b.shape == (12, REAL[rel][2], REAL[rel][3], 3) and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    assert a.std() > 5  # real content, not black frames


@pytest.mark.parametrize("rel", ["videos/bikes.mp4", "msrvtt/videos/video7024.mp4"])
def test_real_every_reported_frame_decodes(rel):
    p = real(rel)
    assert len(read_frames(p, backend="pyav")) == len(read_frames(p, backend="decord")) == REAL[rel][0]


@pytest.mark.parametrize("rel", sorted(REAL))
def test_real_reference_sampling_one_frame_per_second(rel):
    p = real(rel)
    info = video_info(p)
    idx, n = reference_indices(info.n_frames, info.fps, 1000)
    assert abs(n - info.duration) <= 1, (n, info.duration)
    np.testing.assert_array_equal(np.diff(idx), round(info.fps))
    x, m = load_frames(p, 12, 224)
    assert x.shape == (12, 224, 224, 3) and x.dtype == np.uint8 and m.dtype == bool
    assert m.sum() == min(12, n) and m[:m.sum()].all()  # real frames first, then padding
    assert (x[~m] == 0).all() and all(f.std() > 5 for f in x[m])


def test_real_resize_crop_matches_pil():
    f = read_frames(real("videos/bikes.mp4"), [100])  # 272 x 640
    pil = Image.fromarray(f[0]).resize((527, 224), Image.BICUBIC).crop((152, 0, 376, 224))  # CLIP's preprocessing
    d = np.abs(resize_crop(f, 224)[0].astype(int) - np.asarray(pil).astype(int))
    assert d.max() <= 2 and d.mean() < 0.2


@pytest.mark.parametrize("rel", ["videos/bigbuckbunny.mp4", "msrvtt/videos/video7020.mp4"])
def test_real_segments_and_backends_give_the_same_clip(rel):
    p = real(rel)
    x, m = load_frames(p, 12, 64, sampling="segments", backend="decord")
    y, m2 = load_frames(p, 12, 64, sampling="segments", backend="pyav")
    assert m.all() and m2.all() and x.shape == (12, 64, 64, 3)
    assert np.abs(x.astype(int) - y.astype(int)).mean() < 0.5


# ---------------------------------------------------------------- self-written videos

@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_picks_the_requested_frames(grey, backend):
    x = read_frames(grey, [3, 0, 39, 3, 500], backend=backend)  # any order, repeats, past the end
    assert x.shape == (5, 48, 64, 3) and x.dtype == np.uint8
    assert frame_ids(x).tolist() == [3, 0, 39, 3, 39]
    assert frame_ids(read_frames(grey, backend=backend)).tolist() == list(range(40))


def test_read_frames_rejects_bad_indices(grey):
    with pytest.raises(ValueError, match=">= 0"): read_frames(grey, [-1])
    with pytest.raises(ValueError, match="ints"): read_frames(grey, [0.5])
    with pytest.raises(ValueError, match="non-empty"): read_frames(grey, [])
    with pytest.raises(ValueError, match="backend must be one of"): read_frames(grey, [0], backend="cv2")


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_short_video_is_zero_padded_and_masked(tmp_path, backend):
    p = write_video(tmp_path / "short.mp4", grey_frames(5), fps=1)  # 5 s at 1 fps
    x, m = load_frames(p, 12, 32, backend=backend)
    assert x.shape == (12, 32, 32, 3) and m.tolist() == [True] * 5 + [False] * 7
    assert frame_ids(x[:5]).tolist() == [0, 1, 2, 3, 4] and (x[5:] == 0).all()
    x, m = load_frames(p, 12, 32, sampling="segments", backend=backend)  # X-Pool repeats instead of padding
    assert m.all() and frame_ids(x).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_load_frames_windows(grey, backend):
    x, m = load_frames(grey, 12, 16, start=1.0, end=3.0, backend=backend)  # frames 8..23, every 8th
    assert frame_ids(x[m]).tolist() == [8, 16]
    x, m = load_frames(grey, 4, 16, sampling="segments", start=1.0, end=3.0, backend=backend)
    assert m.all() and frame_ids(x).tolist() == [9, 13, 17, 21]
    x, m = load_frames(grey, 4, 16, start=60.0, end=90.0, backend=backend)  # past the end: the last frame
    assert frame_ids(x[m]).tolist() == [39]


def test_load_frames_deterministic_unless_jitter(grey):
    a, b = load_frames(grey, 12, 16), load_frames(grey, 12, 16)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    j = [frame_ids(load_frames(grey, 12, 16, "segments", jitter=True, rng=np.random.default_rng(s))[0]) for s in (3, 3, 4)]
    assert (j[0] == j[1]).all() and not (j[0] == j[2]).all()
    lo, hi = video._segments(0, 40, 12)
    assert ((lo <= j[0]) & (j[0] < hi)).all()


def test_load_frames_rejects_bad_arguments(grey):
    with pytest.raises(ValueError, match=r"\['reference', 'segments'\]"): load_frames(grey, 12, 32, sampling="uniform")
    with pytest.raises(ValueError, match="needs sampling='segments'"): load_frames(grey, 12, 32, jitter=True)
    with pytest.raises(ValueError, match=">= 1"): load_frames(grey, 0, 32)


def _bad_files(tmp_path, grey) -> dict:
    "Broken files and the words their error must contain."
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    b = grey.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(b[:len(b) // 2])  # write_video puts the index at the end
    return {tmp_path / "random.mp4": "", tmp_path / "empty.mp4": "empty file (0 bytes)", tmp_path / "text.mp4": "",
            tmp_path / "truncated.mp4": "", tmp_path / "missing.mp4": "file not found"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_files_raise_naming_the_file(tmp_path, grey, backend):
    for p, words in _bad_files(tmp_path, grey).items():
        for fn in (lambda: video_info(p, backend), lambda: read_frames(p, [0], backend),
                   lambda: load_frames(p, 12, 32, backend=backend)):
            with pytest.raises(VideoReadError) as e: fn()
            assert str(p) in str(e.value) and words in str(e.value) and e.value.path == str(p)


def test_video_read_error_is_a_data_error():
    from diffusionret_nb.core import DataError
    assert issubclass(VideoReadError, DataError)


def test_no_video_stream(tmp_path):
    import av
    p = tmp_path / "audio.mp4"
    with av.open(str(p), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=16000)
        st.layout = "mono"
        for k in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, k * 1024
            for pkt in st.encode(f): out.mux(pkt)
        for pkt in st.encode(): out.mux(pkt)
    for b in ("pyav", "auto"):
        with pytest.raises(VideoReadError, match="no video stream"): video_info(p, b)
    with pytest.raises(VideoReadError, match="audio.mp4"): video_info(p, "decord")


def _stts_delta_zero(src: Path, dst: Path) -> Path:
    "Copy of an mp4 whose sample durations are set to 0 (decord then reads its fps as NaN)."
    b = bytearray(src.read_bytes())
    i = b.find(b"stts")
    assert struct.unpack(">II", b[i + 8:i + 16]) == (1, 40)  # one run of 40 samples
    b[i + 16:i + 20] = struct.pack(">I", 0)
    dst.write_bytes(b)
    return dst


def test_fps_read_as_nan_or_zero(tmp_path, grey, monkeypatch):
    p = _stts_delta_zero(grey, tmp_path / "nofps.mp4")
    with pytest.raises(VideoReadError, match=r"nofps.mp4: frame rate read as nan"): video_info(p, "decord")
    assert video_info(p, "auto").fps == 8.0  # PyAV still finds the rate in the H.264 stream
    x, m = load_frames(p, 12, 16)  # PyAV decodes only 19 of the 40 packets of this broken file, in a scrambled order
    assert x.shape == (12, 16, 16, 3) and 1 <= m.sum() <= 5 and frame_ids(x[:1]).tolist() == [0]
    import decord
    monkeypatch.setattr(decord.VideoReader, "get_avg_fps", lambda self: 0.0)
    with pytest.raises(VideoReadError, match=r"grey.mp4: frame rate read as 0.0"): load_frames(grey, 12, 16, backend="decord")
    for bad in (0, float("nan"), None, float("inf"), -25.0):
        with pytest.raises(VideoReadError, match="frame rate read as"): video._check_fps("x.mp4", bad)


def test_damaged_tail_is_read_up_to_what_decodes(tmp_path):
    import av
    frames = (np.random.default_rng(2).random((40, 48, 64, 3)) * 255).astype(np.uint8)
    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", format="mp4", options={"movflags": "+faststart"}) as out:  # index first
        st = out.add_stream("libx264", rate=8)
        st.width, st.height, st.pix_fmt, st.options = 64, 48, "yuv420p", {"g": "8"}
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")): out.mux(pkt)
        for pkt in st.encode(): out.mux(pkt)
    b = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(b[:len(b) * 2 // 3])
    with pytest.raises(VideoReadError, match="decord cannot open it"): video_info(cut, "decord")
    info = video_info(cut)
    assert 10 < info.n_frames < 40
    ref = read_frames(full, backend="pyav")
    x = read_frames(cut, [0, 39])
    assert (x[0] == ref[0]).all()
    last = [i for i in range(40) if (ref[i] == x[1]).all()]
    assert len(last) == 1 and last[0] < info.n_frames  # index 39 reads the last frame that decodes
    x, m = load_frames(cut, 12, 16, sampling="segments")
    assert x.shape == (12, 16, 16, 3) and m.all()


def test_decord_missing_falls_back_to_pyav(grey, monkeypatch):
    import builtins
    real_import = builtins.__import__
    def no_decord(name, *a, **k):
        if name == "decord": raise ImportError("No module named 'decord'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_decord)
    assert video_info(grey).n_frames == 40
    with pytest.raises(ImportError, match="use backend='pyav'"): video_info(grey, "decord")


# ---------------------------------------------------------------- sampling

def test_reference_indices_known_values():
    idx, n = reference_indices(100, 25.0, 12)
    assert idx.tolist() == [0, 25, 50, 75] and n == 4
    idx, n = reference_indices(1000, 25.0, 12)
    assert idx.tolist() == [0, 75, 175, 250, 350, 425, 525, 600, 700, 775, 875, 975] and n == 12
    assert reference_indices(35, 2.0, 12)[0].tolist() == [0, 2, 6, 8, 12, 14, 18, 20, 24, 26, 30, 34]
    assert reference_indices(300, 29.97, 64)[0].tolist() == list(range(0, 300, 30))
    assert reference_indices(3, 0.5, 12)[0].tolist() == [0, 1, 2]  # slower than sample_fps: every frame
    assert reference_indices(100, 25.0, 12)[0].dtype == np.int64


def test_reference_indices_sample_fps():
    idx, n = reference_indices(100, 25.0, 12, sample_fps=5)  # every 5th frame: 20, then 12 of them
    assert n == 12 and idx.tolist() == (np.arange(0, 100, 5)[np.linspace(0, 19, 12).astype(int)]).tolist()


def test_reference_indices_window():
    assert reference_indices(100, 25.0, 12, start=1.0, end=2.0)[0].tolist() == [25]
    assert reference_indices(100, 25.0, 12, start=1.0, end=3.0)[0].tolist() == [25, 50]
    assert reference_indices(100, 25.0, 12, start=0.5)[0].tolist() == [12, 37, 62, 87]
    assert reference_indices(100, 25.0, 12, end=2.5)[0].tolist() == [0, 25, 50]
    assert reference_indices(100, 25.0, 12, start=10.0, end=20.0)[0].tolist() == [99]  # past the end
    assert reference_indices(100, 25.0, 12, start=-2.0, end=99.0)[0].tolist() == [0, 25, 50, 75]
    with pytest.raises(ValueError, match="before its start"): reference_indices(100, 25.0, 12, start=2.0, end=1.0)
    with pytest.raises(ValueError, match="finite"): reference_indices(100, 25.0, 12, start=float("nan"))


@pytest.mark.parametrize("args,words", [((0, 25.0, 12), "n_total must be >= 1"), ((10, 0.0, 12), "fps must be finite"),
                                        ((10, float("nan"), 12), "fps must be finite"), ((10, 25.0, 0), "n_frames must be >= 1")])
def test_reference_indices_bad_input(args, words):
    with pytest.raises(ValueError, match=words): reference_indices(*args)


def test_segment_indices_known_values():
    assert segment_indices(100, 12).tolist() == [3, 11, 20, 28, 36, 45, 53, 61, 70, 78, 86, 95]
    # same middles as X-Pool: edges linspace(0, n, T+1).astype(int), middle of [a, b-1]
    e = np.linspace(0, 100, 13).astype(int)
    assert segment_indices(100, 12).tolist() == [(a + b - 1) // 2 for a, b in zip(e[:-1], e[1:])]
    assert segment_indices(12, 12).tolist() == list(range(12))
    assert segment_indices(5, 12).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]  # fewer frames: repeats
    assert segment_indices(1, 3).tolist() == [0, 0, 0]
    assert segment_indices(100, 4, first=20, last=60).tolist() == [24, 34, 44, 54]
    assert segment_indices(100, 2, first=90, last=500).tolist() == [92, 97]  # last clipped to n_total
    with pytest.raises(ValueError, match="first < last"): segment_indices(100, 4, first=60, last=60)
    with pytest.raises(ValueError, match="first < last"): segment_indices(100, 4, first=-1)


def test_segment_jitter_inside_segments_and_reproducible():
    for n_total, t in [(100, 12), (13, 12), (5, 12), (1000, 64)]:
        lo, hi = video._segments(0, n_total, t)
        assert (lo[1:] >= lo[:-1]).all() and (hi[:-1] <= np.maximum(lo[1:], lo[:-1] + 1)).all()  # in order, no overlap
        draws = np.stack([segment_indices(n_total, t, jitter=True, rng=np.random.default_rng(s)) for s in range(50)])
        assert ((lo <= draws) & (draws < hi)).all()
        same = segment_indices(n_total, t, jitter=True, rng=np.random.default_rng(0))
        assert (same == draws[0]).all()
    lo, hi = video._segments(0, 100, 12)
    draws = np.stack([segment_indices(100, 12, jitter=True, rng=np.random.default_rng(s)) for s in range(200)])
    assert (draws.min(0) == lo).all() and (draws.max(0) == hi - 1).all()  # every frame of a segment can come out


# ---------------------------------------------------------------- transforms

def test_resize_crop_matches_clip_pil_pipeline():
    img = (np.random.default_rng(1).random((3, 90, 60, 3)) * 255).astype(np.uint8)  # portrait
    out = resize_crop(img, 40)
    assert out.shape == (3, 40, 40, 3) and out.dtype == np.uint8
    pil = Image.fromarray(img[1]).resize((40, 60), Image.BICUBIC).crop((0, 10, 40, 50))
    d = np.abs(out[1].astype(int) - np.asarray(pil).astype(int))
    # noise is the worst case: PIL rounds to 8 bits between its two passes, so where bicubic overshoots
    # a few pixels differ by several levels; nearly all are within 1
    assert d.mean() < 0.5 and np.mean(d > 1) < 0.01 and d.max() <= 10
    assert resize_crop(img[:0], 40).shape == (0, 40, 40, 3)
    with pytest.raises(ValueError, match=r"uint8 \(N,H,W,3\)"): resize_crop(img.astype(np.float32), 40)
    with pytest.raises(ValueError, match=r"uint8 \(N,H,W,3\)"): resize_crop(img[0], 40)


def test_normalize_values_and_layout():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[1] = 255
    y = normalize(x)
    assert y.shape == (2, 3, 4, 4) and y.dtype == torch.float32
    torch.testing.assert_close(y[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
    torch.testing.assert_close(y[1, :, 3, 3], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    torch.testing.assert_close(normalize(torch.from_numpy(x)), y)
    with pytest.raises(ValueError, match="uint8"): normalize(x.astype(np.float32))
