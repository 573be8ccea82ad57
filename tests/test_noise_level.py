"""The effective noise level (``noise_level``) and the exposure study's analysis
(``exposure_study``) on Gaussian data, where every moment and the exact eps predictor are
in closed form, so the true noise level of any input is known."""

import json
import types

import numpy as np
import pytest
import torch

from guided_diffusion import exposure_study as es
from guided_diffusion import noise_level as nl
from guided_diffusion.diffusion_schedule import get_named_beta_schedule
from guided_diffusion.script_util import create_gaussian_diffusion

SIZE = 8


def _laplacian_matrix(size: int) -> np.ndarray:
    """The valid 3x3 Laplacian as a ((size-2)^2, size^2) matrix, built independently of
    ``state_stats``'s convolution."""
    rows = []
    for i in range(1, size - 1):
        for j in range(1, size - 1):
            r = np.zeros((size, size))
            r[i, j] = -4
            r[i - 1, j] = r[i + 1, j] = r[i, j - 1] = r[i, j + 1] = 1
            rows.append(r.ravel())
    return np.array(rows)


class GaussianData:
    """x_0 = mu + A z on SIZE x SIZE grey images: a smooth mean and spatially correlated
    noise (A: a separable blur), so that content and white noise differ in frequency."""

    def __init__(self, corr: float = 1.5, scale: float = 0.5) -> None:
        g = np.arange(SIZE)
        blur = np.exp(-0.5 * ((g[:, None] - g[None]) / corr) ** 2)
        blur /= np.linalg.norm(blur, axis=1, keepdims=True)
        self.A = scale * np.kron(blur, blur)  # (P, P)
        yy, xx = np.meshgrid(g, g, indexing="ij")
        self.mu = (-0.4 + 0.05 * xx - 0.03 * yy).ravel()  # a plane: zero Laplacian inside
        self.mu[0] += 0.3  # one bump so L mu is not all zero
        self.cov = self.A @ self.A.T
        self.evals, self.evecs = np.linalg.eigh(self.cov)

    def moments(self) -> nl.DataMoments:
        """m_0 and h_0 in closed form."""
        P, L = SIZE * SIZE, _laplacian_matrix(SIZE)
        m0 = (self.mu @ self.mu + np.trace(self.cov)) / P
        lmu = L @ self.mu
        h0 = (lmu @ lmu + np.trace(L @ self.cov @ L.T)) / L.shape[0]
        return nl.DataMoments(float(m0), float(h0))

    def sample(self, n: int, seed: int) -> torch.Tensor:
        z = np.random.default_rng(seed).standard_normal((n, SIZE * SIZE))
        return torch.from_numpy(self.mu + z @ self.A.T).reshape(n, 1, SIZE, SIZE)

    def eps_model(self, full_abar: np.ndarray):
        """The exact E[eps | x_t] = sqrt(1 - abar) Sigma_t^-1 (x_t - sqrt(abar) mu), with
        Sigma_t = abar Sigma + (1 - abar) I, as a model of the original timestep t."""
        U, lam, mu = map(torch.from_numpy, (self.evecs, self.evals, self.mu))

        def model(x, t, **kwargs):
            ab = torch.from_numpy(full_abar)[t.long()].to(torch.float64)[:, None]
            r = x.double().flatten(1) - ab.sqrt() * mu
            inv = 1.0 / (ab * lam + 1 - ab)  # (N, P) eigenvalues of Sigma_t^-1
            eps = ((r @ U) * inv) @ U.T * (1 - ab).sqrt()
            return eps.reshape(x.shape).to(x.dtype)

        return model


