"""CLIP backbone: tokenizer, token-level text features, frame features and every weight-loading path and error."""
import copy
import os

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from diffusionret_nb.clip import (create_clip, openai_style_archive, read_weights, save_clip,
                                  text_attn_mask, tokenize)
from diffusionret_nb.core import CheckpointError, ConfigError
from diffusionret_nb.config import load_preset

CAPS = ["a dog is playing in the grass.", "a man cooks pasta in a small kitchen", '!"!']


@pytest.fixture(scope="module")
def tiny():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def src():
    torch.manual_seed(0)
    return create_clip("tiny").eval()


@pytest.fixture(scope="module")
def archive(src, tmp_path_factory):
    "An OpenAI-style TorchScript archive of the tiny model (fp16 matrices, OpenAI's metadata buffers)."
    return openai_style_archive(src.clip, tmp_path_factory.mktemp("oa") / "ViT-tiny.pt")


def feats(bb):
    tok, m = tokenize(CAPS, 12)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(1, 2, 3, bb.image_size, bb.image_size, generator=g)
    with torch.no_grad():
        return torch.cat([bb.encode_text(tok, m)[1], bb.encode_frames(frames)[0]])


def with_arch(preset, **changes):
    p = copy.deepcopy(preset)
    for path, v in changes.items():
        d = p["arch"]
        *head, last = path.split("__")
        for h in head: d = d[h]
        d[last] = v
    return p


# --- tokenizer -----------------------------------------------------------------------------------
def test_tokenize_known_sequence():
    tok, m = tokenize(["a dog is playing in the grass."], 12)
    assert tok.tolist() == [[49406, 320, 1929, 533, 1629, 530, 518, 5922, 269, 49407, 0, 0]]
    assert m.tolist() == [[True] * 10 + [False] * 2]
    assert tok.dtype == torch.long and m.dtype == torch.bool


def test_tokenize_truncation_padding_and_token_zero():
    tok, m = tokenize(CAPS + [""], 5)
    assert tok.shape == m.shape == (4, 5)
    assert tok[0].tolist() == [49406, 320, 1929, 533, 49407]                 # <start> + 3 tokens + <end>
    assert tok[3].tolist() == [49406, 49407, 0, 0, 0] and m[3].sum() == 2   # empty caption
    assert tok[2, :4].tolist() == [49406, 0, 10377, 49407] and m[2].sum() == 4  # id 0 is a real token here
    assert tokenize("a dog", 4)[0].shape == (1, 4)
    with pytest.raises(ConfigError, match="n_words must be >= 2"):
        tokenize(["x"], 1)


