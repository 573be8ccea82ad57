"""GaussianDiffusion and Epsilon Scaling against the golden outputs of the original code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion

from conftest import load_json

DJSON = load_json("golden_small/diffusion.json")
CASES = {name: case for name, case in DJSON["cases"].items()}
RESPACINGS = ["10", "ddim10"]
LOOP_ATOL = 5e-4


def _case_flags(case: dict) -> dict:
    if case["kind"] == "constant":
        return {"eps_scaler": case["value"], "eps_scaler_k": 0.0}
    return {"eps_scaler": case["b"], "eps_scaler_k": case["k"]}


def make_diffusion(resp: str, case: str = "lam1p0", **kw):
    return create_gaussian_diffusion(
        steps=1000,
        learn_sigma=True,
        noise_schedule="cosine",
        timestep_respacing=resp,
        **_case_flags(CASES[case]),
        **kw,
    )


def _close(got: torch.Tensor, want: np.ndarray, atol: float, rtol: float = 1e-5):
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- schedules and respacing


@pytest.mark.parametrize("resp", RESPACINGS)
def test_respacing_matches_fixture(resp, diffusion_npz):
    d = make_diffusion(resp)
    np.testing.assert_array_equal(sorted(d.use_timesteps), diffusion_npz[f"{resp}_use_timesteps"])
    np.testing.assert_array_equal(d.timestep_map, diffusion_npz[f"{resp}_timestep_map"])
    np.testing.assert_allclose(d.betas, diffusion_npz[f"{resp}_betas"], rtol=1e-12)
    np.testing.assert_allclose(
        d.alphas_cumprod, diffusion_npz[f"{resp}_alphas_cumprod"], rtol=1e-12
    )


def test_space_timesteps_sections():
    assert space_timesteps(1000, "10") == set(range(0, 1000, 111))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert sorted(steps)[:10] == [round(i * 99 / 9) for i in range(10)]  # first section
    assert min(s for s in steps if s >= 100) == 100 and max(steps) == 299
    assert space_timesteps(1000, [1000]) == set(range(1000))


@pytest.mark.parametrize(
    "bad,match",
    [
        ("ddim999", "no integer stride"),
        ("abc", "invalid timestep_respacing"),
        ("2000", "cannot take"),
        ("ddimx", "expected ddimN"),
        ("0", "counts must be"),
    ],
)
def test_space_timesteps_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(1000, bad)


def test_training_betas_recomputed_from_alphas_cumprod(losses_npz):
    d = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine")
    np.testing.assert_allclose(d.betas, losses_npz["train_betas"], rtol=0, atol=1e-15)
    raw = gd.get_named_beta_schedule("cosine", 1000)
    np.testing.assert_array_equal(raw, losses_npz["train_betas_original"])


def test_linear_schedule_closed_form():
    b = gd.get_named_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b = gd.get_named_beta_schedule("linear", 4000)
    assert b[-1] == pytest.approx(0.005)
    with pytest.raises(NotImplementedError, match="unknown beta schedule"):
        gd.get_named_beta_schedule("sigmoid", 10)


# ---------------------------------------------------------------- Epsilon Scaling schedule


@pytest.mark.parametrize("resp", RESPACINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_lambda_schedule_matches_fixture(resp, case, diffusion_npz):
    d = make_diffusion(resp, case)
    np.testing.assert_allclose(d.eps_scale, diffusion_npz[f"{resp}_{case}_lambda"], rtol=1e-15)


@pytest.mark.parametrize("b,k", [(0.0, 0.0), (-1.0, 0.0), (1.0, -0.2), (float("nan"), 0.0)])
def test_nonpositive_lambda_is_refused(b, k):
    with pytest.raises(ValueError, match="must be positive"):
        create_gaussian_diffusion(steps=1000, timestep_respacing="10", eps_scaler=b, eps_scaler_k=k)


def test_lambda_error_names_step():
    # k = -0.2, b = 1 gives lambda_5 = 0 at the sixth step
    with pytest.raises(ValueError, match=r"lambda_5 = 0"):
        create_gaussian_diffusion(
            steps=1000, timestep_respacing="10", eps_scaler=1.0, eps_scaler_k=-0.2
        )


def test_eps_scaling_needs_eps_model():
    with pytest.raises(ValueError, match="eps-prediction"):
        create_gaussian_diffusion(steps=1000, predict_xstart=True, eps_scaler=1.01)
    create_gaussian_diffusion(steps=1000, predict_xstart=True)  # plain ADM is fine


# ---------------------------------------------------------------- one step: p_mean_variance


@pytest.mark.parametrize("resp", RESPACINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_p_mean_variance_matches_fixture(resp, case, golden_model, diffusion_npz):
    g = diffusion_npz
    d = make_diffusion(resp, case)
    x = torch.from_numpy(g["pmv_x_t"])
    gains = DJSON["respacings"][resp]["eps_gain_by_row"]
    for r, i in enumerate(g["step_order"]):
        t = torch.full((x.shape[0],), int(i))
        with torch.no_grad():
            out = d.p_mean_variance(golden_model, x, t, clip_denoised=True)
        atol = 1e-5 * max(1.0, gains[r])
        _close(out["eps"], g[f"pmv_{resp}_model_output"][r][:, :3], atol=1e-5)
        _close(out["variance"], g[f"pmv_{resp}_variance"][r], atol=1e-5)
        _close(out["log_variance"], g[f"pmv_{resp}_log_variance"][r], atol=1e-5)
        _close(out["pred_xstart"], g[f"pmv_{resp}_{case}_pred_xstart"][r], atol=atol)
        _close(out["mean"], g[f"pmv_{resp}_{case}_mean"][r], atol=atol)


def test_per_sample_timesteps_and_lambdas(golden_model, diffusion_npz):
    """A batch whose samples sit at different steps gets each sample's own lambda_i."""
    g = diffusion_npz
    d = make_diffusion("10", "linear")
    x = torch.from_numpy(g["pmv_x_t"])
    rows = [2, 7]  # one sample from each of two different steps
    t = torch.tensor([int(g["step_order"][r]) for r in rows])
    with torch.no_grad():
        out = d.p_mean_variance(golden_model, x, t)
    gains = DJSON["respacings"]["10"]["eps_gain_by_row"]
    for n, r in enumerate(rows):
        atol = 1e-5 * max(1.0, gains[r])
        _close(out["mean"][n], g["pmv_10_linear_mean"][r][n], atol=atol)
        _close(out["pred_xstart"][n], g["pmv_10_linear_pred_xstart"][r][n], atol=atol)