def test_state_stats_match_the_closed_form_moments():
    data = GaussianData()
    exact = data.moments()
    est = nl.DataMoments.of(nl.state_stats(data.sample(20000, 0)).numpy())
    assert est.m0 == pytest.approx(exact.m0, rel=0.01)
    assert est.h0 == pytest.approx(exact.h0, rel=0.01)
    assert exact.h0 < 0.2 * exact.m0 * nl.W  # smooth content: separable from white noise
    # white noise alone: m = 1, h = W
    white = nl.state_stats(
        torch.randn(4000, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    )
    np.testing.assert_allclose(white.numpy().mean(0), [1.0, nl.W], rtol=0.02)


def test_decompose_inverts_the_moment_equations_exactly():
    data = GaussianData().moments()
    c2, s2 = np.array([0.0, 0.3, 1.0, 2.0]), np.array([1.0, 0.7, 0.01, 0.5])
    parts = nl.decompose(c2 * data.m0 + s2, c2 * data.h0 + s2 * nl.W, data)
    np.testing.assert_allclose(parts["c2"], c2, atol=1e-12)
    np.testing.assert_allclose(parts["s2"], s2, atol=1e-12)
    with pytest.raises(ValueError, match="cannot separate"):
        nl.decompose(1.0, 1.0, nl.DataMoments(1.0, nl.W))  # white "data"


def test_effective_timestep_inverts_the_schedule():
    abar = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    t = np.array([0, 1, 17, 500, 998, 999])
    np.testing.assert_allclose(nl.effective_timestep(nl.nominal_sigma(abar[t]), abar), t, atol=1e-9)
    mid = np.sqrt(nl.nominal_sigma(abar[[100]]) * nl.nominal_sigma(abar[[101]]))
    assert 100 < nl.effective_timestep(mid, abar)[0] < 101
    out = nl.effective_timestep(np.array([0.0, -1.0, np.nan, 1e9]), abar)
    assert np.isnan(out[:3]).all() and out[3] == 999


@pytest.mark.parametrize("excess", [0.0, 0.05])
def test_forward_samples_read_their_true_noise_level(excess):
    """x = sqrt(abar) x_0 + sqrt(1 - abar + excess) eps: the estimate recovers
    sigma_eff / sigma_t = sqrt((1 - abar + excess) / (1 - abar)), within its interval."""
    data = GaussianData()
    abar = np.array([0.9, 0.5, 0.2])
    n = 3000
    x0 = data.sample(n, 2)
    gen = torch.Generator().manual_seed(3)
    rows = []
    for a in abar:
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        rows.append(nl.state_stats(np.sqrt(a) * x0 + np.sqrt(1 - a + excess) * eps).numpy())
    rows = np.stack(rows, axis=1)  # (N, K, 2)
    data_rows = nl.state_stats(data.sample(6000, 4)).numpy()
    full = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    out = nl.curve_intervals({"x": rows}, data_rows, abar, full, num_boot=200, seed=0)["x"]
    truth = np.sqrt((1 - abar + excess) / (1 - abar))
    r = out["sigma_ratio"]
    assert np.all(r["low"] <= truth) and np.all(truth <= r["high"]), (r, truth)
    np.testing.assert_allclose(r["value"], truth, rtol=0.03)
    np.testing.assert_allclose(out["signal_ratio"]["value"], 1.0, rtol=0.03)
    if excess:
        # resolved where the signal is strong enough for 3000 8x8 images (at abar 0.2 the
        # interval is about +-0.07 wide)
        assert np.all(r["low"][:2] > 1.0)
        assert np.all(out["t_eff"]["value"] > out["t_nominal"]["value"])


def _gaussian_diffusion(steps: str):
    return create_gaussian_diffusion(
        steps=1000, learn_sigma=False, noise_schedule="cosine", timestep_respacing=steps
    )


def _propagated_moments(data: GaussianData, diff) -> np.ndarray:
    """The exact E[m], E[h] (K, 2) of the DDPM sampler's inputs (unclipped, fixed small
    variance, the diffusion's lambda_i) with the exact eps model: every step is linear in
    x, x_{t-1} = M x + v + sigma z, so the mean and covariance of x̂_t propagate in closed
    form from x_T ~ N(0, I)."""
    P, L = SIZE * SIZE, _laplacian_matrix(SIZE)
    U, ev, mu = data.evecs, data.evals, data.mu
    mean, cov, out = np.zeros(P), np.eye(P), np.zeros((diff.num_timesteps, 2))
    for i in reversed(range(diff.num_timesteps)):
        lm = L @ mean
        out[i] = [(mean @ mean + np.trace(cov)) / P, (lm @ lm + np.trace(L @ cov @ L.T)) / len(L)]
        ab, lam = diff.alphas_cumprod[i], diff.eps_scale[i]
        E = np.sqrt(1 - ab) * (U * (1 / (ab * ev + 1 - ab))) @ U.T  # eps = E (x - sqrt(ab) mu)
        a1, a2 = diff.sqrt_recip_alphas_cumprod[i], diff.sqrt_recipm1_alphas_cumprod[i]
        c1, c2 = diff.posterior_mean_coef1[i], diff.posterior_mean_coef2[i]
        M = c1 * (a1 * np.eye(P) - a2 * E / lam) + c2 * np.eye(P)
        v = c1 * a2 * E @ (np.sqrt(ab) * mu) / lam
        var = np.exp(diff.posterior_log_variance_clipped[i]) if i > 0 else 0.0
        mean, cov = M @ mean + v, M @ cov @ M.T + var * np.eye(P)
    return out


@pytest.mark.parametrize("lam", [1.0, 1.05])
def test_sampler_state_moments_match_their_closed_form(lam):
    """The moments that ``sample_rows`` records along real DDPM sampling equal the exact
    moments of the sampler's inputs (Gaussian data, exact eps model, eps / lambda), so the
    effective noise level it reports is that of the sampler's true input distribution."""
    data = GaussianData()
    full = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    diff = create_gaussian_diffusion(
        steps=1000,
        learn_sigma=False,
        sigma_small=True,
        noise_schedule="cosine",
        timestep_respacing="20",
    ).with_eps_scaler(lam)
    rows = es.sample_rows(
        data.eps_model(full),
        diff,
        list(range(3000)),
        shape=(1, SIZE, SIZE),
        device=torch.device("cpu"),
        clip_denoised=False,
    )["states"]
    exact = _propagated_moments(data, diff)
    se = rows.std(axis=0) / np.sqrt(len(rows))
    assert np.all(np.abs(rows.mean(axis=0) - exact) < 4.5 * se + 1e-9)
    np.testing.assert_allclose(rows.mean(axis=0), exact, rtol=0.015)


def test_exact_model_with_many_steps_gives_the_nominal_noise_level():
    """With the exact eps model, 100 DDPM steps and the posterior variance, the sampler's
    exact input moments read as the nominal noise level (ratio 1 to within 5% where the
    signal is measurable: 1.3% mid-way, 4.8% near the noisiest steps)."""
    data = GaussianData()
    full = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    diff = create_gaussian_diffusion(
        steps=1000,
        learn_sigma=False,
        sigma_small=True,
        noise_schedule="cosine",
        timestep_respacing="100",
    )
    ratio = nl.level_curve(
        _propagated_moments(data, diff)[None], data.moments(), diff.alphas_cumprod, full
    )["sigma_ratio"]
    np.testing.assert_allclose(ratio[3:90], 1.0, atol=0.05)
    assert np.all(np.abs(ratio[3:60] - 1) < 0.015)


def test_run_pass_resumes_and_does_not_depend_on_the_batch_size(tmp_path):
    data = GaussianData()
    diff = _gaussian_diffusion("6")
    model = data.eps_model(np.cumprod(1 - get_named_beta_schedule("cosine", 1000)))
    kw = dict(shape=(1, SIZE, SIZE), device=torch.device("cpu"), num_samples=7, seed=3)
    a = es.run_pass(tmp_path / "a", model, diff, batch_size=3, **kw)
    shards = sorted((tmp_path / "a").glob("rows_*.npz"))
    assert len(shards) == 3
    shards[1].unlink()
    resumed = es.run_pass(tmp_path / "a", model, diff, batch_size=3, **kw)
    other = es.run_pass(tmp_path / "b", model, diff, batch_size=5, **kw)
    for k in es.ROW_KEYS:
        np.testing.assert_array_equal(resumed[k], a[k])
        np.testing.assert_allclose(other[k], a[k], rtol=1e-6, atol=1e-6)
    assert a["eps_norm"].shape == (7, 6) and a["states"].shape == (7, 6, 2)
    assert a["images"].shape == (7, SIZE, SIZE, 3) and a["images"].dtype == np.uint8


def test_fractional_root_and_best_lambda():
    grid = np.array([0.96, 0.98, 1.0, 1.02])
    assert nl.fractional_root(grid, 2 * (grid - 0.991)) == pytest.approx(0.991)
    assert np.isnan(nl.fractional_root(grid, grid + 1))
    assert es.best_lambda(grid, (grid - 0.985) ** 2 + 3) == pytest.approx(0.985)
    assert es.best_lambda(grid, grid) == 0.96  # minimum at the edge: the edge
    # closest match: the root where there is one, else the vertex of |value|
    assert es.closest_match(grid, 2 * (grid - 0.991)) == pytest.approx(0.991)
    assert es.closest_match(grid, (grid - 0.985) ** 2 + 0.1) == pytest.approx(0.985)
    assert es.closest_match(grid, [np.nan, 0.3, -0.1, np.nan]) == pytest.approx(0.995)
    assert np.isnan(es.closest_match(grid, [np.nan] * 4))
    with pytest.raises(ValueError, match="increase"):
        nl.fractional_root(grid[::-1], grid)


def test_analyse_finds_the_planted_optima():
    """Synthetic passes whose objectives have known roots: norm at 1.01, noise at 1.03,
    highfreq at 0.99, and activations whose FID is smallest at lambda 0.98."""
    from evaluations.evaluator import FIDStatistics

    rng = np.random.default_rng(0)
    grid = [0.96, 0.98, 1.0, 1.02, 1.04]
    K, N, D = 5, 400, 6
    full = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    abar = full[np.linspace(0, 999, K).astype(int)]
    data = nl.DataMoments(0.6, 2.0)
    train = 1.0 + 0.01 * rng.standard_normal((N, K))
    base_feats = rng.standard_normal((N, D))
    ref = FIDStatistics(np.zeros(D), np.eye(D))
    direction = np.eye(D)[0]
    passes, acts = {}, {}
    for lam in grid:
        c2, s2 = abar, (1 - abar) * np.exp(2 * (lam - 1.03))
        states = np.stack([c2 * data.m0 + s2, c2 * data.h0 + s2 * nl.W], axis=-1)
        jitter = 1 + 0.001 * rng.standard_normal((N, 1, 1))
        passes[lam] = {
            "eps_norm": np.tile(lam * (1 + 0.5 * (lam - 1.01)), (N, K)) * train.mean(0),
            "states": np.broadcast_to(states, (N, K, 2)) * jitter,
            "final": np.tile([data.m0, data.h0 * (1 + (lam - 0.99))], (N, 1)),
        }
        acts[lam] = base_feats + 20 * (lam - 0.98) * direction
    out = es.analyse(
        grid,
        passes,
        acts,
        ref,
        train,
        rng.standard_normal((50, 2)) * 0 + [0.6, 2.0],
        abar,
        full,
        num_boot=100,
    )
    assert out["objectives"]["norm"]["lambda"] == pytest.approx(1.01, abs=2e-3)
    assert out["objectives"]["noise"]["lambda"] == pytest.approx(1.03, abs=2e-3)
    assert out["objectives"]["step1"]["lambda"] == pytest.approx(1.03, abs=2e-3)
    assert out["objectives"]["highfreq"]["lambda"] == pytest.approx(0.99, abs=1e-9)
    lo, hi = out["best_lambda"]["interval"]
    assert out["best_lambda"]["lambda"] == pytest.approx(0.98, abs=0.005) and lo <= 0.98 <= hi
    assert hi < 0.99  # sharp FID minimum: highfreq's 0.99 is outside, norm's 1.01 too
    assert not out["objectives"]["norm"]["within_best_interval"]
    j1 = grid.index(1.0)
    assert out["fid_diff_vs_1"][j1] == 0 and out["fid_diff_interval"][0][1] > 0
    with pytest.raises(ValueError, match="must contain 1.0"):
        es.analyse([0.98, 1.02], passes, acts, ref, train, np.ones((2, 2)), abar, full)


def _feature_score(ref_images: np.ndarray):
    """A stand-in feature net: 16 block means of the grey image; returns (score, ref)."""
    from evaluations.evaluator import FIDStatistics

    def feats(img):
        return img[..., 0].reshape(len(img), 4, 2, 4, 2).mean((2, 4)).reshape(len(img), -1) / 255

    f = feats(ref_images)
    ref = FIDStatistics(f.mean(0), np.cov(f, rowvar=False))

    def score(img):
        g = feats(img)
        fid = FIDStatistics(g.mean(0), np.cov(g, rowvar=False)).frechet_distance(ref)
        return types.SimpleNamespace(pool=g, fid=fid, precision=0.5, recall=0.5)

    return score, ref, feats


def test_study_setting_on_gaussian_data_reads_the_closed_form_noise_level(tmp_path):
    """``study_setting`` end to end with the exact eps model: its noise curve at lambda = 1
    is the closed-form one, its objective values are ``objective`` of its own mean rows,
    FIDs are those of the stand-in features, and a rerun samples nothing."""
    from evaluations.evaluator import FIDStatistics

    data = GaussianData()
    full = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
    diff = create_gaussian_diffusion(
        steps=1000,
        learn_sigma=False,
        sigma_small=True,
        noise_schedule="cosine",
        timestep_respacing="20",
    )
    x0 = data.sample(400, 1).float()
    to_img = lambda x: ((x.clamp(-1, 1)[:, 0] + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    score, ref, feats = _feature_score(to_img(x0).numpy()[..., None].repeat(3, -1))
    calls = []
    exact = data.eps_model(full)

    def model(x, t, **kw):
        calls.append(len(x))
        return exact(x, t)

    kw = dict(
        num_samples=500,
        batch_size=250,
        seed=0,
        shape=(1, SIZE, SIZE),
        device=torch.device("cpu"),
        num_classes=None,
        train_x0=x0,
        train_kwargs={},
        data_rows=nl.state_stats(x0).numpy(),
        score=score,
        ref_stats=ref,
        num_boot=100,
        clip_denoised=False,
    )
    grid = [0.99, 1.0, 1.01]
    r = es.study_setting(tmp_path, model, diff, grid, **kw)
    assert r["grid"] == grid and r["timesteps"] == [int(t) for t in diff.timestep_map]
    # the noise curve at lambda = 1 against the closed-form moments of the sampler's inputs
    want = nl.level_curve(
        _propagated_moments(data, diff)[None], data.moments(), diff.alphas_cumprod, full
    )["sigma_ratio"]
    got = r["noise"]["1"]["sigma_ratio"]
    mid = slice(1, 15)  # measurable steps: not t = 0, not where the signal is tiny
    np.testing.assert_allclose(got["value"][mid], want[mid], rtol=0.03)
    assert np.all(np.array(got["low"])[mid] < np.array(got["high"])[mid])
    # objectives and FID from the same rows
    passes = {
        lam: es.run_pass(
            tmp_path / f"lambda_{lam:g}",
            model,
            diff.with_eps_scaler(lam),
            num_samples=500,
            batch_size=250,
            seed=0,
            shape=(1, SIZE, SIZE),
            device=torch.device("cpu"),
            clip_denoised=False,
        )
        for lam in grid
    }
    train = np.load(tmp_path / "train_eps_norm.npz")["rows"].mean(0)
    for j, lam in enumerate(grid):
        p = passes[lam]
        args = (
            p["eps_norm"].mean(0),
            p["states"].mean(0),
            p["final"].mean(0),
            train,
            nl.DataMoments(*kw["data_rows"].mean(0)),
            diff.alphas_cumprod,
            full,
        )
        for name in es.OBJECTIVES:
            v = es.objective(name, lam, *args)
            assert r["objectives"][name]["values"][j] == pytest.approx(v, rel=1e-9, nan_ok=True)
        np.testing.assert_allclose(r["sample_eps_norm"][f"{lam:g}"], p["eps_norm"].mean(0) / lam)
        g = feats(p["images"])
        fid = FIDStatistics(g.mean(0), np.cov(g, rowvar=False)).frechet_distance(ref)
        assert r["fid"][j] == pytest.approx(fid) and r["scores"][f"{lam:g}"][
            "fid"
        ] == pytest.approx(fid)
    # resumed: no model call, the same numbers
    calls.clear()
    again = es.study_setting(tmp_path, model, diff, grid, **kw)
    assert calls == [] and json.dumps(again, sort_keys=True) == json.dumps(r, sort_keys=True)
    # the report's table and figures
    table = es.format_tables({"gauss": r})
    assert "| gauss | 500 |" in table and "0.99: " in table
    from guided_diffusion.plots import plot_study_setting, plot_study_summary

    plot_study_setting(tmp_path / "s.png", r, "gauss")
    plot_study_summary(tmp_path / "sum.png", {"gauss": r, "again": again})
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sum.png").stat().st_size > 1000


def test_parse_setting():
    s = es.parse_setting("b20:bundled:20", 400, "0.98,1.02")
    assert s == dict(
        label="b20", model="bundled", steps=20, lambdas=[0.98, 1.0, 1.02], num_samples=400
    )
    s = es.parse_setting("x:runs/a/ema_0.998_001000.pt:10:300:0.9,0.95", 400, "0.98")
    assert s["model"] == "runs/a/ema_0.998_001000.pt" and s["num_samples"] == 300
    assert s["lambdas"] == [0.9, 0.95, 1.0]
    for bad, match in [
        ("b20:bundled", "LABEL:MODEL:STEPS"),
        ("b:bundled:ten", "integers"),
        ("b:bundled:1", "STEPS >= 2"),
        ("a/b:bundled:10", "label"),
    ]:
        with pytest.raises(ValueError, match=match):
            es.parse_setting(bad, 400, "1")
