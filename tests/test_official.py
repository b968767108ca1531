"""Checkpoints of the reference DiffusionRet: a file built in exactly its layout at ViT-B/32 shapes (random weights,
fp16 as the reference stores CLIP), with and without DDP's `module.`, loads strictly into the run's stage-1 model and
generator, which then compute what the models the file was made from compute; the temporal blocks compute what the
reference's blocks (TF-style LayerNorm, eps 1e-12) compute from the file's tensors; every way a file can be wrong is
a named error."""
import re

import pytest
import torch

from diffusionret_nb.clip import tokenize
from diffusionret_nb.config import build_config
from diffusionret_nb.core import CheckpointError
from diffusionret_nb.official import is_official, load_official, official_preset, official_to_project, project_to_official
from diffusionret_nb.registry import create_model


pytestmark = pytest.mark.usefixtures("one_thread")

# The reference's layout of everything but CLIP (D = 512, N = 0 … 3), as the issue lists it.
BLOCK = {"attn.in_proj_weight": (1536, 512), "attn.in_proj_bias": (1536,), "attn.out_proj.weight": (512, 512),
         "attn.out_proj.bias": (512,), "ln_1.weight": (512,), "ln_1.bias": (512,), "mlp.c_fc.weight": (2048, 512),
         "mlp.c_fc.bias": (2048,), "mlp.c_proj.weight": (512, 2048), "mlp.c_proj.bias": (512,), "ln_2.weight": (512,),
         "ln_2.bias": (512,)}
DENOISER = {"q_proj.weight": (512, 512), "k_proj.weight": (512, 512), "v_proj.weight": (512, 512), "proj.weight": (512, 512),
            "proj.bias": (512,), "sequence_pos_encoder.pe": (5000, 1, 512), "embed_timestep.sequence_pos_encoder.pe": (5000, 1, 512),
            "embed_timestep.time_embed.0.weight": (512, 512), "embed_timestep.time_embed.0.bias": (512,),
            "embed_timestep.time_embed.2.weight": (512, 512), "embed_timestep.time_embed.2.bias": (512,),
            "decoder.0.weight": (1024, 1024), "decoder.0.bias": (1024,), "decoder.2.weight": (1, 1024), "decoder.2.bias": (1,)}
REFERENCE = {**{f"{m}_weight_fc.{i}.{p}": s for m in ("text", "video") for i, p, s in
                ((0, "weight", (1024, 512)), (0, "bias", (1024,)), (2, "weight", (1, 1024)), (2, "bias", (1,)))},
             "frame_position_embeddings.weight": (77, 512),
             **{f"transformerClip.resblocks.{n}.{k}": s for n in range(4) for k, s in BLOCK.items()},
             **{f"{d}.{k}": s for d in ("diffusion_model", "diffusion_model_v") for k, s in DENOISER.items()}}
CLIP_SAMPLE = {"clip.visual.conv1.weight": (768, 3, 32, 32), "clip.visual.class_embedding": (768,),
               "clip.visual.positional_embedding": (50, 768), "clip.visual.ln_pre.weight": (768,), "clip.visual.proj": (768, 512),
               "clip.visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
               "clip.visual.transformer.resblocks.11.mlp.c_fc.weight": (3072, 768), "clip.visual.ln_post.bias": (768,),
               "clip.transformer.resblocks.11.attn.out_proj.weight": (512, 512), "clip.token_embedding.weight": (49408, 512),
               "clip.positional_embedding": (77, 512), "clip.ln_final.weight": (512,), "clip.text_projection": (512, 512),
               "clip.logit_scale": ()}


def _fp16_exact(model):
    "Round every parameter to fp16 and back, so that an fp16 file holds exactly the model's weights."
    with torch.no_grad():
        for p in model.parameters(): p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def vitb32(tmp_path_factory):
    "The source models (ViT-B/32, random init), their reference-layout state dict (fp16) and two files: plain and `module.`."
    torch.manual_seed(0)
    cfg = build_config(preset="vitb32")
    m1, g1 = _fp16_exact(create_model(cfg)), _fp16_exact(create_model(cfg, stage=2))
    with torch.no_grad():                                    # LayerNorms away from their init (1, 0), so loading shows
        for n, p in m1.named_parameters():
            if ".ln_" in n: p.copy_((p + 0.1 * torch.randn_like(p)).half().float())
    off = {k: v.half() for k, v in project_to_official(m1, g1).items()}
    d = tmp_path_factory.mktemp("official")
    torch.save(off, d / "plain.bin")
    torch.save({f"module.{k}": v for k, v in off.items()}, d / "ddp.bin")
    return cfg, m1.eval(), g1.eval(), off, d