def test_unit_lambda_is_bitwise_plain_adm(golden_model, diffusion_npz):
    """b = 1, k = 0 gives exactly the plain ADM posterior mean, written out independently."""
    x = torch.from_numpy(diffusion_npz["pmv_x_t"])
    d = make_diffusion("10", "lam1p0")
    for i in (9, 4, 0):
        t = torch.full((2,), i)
        with torch.no_grad():
            out = d.p_mean_variance(golden_model, x, t)
            eps = golden_model(x, torch.full((2,), d.timestep_map[i]))[:, :3]

        def coef(arr, i=i):
            return torch.tensor(arr[i], dtype=torch.float32)

        x0 = coef(d.sqrt_recip_alphas_cumprod) * x - coef(d.sqrt_recipm1_alphas_cumprod) * eps
        x0 = x0.clamp(-1, 1)
        mean = coef(d.posterior_mean_coef1) * x0 + coef(d.posterior_mean_coef2) * x
        assert torch.equal(out["pred_xstart"], x0)
        assert torch.equal(out["mean"], mean)


def test_lambda_changes_the_result(golden_model, diffusion_npz):
    x = torch.from_numpy(diffusion_npz["pmv_x_t"])
    t = torch.full((2,), 3)
    with torch.no_grad():
        a = make_diffusion("10", "lam1p0").p_mean_variance(golden_model, x, t)
        b = make_diffusion("10", "lam1p017").p_mean_variance(golden_model, x, t)
    assert not torch.allclose(a["mean"], b["mean"])
    assert torch.equal(a["variance"], b["variance"])  # the learned variance is untouched


