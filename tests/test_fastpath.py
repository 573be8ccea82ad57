"""The fast sampling path gives the plain path's numbers (on the CPU; GPU numbers in README)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from guided_diffusion.sample_util import optimize_for_sampling

from conftest import GOLDEN


@pytest.fixture(scope="module")
def forward_inputs():
    f = np.load(GOLDEN / "forward.npz")
    return torch.from_numpy(f["x"]), torch.from_numpy(f["t"]), f["out"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_channels_last_same_output(golden_model, forward_inputs):
    x, t, want = forward_inputs
    model = golden_model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            out = model(x.to(memory_format=torch.channels_last), t)
    finally:
        golden_model.to(memory_format=torch.contiguous_format)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_compiled_equals_eager(golden_model, forward_inputs):
    x, t, want = forward_inputs
    args = argparse.Namespace(compile=True, compile_mode="default", channels_last=True)
    fast = optimize_for_sampling(golden_model, args, torch.device("cpu"))
    with torch.no_grad():
        out = fast(x, t)
        eager = golden_model(x, t)
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
