"""The sampling fast path (guided_diffusion.fast_path) against the original's numbers.

The default path (channels-last, chunked batched-matmul attention, fp32) must give the
original's outputs within 1e-5; the bf16 path stays within its stated tolerance
(``BF16_*`` below, measured on this fixture model and on the trained Fashion-MNIST model).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import fast_path
from guided_diffusion.fast_path import (
    SamplingModel,
    cpu_supports_fast_bf16,
    optimize_for_sampling,
)
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.unet import set_attention_impl

from conftest import GOLDEN

CPU = torch.device("cpu")
# The stated tolerance of the bf16 trunk against fp32. UNet output, relative L2 error:
# measured 1.7e-2 on this random-weight fixture, 3e-3 on the trained Fashion-MNIST model.
# Final samples in [-1, 1]: mean |difference| (0.02 = 2.5 uint8 levels) and relative L2 error;
# measured here (10-step DDIM) 4.6e-3 and 5.3e-2, on the trained model (20 steps, DDPM and
# DDIM) 7-8e-3 and 2-3e-2.
BF16_OUTPUT_TOL = 3e-2
BF16_SAMPLE_MEAN_ABS_TOL = 2e-2
BF16_SAMPLE_TOL = 1e-1


def _rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def forward_inputs():
    f = np.load(GOLDEN / "forward.npz")
    return torch.from_numpy(f["x"]), torch.from_numpy(f["t"]), f["out"]


def _ddim10(model, diffusion_npz) -> torch.Tensor:
    x_T = torch.from_numpy(diffusion_npz["loop_x_T"])
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="10"
    )
    with torch.inference_mode():
        return diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T, eta=0.0)


def test_default_path_equals_original(golden_model, forward_inputs):
    x, t, want = forward_inputs
    model = copy.deepcopy(golden_model)
    fast = optimize_for_sampling(model, device=CPU)
    assert fast.channels_last and model.input_blocks[0][0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        out = fast(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_default_path_equals_plain_path_in_a_sampling_loop(golden_model, diffusion_npz):
    plain = copy.deepcopy(golden_model)
    set_attention_impl(plain, "einsum")  # the original's computation, contiguous, fp32
    fast = optimize_for_sampling(copy.deepcopy(golden_model), device=CPU)
    want = _ddim10(plain, diffusion_npz)
    got = _ddim10(fast, diffusion_npz)  # the device comes from fast.parameters()
    assert _rel_err(got, want) < 1e-5
    np.testing.assert_allclose(got.numpy(), diffusion_npz["ddim_10_lam1p0_sample"], atol=5e-4)


def test_bf16_path_within_tolerance(golden_model, forward_inputs, diffusion_npz):
    x, t, want = forward_inputs
    model = copy.deepcopy(golden_model)
    fast = optimize_for_sampling(model, device=CPU, precision="bf16")
    assert model.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert model.out[2].weight.dtype == torch.float32  # the output head stays in fp32
    with torch.inference_mode():
        out = fast(x, t)
    assert out.dtype == torch.float32
    assert 1e-4 < _rel_err(out, want) < BF16_OUTPUT_TOL  # really bf16, and close
    sample = _ddim10(fast, diffusion_npz)
    want = torch.from_numpy(diffusion_npz["ddim_10_lam1p0_sample"])
    assert float((sample - want).abs().mean()) < BF16_SAMPLE_MEAN_ABS_TOL
    assert _rel_err(sample, want) < BF16_SAMPLE_TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_survives_every_layer(golden_model, batch):
    """No layer hands a channels-last map on in another layout (each flip costs copies; at
    batch 1 the attention residual used to lose the layout and GroupNorm then copied)."""
    model = copy.deepcopy(golden_model)
    fast = optimize_for_sampling(model, device=CPU)
    flipped = []

    def check(module, inputs, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1:
            if not out.is_contiguous(memory_format=torch.channels_last):
                flipped.append(type(module).__name__)

    for m in model.modules():
        m.register_forward_hook(check)
    with torch.inference_mode():
        fast(torch.randn(batch, 3, 16, 16), torch.full((batch,), 10))
    assert flipped == []


def test_fast_path_keeps_the_checkpoint_keys(golden_model):
    keys = list(golden_model.state_dict())
    model = copy.deepcopy(golden_model)
    fast = optimize_for_sampling(model, device=CPU, precision="bf16")
    assert fast.model is model and list(model.state_dict()) == keys


def test_contiguous_option(golden_model, forward_inputs):
    x, t, want = forward_inputs
    model = copy.deepcopy(golden_model)
    fast = optimize_for_sampling(model, device=CPU, channels_last=False)
    assert model.input_blocks[0][0].weight.is_contiguous()
    with torch.inference_mode():
        np.testing.assert_allclose(fast(x, t).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(precision="fp8"), "precision must be one of"),
        (dict(precision="fp16"), "fp16 needs a GPU"),
        (dict(compile=True, compile_mode="fastest"), "compile_mode must be one of"),
    ],
)
def test_bad_options_are_refused(golden_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimize_for_sampling(copy.deepcopy(golden_model), device=CPU, **kwargs)


def test_sampling_model_wraps_any_model():
    """The wrapper returns float32 in the default layout whatever the model computes in."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 1).to(torch.bfloat16)

        def forward(self, x, t):
            assert x.is_contiguous(memory_format=torch.channels_last)
            return self.conv(x.to(torch.bfloat16)) + t[:, None, None, None]

    net = Net().to(memory_format=torch.channels_last)
    wrapped = SamplingModel(net, channels_last=True)
    x = torch.randn(2, 2, 4, 4)
    t = torch.tensor([0.0, 1.0])
    out = wrapped(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, net(x.to(memory_format=torch.channels_last), t).float())
    assert next(wrapped.parameters()) is net.conv.weight


def _cpuinfo_says_bf16() -> bool:
    flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text()))
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_cpu_supports_fast_bf16_agrees_with_cpuinfo(monkeypatch):
    assert cpu_supports_fast_bf16() == _cpuinfo_says_bf16()
    # without torch's cpuinfo helpers it reads /proc/cpuinfo itself
    monkeypatch.delattr(fast_path.torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert cpu_supports_fast_bf16() == _cpuinfo_says_bf16()


def test_compiled_equals_eager(golden_model, forward_inputs):
    x, t, want = forward_inputs
    model = copy.deepcopy(golden_model)
    fast = optimize_for_sampling(model, device=CPU, compile=True)
    with torch.inference_mode():
        out = fast(x, t)
        eager = model(x, t)
    assert _rel_err(out, eager) < 1e-5
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_bf16_trunk_close_to_fp32(golden_flags, forward_inputs):
    from guided_diffusion.script_util import create_model_and_diffusion

    x, t, want = forward_inputs
    flags = dict(golden_flags, use_bf16=True)
    model, _ = create_model_and_diffusion(**flags)
    state = torch.load(GOLDEN / "model.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.convert_to_fp16(torch.bfloat16)  # load_state_dict copied fp32 values into bf16
    with torch.no_grad():
        out = model.eval()(x, t)
    assert out.dtype == torch.float32
    err = _rel_err(out, torch.from_numpy(want))
    assert 1e-5 < err < 3e-2  # really ran in bf16, and stayed close