# ---------------------------------------------------------------- full loops


def _fixed_noise(noise: np.ndarray):
    it = iter(torch.from_numpy(noise))
    return lambda x: next(it)


@pytest.mark.parametrize("resp", RESPACINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_ddim_loop_matches_fixture(resp, case, golden_model, diffusion_npz):
    g = diffusion_npz
    d = make_diffusion(resp, case)
    x_T = torch.from_numpy(g["loop_x_T"])
    if case == "linear":
        steps = list(d.ddim_sample_loop_progressive(golden_model, x_T.shape, noise=x_T))
        for r, out in enumerate(steps):
            _close(out["sample"], g[f"ddim_{resp}_linear_traj"][r], atol=LOOP_ATOL)
            _close(out["pred_xstart"], g[f"ddim_{resp}_linear_traj_pred_xstart"][r], atol=LOOP_ATOL)
        sample = steps[-1]["sample"]
    else:
        sample = d.ddim_sample_loop(golden_model, x_T.shape, noise=x_T, eta=0.0)
    _close(sample, g[f"ddim_{resp}_{case}_sample"], atol=LOOP_ATOL)


@pytest.mark.parametrize("resp", RESPACINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_ddpm_loop_matches_fixture(resp, case, golden_model, diffusion_npz):
    g = diffusion_npz
    d = make_diffusion(resp, case)
    x_T = torch.from_numpy(g["loop_x_T"])
    noise_fn = _fixed_noise(g["ddpm_noise"])
    steps = list(d.p_sample_loop_progressive(golden_model, x_T.shape, noise=x_T, noise_fn=noise_fn))
    if case == "linear":
        for r, out in enumerate(steps):
            _close(out["sample"], g[f"ddpm_{resp}_linear_traj"][r], atol=LOOP_ATOL)
    _close(steps[-1]["sample"], g[f"ddpm_{resp}_{case}_sample"], atol=LOOP_ATOL)


def test_lambda_cases_differ_in_loops(diffusion_npz):
    """Guard: the fixture cases are far apart compared with the loop tolerance."""
    g = diffusion_npz
    a, b = g["ddim_10_lam1p017_sample"], g["ddim_10_linear_sample"]
    assert np.abs(a - b).max() > 20 * LOOP_ATOL


def test_sampling_is_reproducible_with_generator(golden_model):
    d = make_diffusion("10", "lam1p017")
    shape = (2, 3, 16, 16)
    a = d.p_sample_loop(golden_model, shape, generator=torch.Generator().manual_seed(3))
    b = d.p_sample_loop(golden_model, shape, generator=torch.Generator().manual_seed(3))
    c = d.p_sample_loop(golden_model, shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.0 + 1e-6


def test_ddim_eta_one_draws_noise(golden_model):
    d = make_diffusion("ddim10", "lam1p0")
    shape = (2, 3, 16, 16)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    det1 = d.ddim_sample_loop(golden_model, shape, noise=x_T, eta=0.0)
    det2 = d.ddim_sample_loop(
        golden_model, shape, noise=x_T, eta=0.0, generator=torch.Generator().manual_seed(9)
    )
    sto = d.ddim_sample_loop(
        golden_model, shape, noise=x_T, eta=1.0, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(det1, det2)
    assert not torch.allclose(det1, sto)


def test_ddim_reverse_then_forward_roundtrip(golden_model):
    """DDIM inversion of one step followed by one DDIM step nearly returns the input."""
    d = make_diffusion("ddim10", "lam1p0")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g) * 0.5
    t = torch.full((2,), 1)
    with torch.no_grad():
        x_next = d.ddim_reverse_sample(golden_model, x, t, clip_denoised=False)["sample"]
        back = d.ddim_sample(golden_model, x_next, t + 1, clip_denoised=False)["sample"]
    assert (back - x).abs().max() < (x_next - x).abs().max()
    with pytest.raises(ValueError, match="eta"):
        d.ddim_reverse_sample(golden_model, x, t, eta=0.5)


def test_start_step_resumes_mid_loop(golden_model, diffusion_npz):
    """Starting at step 4 from the trajectory's x_4 reproduces the rest of the trajectory."""
    g = diffusion_npz
    d = make_diffusion("10", "linear")
    x_T = torch.from_numpy(g["loop_x_T"])
    full = list(d.ddim_sample_loop_progressive(golden_model, x_T.shape, noise=x_T))
    r = 5  # row 5 is step i = 4
    part = list(
        d.sample_loop_progressive(
            golden_model, x_T.shape, sampler="ddim", noise=full[r]["x_t"], start_step=4
        )
    )
    assert len(part) == 5
    torch.testing.assert_close(part[-1]["sample"], full[-1]["sample"])


# ---------------------------------------------------------------- classifier guidance


def _model_fn(model):
    """The sampling scripts' model_fn: y goes to the classifier only (unconditional model)."""
    return lambda x, t, y=None: model(x, t)


def _cond_fn(classifier, scale):
    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


@pytest.mark.parametrize("case", ["lam1p0", "linear"])
def test_guided_p_sample_matches_fixture(case, golden_model, golden_classifier, guidance_npz):
    g = guidance_npz
    d = make_diffusion("10", case)
    x, y = torch.from_numpy(g["x_t"]), torch.from_numpy(g["y"])
    t = torch.full((x.shape[0],), int(g["step"]))
    assert d.timestep_map[int(g["step"])] == int(g["p_sample_t_original"])
    cond_fn = _cond_fn(golden_classifier, float(g["classifier_scale"]))
    grad = d.condition_mean(
        lambda x, t, y: cond_fn(x, t, y),
        {"mean": torch.zeros_like(x), "variance": 1.0},
        x,
        t,
        {"y": y},
    )
    _close(grad, g["p_sample_cond_grad"], atol=1e-5)
    out = d.p_sample(
        _model_fn(golden_model),
        x,
        t,
        cond_fn=cond_fn,
        model_kwargs={"y": y},
        noise=torch.from_numpy(g["p_sample_noise"]),
    )
    _close(out["pred_xstart"], g[f"p_sample_{case}_pred_xstart"], atol=1e-5)
    _close(out["variance"], g["p_sample_variance"], atol=1e-5)
    _close(out["mean"], g[f"p_sample_{case}_guided_mean"], atol=1e-5)
    _close(out["sample"], g[f"p_sample_{case}_sample"], atol=1e-5)


@pytest.mark.parametrize("case", ["lam1p0", "linear"])
def test_guided_ddim_scales_eps_exactly_once(case, golden_model, golden_classifier, guidance_npz):
    g = guidance_npz
    d = make_diffusion("ddim10", case)
    x, y = torch.from_numpy(g["x_t"]), torch.from_numpy(g["y"])
    t = torch.full((x.shape[0],), int(g["step"]))
    cond_fn = _cond_fn(golden_classifier, float(g["classifier_scale"]))
    kw = {"y": y}
    with torch.no_grad():
        unguided = d.p_mean_variance(_model_fn(golden_model), x, t, model_kwargs=kw)
    _close(unguided["pred_xstart"], g[f"ddim_{case}_pred_xstart_unguided"], atol=1e-5)
    guided = d.condition_score(cond_fn, unguided, x, t, model_kwargs=kw)
    out = d.ddim_sample(_model_fn(golden_model), x, t, cond_fn=cond_fn, model_kwargs=kw, eta=0.0)
    once = "scale_once_" if case == "linear" else ""
    _close(guided["pred_xstart"], g[f"ddim_{case}_{once}guided_pred_xstart"], atol=1e-4)
    _close(guided["mean"], g[f"ddim_{case}_{once}guided_mean"], atol=1e-5)
    _close(out["sample"], g[f"ddim_{case}_{once}sample"], atol=1e-5)
    if case == "linear":  # and not the original's double division
        assert np.abs(out["sample"].detach().numpy() - g["ddim_linear_sample"]).max() > 1e-4


# ---------------------------------------------------------------- training losses


def _loss_diffusion(learn_sigma: bool, eps_scaler: float = 1.0):
    return create_gaussian_diffusion(
        steps=1000, learn_sigma=learn_sigma, noise_schedule="cosine", eps_scaler=eps_scaler
    )


@pytest.mark.parametrize("case", ["hybrid", "mse", "hybrid_ip", "mse_ip"])
def test_training_losses_match_fixture(case, golden_model, losses_npz):
    g = losses_npz
    info = load_json("golden_small/losses.json")["cases"][case]
    learn_sigma = info["learn_sigma"]
    d = _loss_diffusion(learn_sigma)

    def model(x, t, **kw):
        out = golden_model(x, t, **kw)
        return out if learn_sigma else out[:, :3]

    with torch.no_grad():
        terms = d.training_losses(
            model,
            torch.from_numpy(g["x_start"]),
            torch.from_numpy(g["t"]),
            noise=torch.from_numpy(g["noise"]),
            input_perturbation=info["input_perturbation_gamma"],
            xi=torch.from_numpy(g["xi"]),
        )
    for term in info["terms"]:
        np.testing.assert_allclose(terms[term].numpy(), g[f"{case}_{term}"], rtol=1e-5, atol=1e-7)
    assert set(terms) == set(info["terms"])


def test_training_losses_ignore_eps_scaler(golden_model, losses_npz):
    """A diffusion built with any eps_scaler trains exactly like plain ADM (not the quirks)."""
    g = losses_npz
    args = (torch.from_numpy(g["x_start"]), torch.from_numpy(g["t"]))
    kw = dict(
        noise=torch.from_numpy(g["noise"]), input_perturbation=0.1, xi=torch.from_numpy(g["xi"])
    )
    with torch.no_grad():
        plain = _loss_diffusion(True, 1.0).training_losses(golden_model, *args, **kw)
        scaled = _loss_diffusion(True, 1.017).training_losses(golden_model, *args, **kw)
    for k in plain:
        assert torch.equal(plain[k], scaled[k])
        assert torch.isfinite(plain[k]).all()
    assert not np.allclose(g["quirk_hybrid_ip_asis_vb"], g["hybrid_ip_vb"])  # the original's fault


def test_input_perturbation_changes_x_t_only(golden_model, losses_npz):
    """DDPM-IP: the network is fed q_sample(x0, t, noise + gamma * xi); the target stays noise."""
    g = losses_npz
    d = _loss_diffusion(False)
    x0, t = torch.from_numpy(g["x_start"]), torch.from_numpy(g["t"])
    noise, xi = torch.from_numpy(g["noise"]), torch.from_numpy(g["xi"])
    seen = []

    def spy(x, tt):
        seen.append(x.clone())
        return noise  # a perfect eps model for the unperturbed target

    terms = d.training_losses(spy, x0, t, noise=noise, input_perturbation=0.1, xi=xi)
    _close(seen[0], g["hybrid_ip_x_t"], atol=1e-6)
    assert terms["mse"].abs().max() == 0  # the target is the noise, not noise + gamma * xi
    d.training_losses(spy, x0, t, noise=noise, input_perturbation=0.0, xi=xi)
    assert not torch.allclose(seen[1], seen[0])


@pytest.mark.parametrize(
    "kw,loss_type",
    [
        ({"use_kl": True}, gd.LossType.RESCALED_KL),
        ({"rescale_learned_sigmas": True}, gd.LossType.RESCALED_MSE),
        ({}, gd.LossType.MSE),
    ],
)
def test_loss_types(kw, loss_type, golden_model, losses_npz):
    g = losses_npz
    d = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine", **kw)
    assert d.loss_type == loss_type
    x0, t, noise = (torch.from_numpy(g[k]) for k in ("x_start", "t", "noise"))
    with torch.no_grad():
        terms = d.training_losses(golden_model, x0, t, noise=noise)
    if loss_type == gd.LossType.RESCALED_KL:
        # the rescaled VLB term is the hybrid VB term (same detach-free KL) times T
        assert set(terms) == {"loss"}
        vb = d._vb_terms_bpd(golden_model, x0, d.q_sample(x0, t, noise), t, clip_denoised=False)
        torch.testing.assert_close(terms["loss"], vb["output"] * 1000)
    elif loss_type == gd.LossType.RESCALED_MSE:
        np.testing.assert_allclose(terms["vb"].numpy(), g["hybrid_vb"], rtol=1e-5)  # T/1000 = 1
        np.testing.assert_allclose(terms["mse"].numpy(), g["hybrid_mse"], rtol=1e-5)


@pytest.mark.parametrize("mean_type", ["start_x", "previous_x"])
def test_other_mean_types_targets(mean_type):
    betas = gd.get_named_beta_schedule("linear", 1000)
    mt = {"start_x": gd.ModelMeanType.START_X, "previous_x": gd.ModelMeanType.PREVIOUS_X}[mean_type]
    d = gd.GaussianDiffusion(
        betas=betas,
        model_mean_type=mt,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 500])
    noise = torch.randn(x0.shape, generator=g)
    x_t = d.q_sample(x0, t, noise)
    true_mean = d.q_posterior_mean_variance(x0, x_t, t)[0]
    oracle = {"start_x": x0, "previous_x": true_mean}[mean_type]
    terms = d.training_losses(lambda x, tt: oracle, x0, t, noise=noise)
    assert terms["loss"].abs().max() < 1e-10
    out = d.p_mean_variance(lambda x, tt: oracle, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out["mean"], true_mean, atol=1e-5, rtol=1e-5)


def test_fixed_variances():
    betas = gd.get_named_beta_schedule("linear", 100)
    x = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([5])
    for vt, expect in [
        (gd.ModelVarType.FIXED_LARGE, betas[5]),
        (gd.ModelVarType.FIXED_SMALL, None),
    ]:
        d = gd.GaussianDiffusion(
            betas=betas,
            model_mean_type=gd.ModelMeanType.EPSILON,
            model_var_type=vt,
            loss_type=gd.LossType.MSE,
        )
        out = d.p_mean_variance(lambda x, tt: torch.zeros_like(x), x, t)
        expect = d.posterior_variance[5] if expect is None else expect
        assert out["variance"][0, 0, 0, 0].item() == pytest.approx(expect, rel=1e-6)


def test_calc_bpd_loop_shapes_and_consistency(golden_model):
    d = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="10"
    )
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(2, 3, 16, 16, generator=g) * 255).round() / 127.5 - 1
    out = d.calc_bpd_loop(golden_model, x0, generator=torch.Generator().manual_seed(1))
    assert out["vb"].shape == (2, 10) and out["total_bpd"].shape == (2,)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert (out["total_bpd"] > 0).all() and torch.isfinite(out["total_bpd"]).all()
    # the prior term of a 10-step cosine schedule is tiny: abar at the last step is ~0
    assert out["prior_bpd"].max() < 1e-3


