"""`diffret bench train` and `diffret bench loader` (diffusionret_nb.bench_train): the records' fields and sane values,
FLOPs against hand counts, every arch and stage 2, named errors for bad options, the loader bench on a tiny cache.
Fast: the tiny preset, batch 2, one step, one thread. No timing is asserted beyond being positive."""
import json

import pytest
import torch

from diffusionret_nb.bench_train import (STAGE2, bench_loader, bench_loader_main, bench_train, bench_train_main, count_flops,
                                         format_table, loader_verdict, matmul_peak, mfu, usable_cores)
from diffusionret_nb.core import ConfigError
from diffusionret_nb.registry import ARCHS

FIELDS = {"arch", "stage", "precision", "batch", "step_ms", "samples_per_s", "peak_mib", "rss_mib", "flops_per_step",
          "gflop_per_sample", "matmul_gflops", "mfu_pct", "load_avg", "threads", "device", "preset"}


@pytest.fixture(scope="module")
def recs(one_thread):
    return bench_train(preset="tiny", batch=2, stage2_batch=4, steps=1, warmup=0, threads=1, matmul_n=256, verbose=False)


def test_every_arch_and_stage2_run(recs):
    assert [r["arch"] for r in recs] == [*ARCHS, STAGE2]
    assert [r["stage"] for r in recs] == [1] * len(ARCHS) + [2]
    assert [r["batch"] for r in recs] == [2] * len(ARCHS) + [4]