def test_the_file_has_the_reference_layout(vitb32):
    _, _, _, off, _ = vitb32
    rest = {k: tuple(v.shape) for k, v in off.items() if not k.startswith("clip.")}
    assert rest == REFERENCE
    assert {k: tuple(off[k].shape) for k in CLIP_SAMPLE} == CLIP_SAMPLE
    assert is_official(off) and is_official({f"module.{k}": v for k, v in off.items()})
    assert official_preset(off) == "vitb32"


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens, wmask = tokenize(["a man is playing a guitar on a stage", "a cat sleeps"], 32)
    frames = torch.randn(2, 3, 3, 224, 224, generator=g)
    return tokens, wmask, frames, torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("name", ["plain.bin", "ddp.bin"])
def test_load_official_gives_the_same_models(vitb32, name):
    cfg, m1, g1, off, d = vitb32
    m2, g2 = load_official(d / name, cfg)
    m2.eval(); g2.eval()
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert set(sd1) == set(sd2) and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    for k in ("clip.clip.visual.conv1.weight", "temporal.blocks.3.ln_2.bias", "sim.video_weight_fc.2.weight"):
        assert torch.equal(sd2[k], sd1[k])
    assert all(torch.equal(a, b) for a, b in zip(g1.state_dict().values(), g2.state_dict().values()))
    tokens, wmask, frames, fmask = _inputs()
    with torch.no_grad():
        (t1, v1), (t2, v2) = [(m.encode_text(tokens, wmask), m.encode_video(frames, fmask)) for m in (m1, m2)]
        torch.testing.assert_close(m2.similarity(t2, v2), m1.similarity(t1, v1), rtol=0, atol=1e-6)
        idx, xk = torch.tensor([[0, 1], [1, 0]]), torch.randn(2, 2)
        for k in (0, 49):
            torch.testing.assert_close(g2.t2v(t2["eot"], v2["frames"], v2["mask"], idx, xk, k),
                                       g1.t2v(t1["eot"], v1["frames"], v1["mask"], idx, xk, k), rtol=0, atol=1e-6)
            torch.testing.assert_close(g2.v2t(v2["frames"], v2["mask"], t2["eot"], idx, xk, k),
                                       g1.v2t(v1["frames"], v1["mask"], t1["eot"], idx, xk, k), rtol=0, atol=1e-6)
    _temporal_blocks_compute_what_the_reference_computes(m2, off)


def _tf_layer_norm(x, w, b, eps=1e-12):
    "The reference's TF-style LayerNorm."
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return w * (x - u) / torch.sqrt(s + eps) + b


