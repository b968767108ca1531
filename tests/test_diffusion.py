"""The DDIM and DDPM steps, and whole sampling loops, against diffusers' schedulers configured the same
way (same betas, the network predicting x0, same clipping, same spacing, same noise). diffusers is a
test-only dependency (requirements-test.txt); without it these tests skip."""
import numpy as np
import pytest
import torch

from diffusionret_nb.core import ConfigError
from diffusionret_nb.diffusion import DDIMSampler, DDPMSampler, GaussianDiffusion, make_betas, spaced_timesteps

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only dependency: pip install --no-deps -r requirements-test.txt")


pytestmark = pytest.mark.usefixtures("one_thread")


def _schedulers(diff, name, spacing, eta=0.0, clip=True):
    "(ours, diffusers') configured identically."
    common = dict(num_train_timesteps=diff.num_steps, trained_betas=diff.betas.numpy().tolist(), prediction_type="sample",
                  clip_sample=clip, clip_sample_range=1.0, timestep_spacing=spacing)
    if name == "ddim":
        return (DDIMSampler(diff.alphas_cumprod, eta=eta, clip_sample=clip, spacing=spacing),
                diffusers.DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0))
    return (DDPMSampler(diff.alphas_cumprod, clip_sample=clip, spacing=spacing),
            diffusers.DDPMScheduler(**common, variance_type="fixed_small"))


def _model(x, t):
    "A deterministic stand-in network whose x0 prediction leaves [-1, 1] now and then (clipping matters)."
    return 1.5 * torch.tanh(2 * x + 0.01 * float(t)) + 0.3 * torch.sin(x)


# regular spacings, where diffusers' "t - K // n" is also the next timestep of the list
CASES = [("linspace", 50, 50), ("leading", 50, 10), ("trailing", 50, 10), ("trailing", 50, 1), ("leading", 1000, 50)]


@pytest.mark.parametrize("schedule,scale", [("cosine", 1.0), ("linear", 1.0), ("cosine", 0.5)])
@pytest.mark.parametrize("spacing,K,n", CASES)
@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", None)])
def test_sampling_loop_matches_diffusers(schedule, scale, spacing, K, n, name, eta):
    diff = GaussianDiffusion(num_steps=K, schedule=schedule, beta_scale=scale)
    ours, theirs = _schedulers(diff, name, spacing, eta or 0.0)
    ours.set_timesteps(n); theirs.set_timesteps(n)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    a = b = x0
    for t in ours.timesteps:
        g1, g2 = torch.Generator().manual_seed(int(t)), torch.Generator().manual_seed(int(t))
        extra = dict(eta=eta, use_clipped_model_output=True) if name == "ddim" else {}
        oa = ours.step(_model(a, t), t, a, generator=g1)
        ob = theirs.step(_model(b, t), t, b, generator=g2, **extra)
        torch.testing.assert_close(oa.pred_original_sample, ob.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(oa.prev_sample, ob.prev_sample, rtol=1e-4, atol=1e-4)
        a, b = oa.prev_sample, ob.prev_sample


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_single_step_matches_diffusers_without_clipping(name):
    "Every timestep of a 50-step schedule, one step each, clipping off: the raw formulas agree."
    diff = GaussianDiffusion(num_steps=50)
    ours, theirs = _schedulers(diff, name, "linspace", 0.0, clip=False)
    ours.set_timesteps(50); theirs.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    for t in range(50):
        x, out = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
        noise = torch.randn(4, 16, generator=g)
        oa = ours.step(out, t, x, variance_noise=noise)
        if name == "ddim": ob = theirs.step(out, t, x, eta=0.0)
        else: ob = theirs.step(out, t, x, generator=torch.Generator().manual_seed(5))
        if name == "ddpm" and t > 0:   # diffusers draws its own noise: compare the mean, then the noise scale
            ob_mean = theirs.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
            z = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
            sigma = (theirs._get_variance(t) ** 0.5)
            torch.testing.assert_close(oa.prev_sample - ours._coef[t]["sigma"] * noise, ob_mean - sigma * z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.tensor(ours._coef[t]["sigma"], dtype=torch.float32), sigma.float(), rtol=1e-4, atol=1e-7)
        else:
            torch.testing.assert_close(oa.prev_sample, ob.prev_sample, rtol=1e-4, atol=1e-5)


def test_cosine_betas_match_diffusers_squaredcos():
    s = diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(make_betas(50, "cosine"), s.betas.numpy(), rtol=1e-5, atol=1e-7)


def test_one_step_and_too_many_steps():
    diff = GaussianDiffusion(num_steps=50)
    assert diff.sampler("ddim").set_timesteps(1).timesteps.tolist() == [49]
    with pytest.raises(ConfigError, match="diff_eval_steps"):
        diff.sampler("ddim").set_timesteps(51)
    assert spaced_timesteps(10, 10).tolist() == list(range(9, -1, -1))


def test_schedule_moves_with_the_module():
    diff = GaussianDiffusion(num_steps=10).to(torch.float64)
    assert diff.alphas_cumprod.dtype == torch.float64
    k = torch.tensor([0, 9])
    x = diff.q_sample(torch.ones(2, 3, dtype=torch.float64), k, torch.zeros(2, 3, dtype=torch.float64))
    assert x.dtype == torch.float64
    torch.testing.assert_close(x[:, 0], diff.alphas_cumprod[k].sqrt())