def test_records_have_the_fields_and_sane_values(recs):
    for r in recs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["flops_per_step"] > 0 and r["matmul_gflops"] > 0
        assert 0 < r["mfu_pct"] and r["peak_mib"] >= 0 and r["rss_mib"] > 0
        assert r["precision"] == "fp32" and r["device"] == "cpu" and r["threads"] == 1
        assert r["samples_per_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3), rel=1e-2)
        assert r["gflop_per_sample"] == pytest.approx(r["flops_per_step"] / r["batch"] / 1e9, abs=1e-3)
        assert r["mfu_pct"] == pytest.approx(mfu(r["flops_per_step"], r["step_ms"] / 1e3, r["matmul_gflops"] * 1e9), rel=2e-2)
        assert r["step_cpu_ms"] > 0 and r["matmul_gflops_cpu"] > 0 and r["mfu_cpu_pct"] > 0      # the CPU-seconds form
    s1 = [r["gflop_per_sample"] for r in recs if r["stage"] == 1]
    assert max(s1) / min(s1) < 1.2        # CLIP's encoders are nearly all of the work of every arch
    assert len(format_table(recs).splitlines()) == len(recs) + 1


def test_flops_of_a_linear_layer_by_hand():
    lin, n, d_in, d_out = torch.nn.Linear(16, 8), 4, 16, 8
    assert count_flops(lambda: lin(torch.randn(n, d_in, requires_grad=True)).sum().backward())[1] == 6 * n * d_in * d_out
    assert count_flops(lambda: lin(torch.randn(n, d_in)).sum().backward())[1] == 4 * n * d_in * d_out
    assert count_flops(lambda: lin(torch.randn(n, d_in)))[1] == 2 * n * d_in * d_out


def test_attention_is_counted_on_the_cpu():
    q = torch.randn(2, 4, 10, 16)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[1] == 2 * (2 * 2 * 4 * 10 * 10 * 16)


def test_flops_per_sample_do_not_depend_on_the_batch(one_thread):
    a, b = (bench_train(["clip4clip_meanp"], preset="tiny", batch=bs, steps=1, warmup=0, matmul_n=256, verbose=False)[0] for bs in (1, 3))
    assert a["gflop_per_sample"] == pytest.approx(b["gflop_per_sample"], rel=1e-2)


def test_matmul_peak_and_mfu():
    p = matmul_peak(n_max=128, repeats=1)
    assert p["flops_per_s"] > 0 and p["n"] == 128
    assert mfu(10e9, 1.0, 20e9) == pytest.approx(50.0)


@pytest.mark.parametrize("kw, msg", [
    (dict(archs=["diffusionret", "clip5"]), "unknown arch 'clip5'"),
    (dict(archs=[]), "--archs"),
    (dict(batch=0), "--batch must be an integer >= 1, got 0"),
    (dict(stage2_batch=1), "--stage2-batch must be an integer >= 2"),
    (dict(steps=0), "--steps must be"),
    (dict(precision="int8"), "--precision must be"),
    (dict(preset="huge"), "unknown model preset 'huge'"),
    (dict(cpu_kernels="mkl"), "--cpu-kernels must be torch or onednn; got 'mkl'"),
])
def test_bad_options_give_named_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg): bench_train(**{"preset": "tiny", **kw}, verbose=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_named_error(capsys):
    with pytest.raises(ConfigError, match="CUDA is not available"): bench_train(preset="tiny", device="cuda", verbose=False)
    assert bench_train_main(["--device", "cuda", "--preset", "tiny"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert bench_loader_main(["--device", "cuda", "--preset", "tiny"]) == 2


def test_command_writes_json_and_exits_2_on_bad_options(tmp_path, capsys, one_thread):
    out = tmp_path / "t.json"
    assert bench_train_main(["--archs", "xpool", "--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
                             "--threads", "1", "--matmul-n", "256", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert [r["arch"] for r in recs] == ["xpool"] and recs[0]["batch"] == 2
    assert "xpool" in capsys.readouterr().out
    assert bench_train_main(["--archs", "nope", "--preset", "tiny"]) == 2
    assert "unknown arch 'nope'" in capsys.readouterr().err
    assert bench_train_main(["--batch", "0", "--preset", "tiny"]) == 2
    assert "--batch must be" in capsys.readouterr().err


def test_loader_bench_on_a_tiny_cache(tmp_path, one_thread):
    res = bench_loader((0, 1), preset="tiny", batch=2, n_clips=4, batches=2, model_clips_per_s=1.0, cache_root=tmp_path,
                       verbose=False)
    assert [r["num_workers"] for r in res["loader"]] == [0, 1]
    for r in res["loader"]:
        assert r["clips_per_s"] > 0 and r["clips"] == 4 and r["batches"] == 2 and r["pin_memory"] is False
    assert res["n_clips"] == 4 and res["model_source"] == "given"
    assert res["feeds"] == (res["feeds_at"] is not None)
    assert "clips/s" in loader_verdict(res)
    assert list(tmp_path.glob("synthetic/*/frame_cache/s48-t12-reference-1fps/index.json"))    # the cache `prepare` builds
    slow = bench_loader((0,), preset="tiny", batch=2, n_clips=4, batches=1, model_clips_per_s=1e12, cache_root=tmp_path, verbose=False)
    assert slow["feeds"] is False and slow["feeds_at"] is None and "does NOT keep up" in loader_verdict(slow)


def test_loader_bench_measures_the_model_when_not_given(tmp_path, one_thread):
    res = bench_loader((0,), preset="tiny", batch=2, n_clips=2, batches=1, model_steps=1, cache_root=tmp_path, verbose=False)
    assert res["model_clips_per_s"] > 0 and res["model_source"].startswith("bench_train diffusionret")


def test_loader_bad_options(tmp_path, capsys):
    with pytest.raises(ConfigError, match="at least 2 batches"):
        bench_loader((0,), preset="tiny", batch=4, n_clips=1, model_clips_per_s=1.0, cache_root=tmp_path, verbose=False)
    with pytest.raises(ConfigError, match="--workers"): bench_loader((-1,), preset="tiny", verbose=False)
    with pytest.raises(ConfigError, match="--model-clips-per-s"): bench_loader(preset="tiny", model_clips_per_s=0, verbose=False)
    assert bench_loader_main(["--workers", "0,x"]) == 2 and "--workers expects" in capsys.readouterr().err


def test_usable_cores():
    assert usable_cores() >= 1
