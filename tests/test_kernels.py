"""Training with `-p cpu_kernels=onednn` (nbs/07_kernels): every linear layer through oneDNN's float32 CPU kernels gives
a stage-1 run and a stage-2 step of torch's kernels to float32 rounding; the choice is a runtime key (a run resumes
across it) and a bad value a named error."""
import copy

import pytest
import torch

from diffusionret_nb import pipeline
from diffusionret_nb.config import build_config, load_paramset, params_dict
from diffusionret_nb.core import ConfigError
from diffusionret_nb.kernels import onednn_available
from diffusionret_nb.training import params_differ

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(load_paramset("demo"), syn_n_train=48, syn_n_val=12, syn_n_test=24, epochs=2, batch_size=16, lr=1e-3, n_frames=4,
            stage2_epochs=2, rerank_topk=8, diff_steps=10, diff_eval_steps=10, eval_untrained=False)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernel")
def test_onednn_kernels_train_stage1_the_same_to_rounding(tmp_path):
    cfg = dict(TINY, stage2=False)
    m = {k: pipeline.train_eval(build_config(**cfg, cpu_kernels=k), tmp_path / k, progress=False) for k in ("torch", "onednn")}
    a, b = (torch.load(tmp_path / k / "checkpoints" / "last.pt", weights_only=True) for k in ("torch", "onednn"))
    assert a["step"] == b["step"] > 0
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-3)
    assert a["model"].keys() == b["model"].keys()                       # the same state dict: checkpoints interchange
    # (the weights are not compared element by element: parameters whose gradient is 0 in exact arithmetic -- the
    # weight networks' last bias, the attention's key bias: softmax ignores a shift -- take Adam steps of size lr on
    # rounding noise alone, differently in any two float32 runs; the 01_clip notebook checks one step's gradients)
    one_query = 100 / TINY["syn_n_test"]                               # R@1 in %: at most one test query apart
    for d in ("t2v", "v2t"):
        assert m["onednn"][d]["R@1"] == pytest.approx(m["torch"][d]["R@1"], abs=one_query + 1e-9)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernel")
def test_onednn_kernels_give_the_generator_step_to_rounding():
    "Stage 2 end to end would compare two stage-1 models (mined candidates can differ); one step on the same batch instead."
    from diffusionret_nb.bench_train import stage2_batch
    from diffusionret_nb.kernels import OneDNNLinear, use_onednn
    from diffusionret_nb.registry import create_model
    torch.manual_seed(0)
    cfg = build_config(**TINY)
    gen = create_model(cfg, stage=2); gen1 = copy.deepcopy(gen)
    assert use_onednn(gen1) > 0 and any(isinstance(x, OneDNNLinear) for x in gen1.modules())
    batch = stage2_batch(gen.dim, 16, 4)
    out = []
    for g in (gen, gen1):
        g.train(); torch.manual_seed(1)                                   # the same timesteps and noise
        loss = g(dict(batch))["loss"]; loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    assert l1 == pytest.approx(l0, rel=1e-5) and g0.keys() == g1.keys() and g0
    for n in g0: torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-6)


def test_cpu_kernels_is_a_runtime_choice():
    assert params_differ(params_dict(build_config(**TINY)), params_dict(build_config(**TINY, cpu_kernels="onednn"))) == []
    with pytest.raises(ConfigError, match="cpu_kernels"):
        build_config(**TINY, cpu_kernels="mkl")