def test_with_eps_scaler_copy(golden_model, diffusion_npz):
    """A copy with another lambda schedule equals a diffusion built with it; the source stays."""
    x = torch.from_numpy(diffusion_npz["pmv_x_t"])
    base = make_diffusion("10", "lam1p0")
    copy = base.with_eps_scaler(1.005, 0.002)
    built = make_diffusion("10", "linear")
    np.testing.assert_array_equal(copy.eps_scale, built.eps_scale)
    assert np.all(base.eps_scale == 1.0) and copy.timestep_map == base.timestep_map
    t = torch.full((2,), 6)
    with torch.no_grad():
        a = copy.p_mean_variance(golden_model, x, t)["mean"]
        b = built.p_mean_variance(golden_model, x, t)["mean"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must be positive"):
        base.with_eps_scaler(0.0)


# ---------------------------------------------------------------- guided-diffusion API details


def test_extract_into_tensor_original_signature():
    """guided-diffusion's helper: arr[timesteps] as float32, broadcast to the shape."""
    arr = np.array([0.5, 1.5, 2.5, 3.5])
    got = gd._extract_into_tensor(arr, torch.tensor([3, 0]), (2, 2, 3))
    assert got.dtype == torch.float32 and got.shape == (2, 2, 3)
    assert (got[0] == 3.5).all() and (got[1] == 0.5).all()


def test_wrappers_take_the_original_positional_arguments(golden_model, diffusion_npz):
    """ddim_sample_loop(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
    model_kwargs, device, progress, eta) as in guided-diffusion."""
    d = make_diffusion("ddim10", "linear")
    x_T = torch.from_numpy(diffusion_npz["loop_x_T"])
    a = d.ddim_sample_loop(golden_model, x_T.shape, x_T, True, None, None, None, None, False, 0.0)
    b = d.ddim_sample_loop(golden_model, x_T.shape, noise=x_T)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="given twice"):
        d.p_sample_loop(golden_model, x_T.shape, x_T, noise=x_T)