def _reference_temporal(off, x, mask, heads=8):
    """The reference's temporal transformer, written out from the file's tensors: position embedding, 4 pre-LN blocks
    (TF-style LayerNorm eps 1e-12, multi-head attention with −1e6 on padded keys, QuickGELU MLP), residual to the input."""
    W = lambda k: off[k].float()
    B, T, D = x.shape
    h = x + W("frame_position_embeddings.weight")[:T]
    bias = ((1.0 - mask.float()) * -1e6)[:, None, None, :]                       # (B, 1, 1, T)
    for n in range(4):
        p = f"transformerClip.resblocks.{n}."
        y = _tf_layer_norm(h, W(p + "ln_1.weight"), W(p + "ln_1.bias"))
        q, k, v = (y @ W(p + "attn.in_proj_weight").T + W(p + "attn.in_proj_bias")).split(D, -1)
        split = lambda z: z.view(B, T, heads, D // heads).transpose(1, 2)          # (B, H, T, d)
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (D // heads) ** 0.5 + bias, -1)
        o = (a @ split(v)).transpose(1, 2).reshape(B, T, D)
        h = h + o @ W(p + "attn.out_proj.weight").T + W(p + "attn.out_proj.bias")
        y = _tf_layer_norm(h, W(p + "ln_2.weight"), W(p + "ln_2.bias")) @ W(p + "mlp.c_fc.weight").T + W(p + "mlp.c_fc.bias")
        h = h + (y * torch.sigmoid(1.702 * y)) @ W(p + "mlp.c_proj.weight").T + W(p + "mlp.c_proj.bias")
    return h + x


def _temporal_blocks_compute_what_the_reference_computes(m2, off):
    """On frame features of small variance (where LayerNorm's eps matters) the loaded temporal transformer gives the
    output of the reference's, computed from the file's tensors."""
    assert {blk.ln_1.eps for blk in m2.temporal.blocks} | {blk.ln_2.eps for blk in m2.temporal.blocks} == {1e-12}
    x = 1e-3 * torch.randn(2, 12, 512, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12); mask[1, 7:] = 0
    pos = "frame_position_embeddings.weight"
    with torch.no_grad():
        m2.temporal.frame_position_embeddings.weight.mul_(1e-3)               # positions as small as the features
        ours, _ = m2.temporal(x, mask)
        m2.temporal.frame_position_embeddings.weight.copy_(off[pos])
    torch.testing.assert_close(ours, _reference_temporal({**off, pos: 1e-3 * off[pos].float()}, x, mask), rtol=1e-4, atol=1e-6)


def test_vitb32_layout_errors(vitb32):
    "Each fault of a state dict in the reference layout is a named error (checked in memory, on the meta device)."
    _, _, _, off, _ = vitb32
    stage1, gen = official_to_project(off, "vitb32")
    assert len(stage1) + len(gen) + 4 == len(off)
    cases = [({k: v for k, v in off.items() if k != "transformerClip.resblocks.2.mlp.c_proj.bias"},
              "missing keys:\n    temporal.blocks.2.mlp.c_proj.bias"),
             ({**off, "logit_scale_extra": torch.zeros(1)}, "unexpected keys:\n    logit_scale_extra"),
             ({**off, "diffusion_model_v.sequence_pos_encoder.pe": off["diffusion_model_v.sequence_pos_encoder.pe"] * -1},
              "diffusion_model_v.sequence_pos_encoder.pe: the sinusoidal table"),
             ({**off, "video_weight_fc.0.weight": off["video_weight_fc.0.weight"][:, :256]},
              "sim.video_weight_fc.0.weight: expected (1024, 512), found (1024, 256)")]
    for bad, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            official_to_project(bad, "vitb32")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        official_to_project(off, "vitb16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(3)
    cfg = build_config(preset="tiny")
    return cfg, project_to_official(create_model(cfg), create_model(cfg, stage=2)), tmp_path_factory.mktemp("tiny")


def _file(d, name, sd):
    torch.save(sd, d / name)
    return d / name


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("diffusion_model.decoder.0.bias"), "missing keys:\n    diffusion_model.decoder.0.bias"),
    (lambda o: o.pop("clip.visual.ln_post.weight"), "missing keys:\n    visual.ln_post.weight"),
    (lambda o: o.update({"transformerClip.resblocks.0.attn.extra": torch.zeros(1)}),
     "unexpected keys:\n    temporal.blocks.0.attn.extra"),
    (lambda o: o.update({"fc.weight": torch.zeros(1)}), "unexpected keys:\n    fc.weight"),
    (lambda o: o.update({"diffusion_model.embed_timestep.sequence_pos_encoder.pe":
                         o["diffusion_model.embed_timestep.sequence_pos_encoder.pe"].roll(1, 0)}),
     "diffusion_model.embed_timestep.sequence_pos_encoder.pe: the sinusoidal table"),
], ids=["missing-denoiser-key", "missing-clip-key", "extra-block-key", "extra-key", "wrong-pe"])
def test_bad_files_are_named_errors(tiny, change, message):
    cfg, off, d = tiny
    bad = dict(off); change(bad)
    path = _file(d, "bad.bin", bad)
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        load_official(path, cfg)
    assert str(path) in str(e.value)


def test_files_that_are_not_reference_checkpoints(tiny):
    cfg, off, d = tiny
    with pytest.raises(CheckpointError, match="official checkpoint not found"):
        load_official(d / "nope.bin", cfg)
    (d / "junk.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read .*junk.bin"):
        load_official(d / "junk.bin", cfg)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_official(_file(d, "tensor.bin", torch.zeros(3)), cfg)
    with pytest.raises(CheckpointError, match="lacks entries starting with diffusion_model."):
        load_official(_file(d, "stage1.bin", {k: v for k, v in off.items() if not k.startswith("diffusion_model")}), cfg)
    good = _file(d, "good.bin", off)
    with pytest.raises(CheckpointError, match="4 temporal transformer blocks, the run 2"):
        load_official(good, build_config(preset="tiny", temporal_layers=2))
    with pytest.raises(CheckpointError, match="arch 'xpool'"):
        load_official(good, build_config(preset="tiny", arch="xpool"))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches.*holds the CLIP of preset 'tiny', the run uses 'vitb32'"):
        load_official(good, build_config(preset="vitb32"))
    m, g = load_official(good, cfg, state_dict=torch.load(good, weights_only=True))    # contents already read by the caller
    assert torch.equal(m.state_dict()["temporal.blocks.1.attn.in_proj_weight"], off["transformerClip.resblocks.1.attn.in_proj_weight"])
    assert not is_official({k: v for k, v in off.items() if not k.startswith("transformerClip.")})
