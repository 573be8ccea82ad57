"""The options of the one sampling loop against closed forms: DDIM eta, the Time-Shift
Sampler, DPM-Solver++(2M) and the non-finite check.

Data from a known Gaussian, x_0 ~ N(mu, s^2 I), and an oracle "network" that returns the
exact noise prediction E[eps | x_t] (x_t and eps are jointly Gaussian):

    E[x_0 | x_t] = mu + s^2 sqrt(abar) / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu)

The probability-flow ODE keeps z = (x_t - sqrt(abar_t) mu) / sqrt(abar_t s^2 + 1 - abar_t)
constant along a trajectory, which gives the exact solution that a solver approaches.
The respacing wrapper calls the oracle with the ORIGINAL timestep, so it reads abar from
the 1000-step schedule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.diffusion_sampling import time_shift_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion

MU, S = 0.2, 0.5
CPU = torch.device("cpu")


class GaussOracle:
    """eps(x, t) = E[eps | x_t = x] for x_0 ~ N(mu, s^2 I) on the 1000-step ``schedule``."""

    def __init__(self, schedule: str = "cosine", mu: float = MU, s: float = S):
        betas = gd.get_named_beta_schedule(schedule, 1000)
        self.abar = torch.from_numpy(np.cumprod(1.0 - betas))  # float64
        self.mu, self.s = mu, s

    def __call__(self, x, t, **kwargs):
        ab = self.abar[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        x0 = self.mu + self.s**2 * ab.sqrt() / (ab * self.s**2 + 1 - ab) * (x - ab.sqrt() * self.mu)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def diffusion(resp: str, schedule: str = "cosine", b: float = 1.0, k: float = 0.0):
    """A respaced eps-model process with the fixed posterior variance (DDPM = DDIM eta 1)."""
    return create_gaussian_diffusion(
        steps=1000,
        noise_schedule=schedule,
        timestep_respacing=resp,
        sigma_small=True,
        eps_scaler=b,
        eps_scaler_k=k,
    )


def run(d, x_T, **kw):
    kw.setdefault("clip_denoised", False)
    return list(d.sample_loop_progressive(GaussOracle(), x_T.shape, noise=x_T, device=CPU, **kw))


def seeded(seed: int):
    return torch.Generator().manual_seed(seed)


def x_T(shape=(3, 2, 4, 4), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=seeded(seed), dtype=dtype)


# ---------------------------------------------------------------- DDIM eta


def test_ddim_eta_one_is_ddpm_with_eps_scaling():
    """DDIM with eta = 1 has the posterior variance, so it is the DDPM step (Song et al.,
    section 4.1), with lambda applied to both alike; both draw from the generator."""
    d = diffusion("10", b=1.02)
    x = x_T()
    ddpm = run(d, x, sampler="ddpm", generator=seeded(7))
    ddim = run(d, x, sampler="ddim", eta=1.0, generator=seeded(7))
    for a, b in zip(ddpm, ddim):
        torch.testing.assert_close(b["sample"], a["sample"], atol=2e-5, rtol=1e-5)
    plain = run(d.with_eps_scaler(1.0), x, sampler="ddim", eta=1.0, generator=seeded(7))
    assert not torch.allclose(plain[-1]["sample"], ddim[-1]["sample"], atol=1e-3)


def test_ddim_eta_one_step_closed_form():
    """One DDIM step with eta = 0.5 and lambda = 1.03, written out from eq. 12."""
    d = diffusion("10", b=1.03)
    x = x_T(dtype=torch.float64)
    z = x_T(seed=1, dtype=torch.float64)
    (out,) = run(d, x, sampler="ddim", eta=0.5, start_step=6, noise_fn=lambda _: z)[:1]
    ab, ab_prev = d.alphas_cumprod[6], d.alphas_cumprod[5]
    eps = GaussOracle()(x, torch.full((3,), d.timestep_map[6])) / 1.03
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    sigma = 0.5 * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    want = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(out["sample"], want, atol=1e-5, rtol=1e-5)


def test_ddim_eta_one_stays_finite_where_the_float32_coefficient_rounds_below_zero():
    """3 cosine steps, eta = 1: at the first step 1 - abar_prev - sigma^2 is exactly
    (1 - abar_prev)(abar / abar_prev - abar) / (1 - abar) >= 0 but rounds to -6e-8 in float32;
    the eps term must then vanish (a NaN there was the original's sqrt of it)."""
    d = diffusion("3")
    t = torch.full((1,), 2)
    ab, ab_prev = (d._extract(a, t, (1,)) for a in (d.alphas_cumprod, d.alphas_cumprod_prev))
    sigma = torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    assert float(1 - ab_prev - sigma**2) < 0  # the case this test is about
    steps = run(d, x_T(), sampler="ddim", eta=1.0, generator=seeded(3))
    assert all(torch.isfinite(o["sample"]).all() for o in steps)
    first = steps[0]  # x0 scaled back plus the posterior noise, no eps term
    z = torch.randn(first["x_t"].shape, generator=seeded(3))  # the generator's first draw
    want = first["pred_xstart"] * torch.sqrt(ab_prev) + sigma * z
    torch.testing.assert_close(first["sample"], want, atol=1e-6, rtol=1e-6)


def test_ddim_eta_is_reproducible_and_checked():
    d = diffusion("10")
    x = x_T()
    a = run(d, x, sampler="ddim", eta=0.3, generator=seeded(3))[-1]["sample"]
    b = run(d, x, sampler="ddim", eta=0.3, generator=seeded(3))[-1]["sample"]
    c = run(d, x, sampler="ddim", eta=0.3, generator=seeded(4))[-1]["sample"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="eta is DDIM's noise scale"):
        run(d, x, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        run(d, x, sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="sampler must be one of ddpm, ddim, dpmpp2m"):
        run(d, x, sampler="euler")


# ---------------------------------------------------------------- DPM-Solver++(2M)


def _ode_error(sampler: str, n_steps: int, t_star: int = 200) -> float:
    """Max error of x at original timestep ``t_star`` against the exact ODE solution, on
    the DDIM-strided grid of ``n_steps`` steps of the linear schedule (all contain t*)."""
    d = diffusion(f"ddim{n_steps}", schedule="linear")
    x = x_T((8, 1, 4, 4), dtype=torch.float64)
    steps = list(
        d.sample_loop_progressive(
            GaussOracle("linear"),
            x.shape,
            sampler=sampler,
            noise=x,
            clip_denoised=False,
            device=CPU,
        )
    )
    i = d.timestep_map.index(t_star)
    ab_T, ab = d.alphas_cumprod[-1], d.alphas_cumprod[i]
    z = (x - np.sqrt(ab_T) * MU) / np.sqrt(ab_T * S**2 + 1 - ab_T)
    exact = np.sqrt(ab) * MU + np.sqrt(ab * S**2 + 1 - ab) * z
    return float((steps[d.num_timesteps - 1 - i]["x_t"] - exact).abs().max())


def test_dpmpp2m_converges_at_second_order():
    """Global error ~ N^-2 for DPM-Solver++(2M), ~ N^-1 for DDIM (its first-order form)."""
    ns = [20, 40, 50, 100, 200]
    dpm = [_ode_error("dpmpp2m", n) for n in ns]
    ddim = [_ode_error("ddim", n) for n in ns]
    slope = np.polyfit(np.log(ns), np.log(dpm), 1)[0]
    assert -2.3 < slope < -1.8, (dpm, slope)
    assert np.polyfit(np.log(ns), np.log(ddim), 1)[0] > -1.2  # guard: the test sees the order
    assert dpm[-1] < ddim[-1] / 20


def test_dpmpp2m_final_steps_are_first_order():
    """Into the last grid point t_0 the step is DDIM's (Lu et al.'s lower-order final
    step), and the step to abar = 1 returns the x_0 prediction."""
    d = diffusion("10", b=1.01)
    steps = run(d, x_T(dtype=torch.float64), sampler="dpmpp2m")
    x1, x0_1 = steps[-2]["x_t"], steps[-2]["pred_xstart"]
    ab1, ab0 = d.alphas_cumprod[1], d.alphas_cumprod[0]
    ddim = np.sqrt(ab0) * x0_1 + np.sqrt(1 - ab0) * (x1 - np.sqrt(ab1) * x0_1) / np.sqrt(1 - ab1)
    torch.testing.assert_close(steps[-2]["sample"], ddim, atol=1e-6, rtol=1e-6)
    assert torch.equal(steps[-1]["sample"], steps[-1]["pred_xstart"])


def test_dpmpp2m_reproduces_the_data_distribution():
    d = diffusion("20")
    n = 20000
    x = x_T((n, 1, 1, 1), seed=5, dtype=torch.float64)
    sample = run(d, x, sampler="dpmpp2m")[-1]["sample"].flatten()
    assert abs(sample.mean().item() - MU) < 4 * S / np.sqrt(n)
    assert abs(sample.var().item() / S**2 - 1) < 4 * np.sqrt(2 / n) + 0.01


def test_dpmpp2m_first_step_is_ddim_and_scales_eps_once():
    """The first (first-order) step is DDIM with the same lambda; the second uses the
    previous x_0 prediction; nothing draws noise."""
    d = diffusion("10", b=1.02)
    x = x_T()
    dpm = run(d, x, sampler="dpmpp2m", noise_fn=lambda _: pytest.fail("drew noise"))
    ddim = run(d, x, sampler="ddim")
    torch.testing.assert_close(dpm[0]["sample"], ddim[0]["sample"], atol=1e-5, rtol=1e-5)
    abar = d.alphas_cumprod
    lam = 0.5 * np.log(abar / (1 - abar))
    h, h_prev = lam[7] - lam[8], lam[8] - lam[9]
    r = h_prev / h
    dd = (1 + 1 / (2 * r)) * dpm[1]["pred_xstart"] - 1 / (2 * r) * dpm[0]["pred_xstart"]
    want = (
        np.sqrt((1 - abar[7]) / (1 - abar[8])) * dpm[1]["x_t"]
        - np.sqrt(abar[7]) * np.expm1(-h) * dd
    )
    torch.testing.assert_close(dpm[1]["sample"], want, atol=1e-5, rtol=1e-5)
    unscaled = run(d.with_eps_scaler(1.0), x, sampler="dpmpp2m")
    assert not torch.allclose(unscaled[-1]["sample"], dpm[-1]["sample"], atol=1e-3)


# ---------------------------------------------------------------- Time-Shift Sampler


def _analytic_tau(var: float, t: int, t_next: int, abar: np.ndarray, window: int) -> int:
    cand = [c for c in range(t - window, t + window + 1) if t_next < c < len(abar)]
    return min(cand, key=lambda c: (abs(var - (1 - abar[c])), c))


def test_time_shift_picks_the_analytic_tau():
    """x_t of data with std s_n has variance abar_t s_n^2 + 1 - abar_t: the chosen tau is
    the timestep in the window whose 1 - abar_tau is closest to it."""
    d = diffusion("20")
    i, window = 15, 20
    t, t_next = d.timestep_map[i], d.timestep_map[i - 1]
    ab_t = d.original_alphas_cumprod[t]
    s_n = np.array([0.0, 0.3, 0.6, 1.0, 2.0])
    var = ab_t * s_n**2 + 1 - ab_t
    z = torch.randn(len(s_n), 3, 8, 8, generator=seeded(2), dtype=torch.float64)
    z = (z - z.mean(dim=(1, 2, 3), keepdim=True)) / z.std(
        dim=(1, 2, 3), unbiased=False, keepdim=True
    )
    x = (torch.from_numpy(np.sqrt(var)).view(-1, 1, 1, 1) * z).float()
    out = run(d, x, sampler="ddim", start_step=i, time_shift=True, ts_window=window)[0]
    want = [_analytic_tau(v, t, t_next, d.original_alphas_cumprod, window) for v in var]
    assert out["tau"].tolist() == want
    assert want[0] == t and want[-1] == t + window and len(set(want)) >= 3  # guard


def test_time_shift_window_zero_is_plain_sampling_bit_for_bit():
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)):
        d = diffusion("10", b=1.01)
        x = x_T() * 1.3  # far from the schedule, so that a window would shift
        plain = run(d, x, sampler=sampler, eta=eta, generator=seeded(1), clip_denoised=True)
        kw = dict(sampler=sampler, eta=eta, clip_denoised=True, time_shift=True, ts_cutoff=0)
        none = run(d, x, generator=seeded(1), ts_window=0, **kw)
        shifted = run(d, x, generator=seeded(1), ts_window=20, **kw)
        for a, b in zip(plain, none):
            assert torch.equal(a["sample"], b["sample"])
        assert not torch.equal(plain[-1]["sample"], shifted[-1]["sample"])
    final = d.ddim_sample_loop(  # the wrappers pass the options on
        GaussOracle(),
        x.shape,
        x,
        True,
        device=CPU,
        eta=0.5,
        generator=seeded(1),
        time_shift=True,
        ts_cutoff=0,
        ts_window=20,
    )
    assert torch.equal(final, shifted[-1]["sample"])


