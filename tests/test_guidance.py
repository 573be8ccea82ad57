"""Classifier-free guidance, the classifier-guidance gradient and the null-class check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_diffusion.guidance import classifier_cond_fn, classifier_free_guidance, has_null_class
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.unet import UNetModel

NUM_CLASSES = 3


class LabelModel:
    """eps = 0.1 x + 0.05 (y + 1) + t / 1000 and log-variance channels 0.01 y; counts calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y=None, **kwargs):
        self.batches.append(x.shape[0])
        yy = (y.float() + 1).view(-1, 1, 1, 1)
        eps = 0.1 * x + 0.05 * yy + t.float().view(-1, 1, 1, 1) / 1000
        return torch.cat([eps, 0.01 * yy.expand_as(x)], dim=1)


def _inputs(n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return x, torch.full((n,), 7), torch.tensor([0, 2, 1, 2][:n])


def test_guided_eps_is_one_batched_call():
    model = LabelModel()
    x, t, y = _inputs()
    out = classifier_free_guidance(model, 3.0, null_class=NUM_CLASSES)(x, t, y=y)
    assert model.batches == [8]  # one call on the doubled batch
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])  # the learned variance of the conditional half


def test_unit_scale_is_the_conditional_model():
    model = LabelModel()
    x, t, y = _inputs()
    out = classifier_free_guidance(model, 1.0, null_class=NUM_CLASSES)(x, t, y=y)
    assert model.batches == [4]
    assert torch.equal(out, model(x, t, y))


def test_eps_scaling_applies_after_guidance():
    """p_mean_variance divides the GUIDED eps by lambda before x_0 is predicted."""
    d = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, timestep_respacing="10", eps_scaler=1.02
    )
    x, _, y = _inputs()
    i = 6
    t = torch.full((4,), i)
    model_fn = classifier_free_guidance(LabelModel(), 2.5, null_class=NUM_CLASSES)
    out = d.p_mean_variance(model_fn, x, t, clip_denoised=False, model_kwargs={"y": y})
    guided = model_fn(x, torch.full((4,), d.timestep_map[i]), y=y)[:, :3]
    ab = d.alphas_cumprod[i]
    want = np.sqrt(1 / ab) * x - np.sqrt(1 / ab - 1) * guided / 1.02
    torch.testing.assert_close(out["pred_xstart"], want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["eps"], guided)  # the raw (guided) network eps


def test_guidance_on_a_unet_with_null_class():
    kw = dict(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(),
        num_classes=NUM_CLASSES,
    )
    with_null = UNetModel(**kw, null_class=True).eval()
    without = UNetModel(**kw).eval()
    assert has_null_class(with_null, NUM_CLASSES) and not has_null_class(without, NUM_CLASSES)
    assert has_null_class(with_null.state_dict(), NUM_CLASSES)
    assert not has_null_class(without.state_dict(), NUM_CLASSES)
    assert not has_null_class({"out.2.weight": torch.zeros(1)}, NUM_CLASSES)  # unconditional
    x, t, y = _inputs()
    x = x.repeat(1, 1, 2, 2)
    with torch.no_grad():
        out = classifier_free_guidance(with_null, 2.0, NUM_CLASSES)(x, t, y=y)
        cond = with_null(x, t, y)
        uncond = with_null(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out[:, :3], 2 * cond[:, :3] - uncond[:, :3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a model with the null class 3"):
        classifier_free_guidance(without, 2.0, NUM_CLASSES)
    classifier_free_guidance(without, 1.0, NUM_CLASSES)  # w = 1 needs no null class
    with pytest.raises(ValueError, match="--guidance_scale must be a finite number"):
        classifier_free_guidance(with_null, float("nan"), NUM_CLASSES)


def test_classifier_cond_fn_matches_the_original_gradient(golden_classifier, guidance_npz):
    g = guidance_npz
    d = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="10"
    )
    x, y = torch.from_numpy(g["x_t"]), torch.from_numpy(g["y"])
    t = torch.full((x.shape[0],), int(g["step"]))
    cond_fn = classifier_cond_fn(golden_classifier, float(g["classifier_scale"]))
    grad = d.condition_mean(cond_fn, {"mean": torch.zeros_like(x), "variance": 1.0}, x, t, {"y": y})
    np.testing.assert_allclose(grad.numpy(), g["p_sample_cond_grad"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -5.0])
def test_classifier_scale_is_checked(scale, golden_classifier):
    with pytest.raises(ValueError, match="--classifier_scale must be a finite number >= 0"):
        classifier_cond_fn(golden_classifier, scale)
