"""The shared UNet training recipe (generator.recipe) used by the 2D and volume trainers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from generator.recipe import denoising_loss, denoising_target, unet_ema, warmup_cosine


@pytest.fixture()
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")


@pytest.mark.parametrize("shape", [(4, 2, 8, 8), (4, 2, 4, 4, 4)])  # images and volumes
def test_targets_follow_the_prediction_type(scheduler, shape):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(denoising_target(scheduler, x0, noise, t, "epsilon"), noise)
    ac = scheduler.alphas_cumprod[t].view(-1, *[1] * (len(shape) - 1))
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x0
    torch.testing.assert_close(denoising_target(scheduler, x0, noise, t, "v_prediction"), v)


def test_plain_loss_is_per_sample_mse(scheduler):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([5, 50, 900])
    expected = ((pred - target) ** 2).flatten(1).mean(1)
    for gamma in (None, 0):
        torch.testing.assert_close(denoising_loss(pred, target, t, scheduler, "epsilon", gamma), expected)
    half = denoising_loss(pred.bfloat16(), target.bfloat16(), t, scheduler, "epsilon", None)
    assert half.dtype == torch.float32


def test_min_snr_weights(scheduler):
    """Low-noise steps (SNR > gamma) are down-weighted to gamma / SNR (epsilon) or gamma / (SNR + 1)
    (v); high-noise steps keep weight 1 (epsilon) or SNR / (SNR + 1) (v)."""
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)  # per-sample MSE 1
    t = torch.tensor([1, 999])
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert snr[0] > 5 > snr[1]
    eps = denoising_loss(pred, target, t, scheduler, "epsilon", 5.0)
    torch.testing.assert_close(eps, torch.stack([5.0 / snr[0], torch.tensor(1.0)]).float(), rtol=1e-4, atol=1e-6)
    v = denoising_loss(pred, target, t, scheduler, "v_prediction", 5.0)
    torch.testing.assert_close(v, torch.stack([5.0 / (snr[0] + 1), snr[1] / (snr[1] + 1)]).float(),
                               rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_named(scheduler):
    x = torch.zeros(1, 1, 2, 2)
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="prediction_type.*'sample'"):
        denoising_target(scheduler, x, x, t, "sample")
    with pytest.raises(ValueError, match="prediction_type"):
        denoising_loss(x, x, t, scheduler, "x0", None)
    with pytest.raises(ValueError, match="snr_gamma.*-1"):
        denoising_loss(x, x, t, scheduler, "epsilon", -1.0)


def test_warmup_cosine():
    total, warmup = 1000, 100
    factors = [warmup_cosine(s, total, warmup) for s in range(total + 5)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:100], factors[1:100]))  # rises during warm-up
    assert all(a >= b for a, b in zip(factors[100:], factors[101:]))  # then only falls
    assert factors[total] == pytest.approx(0.1) and factors[-1] == pytest.approx(0.1)
    # a short run warms up for a tenth of its steps
    assert warmup_cosine(0, 50, 100) == pytest.approx(0.2) and warmup_cosine(4, 50, 100) == pytest.approx(1.0)


def test_unet_ema_warms_up_then_holds_its_decay():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = unet_ema(net, 0.9)
    decays = []
    for _ in range(200):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.step(net.parameters())
        decays.append(ema.cur_decay_value)
    assert decays[1] < 0.5 and decays[-1] == pytest.approx(0.9)  # short memory first, the set decay later
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    # the shadow trails the weights by about decay / (1 - decay) steps of +1 once warmed up
    assert float(net.weight.detach()[0, 0] - ema.shadow_params[0][0, 0]) == pytest.approx(9.0, abs=0.5)
    with pytest.raises(ValueError, match="ema_decay.*1.5"):
        unet_ema(net, 1.5)


def test_step_plan_fits_the_schedule_to_the_clock():
    from generator.recipe import SCHEDULE_FITS, StepPlan

    plan = StepPlan(total=10**7, deadline=100.0)  # 100 s of training from t = 0, 2 steps per second
    plan.begin(0, 0.0)
    fits = []
    for step in range(1, 10**4):
        now = step / 2.0
        if plan.due(step):
            plan.refit(plan.estimate(step, now), step, now)
            fits.append((step, plan.total))
        if step >= plan.total:
            break
    assert len(fits) == SCHEDULE_FITS and fits[0][0] == 20
    assert all(190 <= total <= 200 for _, total in fits)  # 2 steps/s for 100 s, a 3% margin
    assert StepPlan(total=50).due(20) is False  # no deadline: the plan never changes
    assert StepPlan(total=50).estimate(10, 1.0) == 50