@pytest.mark.parametrize("guided", [False, True])
def test_time_shift_step_closed_form_ddim_and_ddpm(guided):
    """A shifted step is the generalized DDIM / posterior step from abar_tau to the next
    nominal timestep, with x_0 from the nominal network eps / lambda and classifier
    guidance (a fixed gradient g here) applied at tau."""
    d = diffusion("20", b=1.02)
    i = 12
    t, t_next = d.timestep_map[i], d.timestep_map[i - 1]
    x = x_T((4, 3, 8, 8), dtype=torch.float64) * 1.2
    z = x_T((4, 3, 8, 8), seed=3, dtype=torch.float64)
    g = 0.3 * x_T((4, 3, 8, 8), seed=4, dtype=torch.float64) if guided else torch.zeros_like(x)
    eps = GaussOracle()(x, torch.full((4,), t)) / 1.02
    abar = torch.from_numpy(d.original_alphas_cumprod)
    kw = dict(start_step=i, time_shift=True, noise_fn=lambda _: z)
    if guided:
        kw["cond_fn"] = lambda x, t, **_: g
    for sampler in ("ddim", "ddpm"):
        out = run(d, x, sampler=sampler, **kw)[0]
        tau = out["tau"]
        assert (tau != t).all()
        ab, ab_next = abar[tau].view(-1, 1, 1, 1), abar[t_next]
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if sampler == "ddim":  # score conditioning: eps - sqrt(1 - abar_tau) g
            eps_tau = (x - ab.sqrt() * x0) / (1 - ab).sqrt() - (1 - ab).sqrt() * g
            x0 = (x - (1 - ab).sqrt() * eps_tau) / ab.sqrt()
            want = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps_tau
        else:  # the posterior q(x_next | x_tau, x_0) (Ho et al. eqs. 6-7 between two levels)
            beta = 1 - ab / ab_next
            var = (1 - ab_next) / (1 - ab) * beta
            mean = (
                ab_next.sqrt() * beta / (1 - ab) * x0
                + (1 - beta).sqrt() * (1 - ab_next) / (1 - ab) * x
            )
            want = mean + var * g + var.sqrt() * z
        torch.testing.assert_close(out["sample"], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["pred_xstart"], x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("resp", ["ddim25", "7,3"])
def test_time_shift_on_a_respaced_schedule(resp):
    d = diffusion(resp, schedule="linear")
    x = x_T((4, 3, 8, 8)) * 0.8
    steps = run(d, x, sampler="ddpm", generator=seeded(0), time_shift=True, ts_cutoff=300)
    tmap = d.timestep_map
    for i, out in zip(range(d.num_timesteps - 1, -1, -1), steps):
        tau = out["tau"]
        if tmap[i] > 300 and i > 0:
            assert ((tau - tmap[i]).abs() <= 20).all() and (tau > tmap[i - 1]).all()
        else:
            assert (tau == tmap[i]).all()
    assert any((out["tau"] != tmap[i]).any() for i, out in zip(range(len(tmap) - 1, -1, -1), steps))
    assert torch.isfinite(steps[-1]["sample"]).all()


def test_time_shift_refusals():
    d = diffusion("10")
    x = x_T()
    with pytest.raises(ValueError, match="time_shift works with the ddpm and ddim"):
        run(d, x, sampler="dpmpp2m", time_shift=True)
    with pytest.raises(ValueError, match="ts_window must be"):
        run(d, x, time_shift=True, ts_window=-1)
    with pytest.raises(ValueError, match="ts_cutoff must be"):
        run(d, x, time_shift=True, ts_cutoff=2.5)


def test_time_shift_timesteps_bounds():
    abar = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
    x = torch.zeros(2, 1, 2, 2)
    x[0] = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]) * np.sqrt(0.22)  # var 0.22: nearest 1
    x[1] = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]) * np.sqrt(0.9)  # var 0.9: above 4
    tau = time_shift_timesteps(x, torch.tensor([3, 3]), torch.tensor([2, 1]), abar, 3)
    assert tau.tolist() == [3, 4]  # t_next < tau < T
    tau = time_shift_timesteps(x, torch.tensor([3, 3]), torch.tensor([0, 1]), abar, 3)
    assert tau.tolist() == [1, 4]


