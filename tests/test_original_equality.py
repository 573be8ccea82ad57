"""Equality with stored outputs of the original guided-diffusion code (issue 21).

``fixtures/original/`` was computed once with the original (PyPI's guided-diffusion-sdk
1.0.0, Epsilon Scaling applied once by a model wrapper; the harness reproduces
``golden_small``, computed with the original ADM-ES code, to 6e-6): classifier-guided DDIM
loops, ``calc_bpd_loop`` at lambda = 0.985, and the parameter names of every public
function. ``fixtures/make_original_fixtures.py`` says how.
"""

from __future__ import annotations

import argparse
import inspect
import json

import numpy as np
import pytest
import torch

from guided_diffusion import script_util
from guided_diffusion.guidance import classifier_cond_fn

from conftest import FIXTURES

ORIGINAL = FIXTURES / "original"
META = json.loads((ORIGINAL / "original.json").read_text())
REL_TOL = 1e-5  # fp32, relative to the largest entry


def assert_rel_close(actual, expected, tol=REL_TOL, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    dev = np.abs(actual - expected).max() / np.abs(expected).max()
    assert dev <= tol, f"{what}: max deviation {dev:.2e} of the largest entry (tolerance {tol})"


@pytest.fixture(scope="module")
def guided_npz():
    return dict(np.load(ORIGINAL / "guided_ddim.npz"))


@pytest.mark.parametrize("case", sorted(META["guided_ddim"]["cases"]))
def test_guided_ddim_loop_matches_the_original(
    case, guided_npz, golden_model, golden_flags, golden_classifier
):
    c = META["guided_ddim"]["cases"][case]
    diffusion = script_util.create_gaussian_diffusion(
        steps=golden_flags["diffusion_steps"],
        learn_sigma=True,
        noise_schedule=golden_flags["noise_schedule"],
        timestep_respacing=c["timestep_respacing"],
        rescale_timesteps=c["rescale_timesteps"],
        eps_scaler=c["eps_scaler"],
        eps_scaler_k=c["eps_scaler_k"],
    )
    assert diffusion.timestep_map == c["timestep_map"]

    def model_fn(x, t, y=None):  # classifier_sample.py's, for an unconditional model
        return golden_model(x, t)

    g = guided_npz
    steps = diffusion.ddim_sample_loop_progressive(
        model_fn,
        (3, 3, 16, 16),
        noise=torch.from_numpy(g["x_T"]),
        clip_denoised=True,
        cond_fn=classifier_cond_fn(golden_classifier, c["classifier_scale"]),
        model_kwargs={"y": torch.from_numpy(g["y"])},
        device="cpu",
        eta=0.0,
    )
    traj = [out["sample"].numpy() for out in steps]
    assert len(traj) == len(g[f"{case}_traj"])
    for r, (ours, original) in enumerate(zip(traj, g[f"{case}_traj"])):
        assert_rel_close(ours, original, what=f"{case} after step {r}")
    assert_rel_close(traj[-1], g[f"{case}_sample"], what=f"{case} final sample")


def test_calc_bpd_loop_at_lambda_0985_matches_the_original(golden_model):
    meta = META["calc_bpd_loop"]
    ref = np.load(ORIGINAL / "calc_bpd_loop.npz")
    diffusion = script_util.create_gaussian_diffusion(
        **meta["create_gaussian_diffusion"], eps_scaler=meta["cases"]["b0985"]
    )
    assert diffusion.rescale_timesteps and diffusion.num_timesteps == 1000

    def eps_only(x, t):  # sigma_small, learn_sigma False: the eps half of the golden UNet
        return golden_model(x, t)[:, :3]

    out = diffusion.calc_bpd_loop(
        eps_only,
        torch.from_numpy(ref["x_start"]),
        clip_denoised=False,
        generator=torch.Generator().manual_seed(2100),  # the fixture's noise stream
    )
    assert sorted(out) == sorted(k[len("b0985_") :] for k in ref.files if k.startswith("b0985_"))
    for key, value in out.items():
        np.testing.assert_allclose(value.numpy(), ref[f"b0985_{key}"], rtol=1e-5, atol=1e-7)
    # lambda reaches the bound: the lambda = 1 terms differ well beyond the tolerance
    assert np.abs(ref["b0985_mse"] - ref["b1_mse"]).max() > 1e-3


# ------------------------------------------------------------------ signatures


def _ours(key: str):
    import importlib

    mod, *path = key.split(".")
    obj = importlib.import_module(f"guided_diffusion.{mod}")
    for name in path:
        obj = getattr(obj, name)
    return obj


SIGNATURES = json.loads((ORIGINAL / "signatures.json").read_text())["parameters"]


def test_signature_fixture_covers_the_apis_forks_call():
    for key in (
        "script_util.add_dict_to_argparser",
        "respace.SpacedDiffusion.condition_mean",
        "respace.SpacedDiffusion.condition_score",
        "gaussian_diffusion.GaussianDiffusion.ddim_sample_loop",
        "script_util.create_model_and_diffusion",
        "unet.UNetModel.__init__",
    ):
        assert key in SIGNATURES


@pytest.mark.parametrize("key", sorted(SIGNATURES))
def test_parameter_names_are_the_originals(key):
    """Every original parameter, in the original order, under its original name: ours may
    only add optional parameters after them. The sampling loops that take guided-diffusion's
    positional arguments through ``*args`` bind them to the original names in order."""
    from guided_diffusion import diffusion_sampling as ds

    original = SIGNATURES[key]
    params = list(inspect.signature(_ours(key)).parameters.values())
    names = [p.name for p in params]
    if key.endswith("_sample_loop") or key.endswith("_sample_loop_progressive"):
        positional = ds._DDIM_POSITIONAL if ".ddim_" in key else ds._DDPM_POSITIONAL
        assert names[:3] == original[:3] and params[3].kind == inspect.Parameter.VAR_POSITIONAL
        assert list(positional) == original[3:]
        return
    assert names[: len(original)] == original, f"{key}: {names} vs the original's {original}"
    for p in params[len(original) :]:
        assert p.default is not inspect.Parameter.empty or p.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ), f"{key}: extra parameter {p.name} must be optional"
    if original[-2:] == ["args", "kwargs"]:
        assert [p.kind for p in params[-2:]] == [
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ]


def test_the_original_call_forms(golden_model, golden_classifier):
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, default_dict={"eps_scaler": 1.0, "use_ddim": False})
    args = parser.parse_args(["--eps_scaler", "1.017", "--use_ddim", "True"])
    assert (args.eps_scaler, args.use_ddim) == (1.017, True)

    diffusion = script_util.create_gaussian_diffusion(
        learn_sigma=True, noise_schedule="cosine", timestep_respacing="ddim10"
    )
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 6)
    kwargs = {"y": torch.tensor([1, 2])}
    cond_fn = classifier_cond_fn(golden_classifier, 2.0)
    with torch.no_grad():
        out = diffusion.p_mean_variance(
            lambda x, t, y=None: golden_model(x, t), x, t, model_kwargs=kwargs
        )
    by_position = diffusion.condition_mean(cond_fn, out, x, t, kwargs)
    by_keyword = diffusion.condition_mean(cond_fn, p_mean_var=out, x=x, t=t, model_kwargs=kwargs)
    assert torch.equal(by_position, by_keyword)
    assert not torch.equal(by_position, out["mean"])
    score = diffusion.condition_score(cond_fn, out, x, t, kwargs)
    assert torch.equal(
        score["pred_xstart"],
        diffusion.condition_score(cond_fn, out, x, t, model_kwargs=kwargs)["pred_xstart"],
    )