@pytest.mark.parametrize("kw", [{"steps": 1}, {"steps": 1000, "timestep_respacing": "1"}])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_single_step_process(kw, sampler, golden_model):
    """One step: the clipped log posterior variance falls back to log beta_0 (there is no
    t = 1), and the step goes straight to the x_0 prediction (abar_prev = 1, no noise)."""
    d = create_gaussian_diffusion(learn_sigma=True, noise_schedule="cosine", **kw)
    assert d.num_timesteps == 1
    assert d.posterior_log_variance_clipped[0] == np.log(d.betas[0])
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    (out,) = d.sample_loop_progressive(golden_model, x_T.shape, sampler=sampler, noise=x_T)
    assert torch.isfinite(out["sample"]).all() and torch.isfinite(out["log_variance"]).all()
    torch.testing.assert_close(out["sample"], out["pred_xstart"])
    bpd = d.calc_bpd_loop(golden_model, x_T.clamp(-1, 1), generator=torch.Generator())
    assert torch.isfinite(bpd["total_bpd"]).all()


def _bpd_terms(d, model, x0, seed, use_eps_scaler):
    """calc_bpd_loop's vb columns, recomputed term by term with the same noise draws."""
    g = torch.Generator().manual_seed(seed)
    terms = []
    for i in reversed(range(d.num_timesteps)):
        t = torch.full((x0.shape[0],), i)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            out = d._vb_terms_bpd(model, x0, x_t, t, use_eps_scaler=use_eps_scaler)
        terms.append(out["output"])
    return torch.stack(terms, dim=1)


def test_calc_bpd_loop_applies_eps_scaler(golden_model):
    """The bound of the ES sampler (lambda inside p_mean_variance, as the original); with
    b = 1 it is the plain bound."""
    x0 = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round()
    x0 = x0 / 127.5 - 1
    plain, scaled = make_diffusion("10", "lam1p0"), make_diffusion("10", "lam1p017")
    gen = torch.Generator().manual_seed
    vb_plain = plain.calc_bpd_loop(golden_model, x0, generator=gen(1))["vb"]
    vb_scaled = scaled.calc_bpd_loop(golden_model, x0, generator=gen(1))["vb"]
    torch.testing.assert_close(vb_plain, _bpd_terms(plain, golden_model, x0, 1, False))
    torch.testing.assert_close(vb_scaled, _bpd_terms(scaled, golden_model, x0, 1, True))
    assert not torch.allclose(vb_scaled, _bpd_terms(scaled, golden_model, x0, 1, False))