# ---------------------------------------------------------------- non-finite samples


def test_nonfinite_step_is_recorded_and_named():
    """A model that fails at one step for one sample: the loop records the step without a
    host sync, and the wrappers raise naming it (also when clipping hides an inf)."""
    d = diffusion("10")
    bad_t = d.timestep_map[4]

    def model(x, t, **kw):
        eps = GaussOracle()(x, t)
        eps[1] = torch.where(t[1] == bad_t, float("inf"), eps[1])
        return eps

    steps = list(d.p_sample_loop_progressive(model, (2, 3, 4, 4), device=CPU, generator=seeded(0)))
    assert steps[-1]["nonfinite_step"].tolist() == [-1, 4]
    with pytest.raises(gd.NonFiniteSampleError, match=r"step i=4 .* in 1 of 2 samples"):
        d.ddim_sample_loop(model, (2, 3, 4, 4), device=CPU)
    with pytest.raises(gd.NonFiniteSampleError, match="step i=4"):
        d.p_sample_loop(model, (2, 3, 4, 4), device=CPU)
    with pytest.raises(gd.NonFiniteSampleError, match="step i=4"):
        d.sample_loop(model, (2, 3, 4, 4), sampler="dpmpp2m", device=CPU)
    gd.check_finite_samples(run(d, x_T())[-1])  # finite: no error