# --- encoders ------------------------------------------------------------------------------------
def test_attn_mask_is_causal_with_key_padding():
    am = text_attn_mask(torch.tensor([[True, True, False], [True, True, True]]), n_heads=2)
    assert am.shape == (4, 3, 3)
    hidden = torch.isinf(am)
    assert hidden[0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert torch.equal(hidden[0], hidden[1]) and not hidden[2][2, 2]
    assert not hidden.all(-1).any()  # no fully masked row (would give NaN)


def test_encode_shapes(src):
    tok, m = tokenize(CAPS, 12)
    with torch.no_grad():
        words, eot = src.encode_text(tok, m)
        fr = src.encode_frames(torch.randn(2, 5, 3, 48, 48))
    assert words.shape == (3, 12, 128) and eot.shape == (3, 128) and fr.shape == (2, 5, 128)
    assert torch.equal(eot, words[torch.arange(3), m.sum(1) - 1])
    assert torch.isfinite(words).all()
    with pytest.raises(ValueError, match=r"frames must be \(B, T, 3, 48, 48\)"):
        src.encode_frames(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="exceed CLIP's context length"):
        src.encode_text(*tokenize(["x"], 78))


def test_eot_equals_open_clip_encode_text(src):
    tok77, m77 = tokenize(CAPS, 77)
    tok, m = tokenize(CAPS, 12)
    with torch.no_grad():
        ref = src.clip.encode_text(tok77)
        w77, eot77 = src.encode_text(tok77, m77)
        w, eot = src.encode_text(tok, m)
    torch.testing.assert_close(eot77, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eot, ref, atol=1e-5, rtol=1e-5)  # causal: a shorter L changes nothing
    torch.testing.assert_close(w[m], w77[:, :12][m], atol=1e-5, rtol=1e-5)


def test_frames_equal_encode_image(src):
    x = torch.randn(2, 3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(src.encode_frames(x), src.clip.encode_image(x.flatten(0, 1)).view(2, 3, -1))


def test_temporal_init_accessors(src):
    assert (src.embed_dim, src.image_size, src.quick_gelu) == (128, 48, True)
    assert len(src.text_blocks) == 4 and isinstance(src.text_blocks, torch.nn.ModuleList)
    assert isinstance(src.text_blocks[0].mlp.gelu, QuickGELU)
    assert src.text_positional_embedding.shape == (77, 128)
    assert src.text_positional_embedding is src.clip.positional_embedding
    assert isinstance(src.logit_scale, torch.nn.Parameter) and src.logit_scale.ndim == 0
    assert abs(src.logit_scale.exp().item() - 1 / 0.07) < 1e-3


def test_bad_preset():
    with pytest.raises(ConfigError, match="a model preset needs"):
        create_clip({"arch": {}})
    with pytest.raises(ConfigError, match="unknown model preset"):
        create_clip("vitl14")


# --- loading paths -------------------------------------------------------------------------------
def test_project_file_round_trip(src, tmp_path):
    p = save_clip(src, tmp_path / "clip.pt")
    raw = torch.load(p, weights_only=True)
    assert raw["format"] == "diffusionret_nb.clip" and raw["quick_gelu"] is True and raw["preset"] == src.preset
    sd, info = read_weights(p)
    assert (info.kind, info.quick_gelu, info.openai) == ("project", True, False)
    assert torch.equal(feats(create_clip("tiny", p).eval()), feats(src))


@pytest.mark.parametrize("wrap,prefix", [(False, ""), (True, ""), (True, "module."), (False, "module.")])
def test_open_clip_state_dict(src, tmp_path, wrap, prefix):
    sd = {prefix + k: v for k, v in src.clip.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 2, "name": "run"} if wrap else sd, tmp_path / "w.pth")
    _, info = read_weights(tmp_path / "w.pth")
    assert (info.kind, info.openai, info.quick_gelu) == ("state_dict", False, None)
    assert torch.equal(feats(create_clip("tiny", str(tmp_path / "w.pth")).eval()), feats(src))


def test_custom_text_layout(src, tmp_path):
    text = ("transformer.", "token_embedding.", "ln_final.", "positional_embedding", "text_projection")
    sd = {("text." + k if k.startswith(text) else k): v for k, v in src.clip.state_dict().items()}
    torch.save(sd, tmp_path / "w.bin")
    assert torch.equal(feats(create_clip("tiny", tmp_path / "w.bin").eval()), feats(src))


def test_safetensors(src, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    st.save_file({k: v.contiguous() for k, v in src.clip.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(feats(create_clip("tiny", tmp_path / "w.safetensors").eval()), feats(src))


def test_openai_torchscript_archive(src, archive):
    sd, info = read_weights(archive)
    assert (info.kind, info.openai, info.quick_gelu) == ("torchscript", True, True)
    assert {"input_resolution", "context_length", "vocab_size"} <= set(sd)
    assert sd["visual.conv1.weight"].dtype == torch.float16
    bb = create_clip("tiny", archive).eval()
    assert all(p.dtype == torch.float32 for p in bb.parameters())
    torch.testing.assert_close(feats(bb), feats(src), atol=2e-2, rtol=0)  # fp16 round trip


def test_openai_state_dict_saved_from_archive(src, archive, tmp_path):
    sd, _ = read_weights(archive)
    torch.save(sd, tmp_path / "openai_sd.pt")
    _, info = read_weights(tmp_path / "openai_sd.pt")
    assert (info.kind, info.openai, info.quick_gelu) == ("state_dict", True, True)
    torch.testing.assert_close(feats(create_clip("tiny", tmp_path / "openai_sd.pt").eval()), feats(src),
                               atol=2e-2, rtol=0)


def test_pretrained_openai_is_wired(src, tiny, monkeypatch):
    calls = []
    def fake(name, pretrained=None, **kw):
        calls.append((name, pretrained))
        return src.clip
    monkeypatch.setattr(open_clip, "create_model", fake)
    preset = {**copy.deepcopy(tiny), "open_clip_model": "ViT-B-32-quickgelu"}
    assert torch.equal(feats(create_clip(preset, "openai").eval()), feats(src))
    assert calls == [("ViT-B-32-quickgelu", "openai")]


def test_pretrained_openai_errors(tiny, monkeypatch):
    def offline(*a, **k): raise OSError("no network")
    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(CheckpointError, match="this needs the network"):
        create_clip({**tiny, "open_clip_model": "ViT-B-32-quickgelu"}, "openai")
    with pytest.raises(CheckpointError, match="preset 'tiny' has no OpenAI weights"):
        create_clip("tiny", "openai")
    with pytest.raises(CheckpointError, match="-quickgelu architecture"):  # refused before any download
        create_clip({**with_arch(tiny, quick_gelu=False), "open_clip_model": "ViT-B-32"}, "openai")


# --- errors --------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="CLIP weights file not found: .*nope.pt"):
        create_clip("tiny", tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        create_clip("tiny", tmp_path)


@pytest.mark.parametrize("content", [b"not a checkpoint", b"PK\x03\x04 truncated zip", b""])
def test_corrupt_file(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"cannot read CLIP weights .*bad.pt: expected an OpenAI TorchScript archive"):
        create_clip("tiny", tmp_path / "bad.pt")


def test_truncated_archive(archive, tmp_path):
    data = archive.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read CLIP weights .*cut.pt"):
        create_clip("tiny", tmp_path / "cut.pt")


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds list"):
        create_clip("tiny", tmp_path / "list.pt")
    torch.save({"a": torch.zeros(1), "b": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"entries \['b'\] are not tensors"):
        create_clip("tiny", tmp_path / "mixed.pt")


def test_shape_mismatch_lists_keys(tiny, tmp_path):
    t16 = with_arch(tiny, vision_cfg__patch_size=16)  # what a ViT-B/16 file does to vitb32
    torch.save(create_clip(t16).clip.state_dict(), tmp_path / "b16.pt")
    with pytest.raises(CheckpointError) as e:
        create_clip("tiny", tmp_path / "b16.pt")
    msg = str(e.value)
    assert "do not fit preset 'tiny'" in msg and "2 shape mismatches" in msg
    assert "visual.conv1.weight: expected (128, 3, 8, 8), found (128, 3, 16, 16)" in msg
    assert "visual.positional_embedding: expected (37, 128), found (10, 128)" in msg


def test_missing_and_unexpected_keys(src, tiny, tmp_path):
    torch.save(create_clip(with_arch(tiny, text_cfg__layers=2)).clip.state_dict(), tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=r"24 missing keys:\n    transformer.resblocks.2.ln_1.weight(.|\n)*and 14 more"):
        create_clip("tiny", tmp_path / "short.pt")
    sd = dict(src.clip.state_dict()); sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="1 unexpected keys:\n    extra.weight"):
        create_clip("tiny", tmp_path / "extra.pt")


def test_project_file_other_architecture(src, tiny, tmp_path):
    p = save_clip(src, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="text_cfg.heads: expected 8, found 4"):  # same shapes, other heads
        create_clip(with_arch(tiny, text_cfg__heads=8), p)


def test_wrong_quickgelu_variant(src, tiny, archive, tmp_path):
    gelu = with_arch(tiny, quick_gelu=False)
    with pytest.raises(CheckpointError, match="OpenAI CLIP weights, trained with QuickGELU.*-quickgelu architecture"):
        create_clip(gelu, archive)
    with pytest.raises(CheckpointError, match="trained with QuickGELU"):
        create_clip(gelu, save_clip(src, tmp_path / "qg.pt"))
    g = create_clip(gelu)
    with pytest.raises(CheckpointError, match="trained with nn.GELU but preset 'tiny' uses QuickGELU"):
        create_clip("tiny", save_clip(g, tmp_path / "gelu.pt"))
    # the reason for the check: the same weights under nn.GELU give other features
    g.clip.load_state_dict(src.clip.state_dict())
    assert not torch.allclose(feats(g.eval()), feats(src), atol=1e-3)


@pytest.mark.skipif(not os.environ.get("DIFFRET_SLOW"), reason="builds ViT-B/32 and ViT-B/16; set DIFFRET_SLOW=1")
def test_vitb_presets(tmp_path):
    b32 = create_clip("vitb32")
    assert sum(p.numel() for p in b32.parameters()) == 151_277_313
    assert b32.clip.visual.positional_embedding.shape == (50, 768)
    torch.save(b32.clip.state_dict(), tmp_path / "b32.pt")
    with pytest.raises(CheckpointError, match=r"visual.conv1.weight: expected \(768, 3, 16, 16\), found \(768, 3, 32, 32\)"):
        create_clip("vitb16", tmp_path / "b32.pt")


@pytest.mark.skipif(not os.environ.get("DIFFRET_OPENAI_PT"), reason="set DIFFRET_OPENAI_PT to a real OpenAI ViT-B-32.pt")
def test_real_openai_archive():
    bb = create_clip("vitb32", os.environ["DIFFRET_OPENAI_PT"]).eval()
    assert abs(bb.logit_scale.exp().item() - 100) < 1e-2
