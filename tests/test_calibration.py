"""The calibration library: the 1-D solver, the refusals, ``CalibrationResult`` through JSON,
the target-curve CSV and the module layout. The science of the fits (recovering a known
lambda on oracle models) is tested in ``test_exposure_bias.py``."""

from __future__ import annotations

import ast
import importlib
import json
import sys

import numpy as np
import pytest
from test_exposure_bias import DIFF, GaussOracle, gauss_data, linear_c

import guided_diffusion
from guided_diffusion import calibration as cal
from guided_diffusion.io_util import read_train_norm, write_csv

from conftest import ROOT


@pytest.fixture(scope="module")
def result():
    """A calibration of a linearly inflated oracle: baseline, uniform and linear passes."""
    mu, x0, seeds = gauss_data(32, 4, seed=3)
    model = GaussOracle(mu, c=linear_c(0.004, 0.98))
    return cal.calibrate(model, DIFF, x0, seeds=seeds, clip_denoised=False, max_evals_linear=3)


def test_find_root_1d():
    calls = []

    def f(x):
        calls.append(x)
        return 0.08 * (1.0317 - x) + 0.3 * (1.0317 - x) ** 2  # flat, like the closed loop

    x, status = cal.find_root_1d(f, 1.0, f(1.0), 1.05, 0.95, 1.10, 1e-4, 8)
    assert status == "converged" and abs(x - 1.0317) < 1e-4 and len(calls) <= 6
    x, status = cal.find_root_1d(lambda x: x - 1.3, 1.0, -0.3, 1.05, 0.95, 1.10, 1e-4, 8)
    assert status == "at_bound" and x == 1.10
    x, status = cal.find_root_1d(lambda x: (x - 1) ** 2 + 0.01, 1.0, 0.01, 1.05, 0.9, 1.1, 1e-4, 8)
    assert status == "no_root"


def test_calibrate_refuses_fewer_than_two_samples():
    """One sample has no standard error of b: refused, not reported as converged."""
    mu, x0, seeds = gauss_data(3, 4)
    with pytest.raises(ValueError, match="at least 2 samples for the standard error of b, got 1"):
        cal.calibrate(GaussOracle(mu), DIFF, x0[:1], seeds=seeds[:1], clip_denoised=False)
    # the count is over every process: 1 sample here, 1 elsewhere is enough
    two = cal.calibrate(
        GaussOracle(mu),
        DIFF,
        x0[:1],
        seeds=seeds[:1],
        clip_denoised=False,
        max_evals=2,
        max_evals_linear=1,
        gather=lambda rows: np.concatenate([rows, rows]),
    )
    assert two.num_samples == 2 and np.isfinite(two.uniform.gap_se)


def test_result_round_trips_through_json(result):
    assert {e.phase for e in result.evaluations} == {"baseline", "uniform", "linear"}
    info = json.loads(json.dumps(result.to_json()))
    back = cal.CalibrationResult.from_json(info)
    assert back.to_json() == result.to_json()
    for key, value in result.curves().items():
        np.testing.assert_array_equal(back.curves()[key], value, err_msg=key)
    for fit in ("baseline", "uniform", "linear"):
        ev = getattr(back, fit)
        assert any(ev is e for e in back.evaluations)  # the pass itself, as in the original
        np.testing.assert_array_equal(ev.gap_per_step, getattr(result, fit).gap_per_step)
    assert back.flags("uniform") == result.flags("uniform")
    assert back.flags("linear") == result.flags("linear")
    assert back.uniform_b_se == result.uniform_b_se and back.b_range == result.b_range
    with pytest.raises(ValueError, match="uniform or linear|one of"):
        back.flags("both")


def test_from_json_reads_files_without_the_pass_curves(result):
    info = json.loads(json.dumps(result.to_json()))
    for e in info["evaluations"]:
        del e["sample_norm"]  # calibration.json of earlier versions
    old = cal.CalibrationResult.from_json(info)
    assert old.linear.k == result.linear.k and old.uniform.gap == result.uniform.gap
    assert np.isnan(old.uniform.sample_norm).all()
    info["evaluations"] = info["evaluations"][:1]
    with pytest.raises(ValueError, match="no evaluation at the uniform fit"):
        cal.CalibrationResult.from_json(info)


def test_read_train_norm(tmp_path):
    order = np.arange(4)[::-1]  # eps_norm.csv rows: the noisiest step first
    write_csv(tmp_path / "n.csv", {"step": order, "t": order * 10, "train_norm": order + 1.5})
    np.testing.assert_array_equal(read_train_norm(tmp_path / "n.csv", 4), np.arange(4) + 1.5)
    with pytest.raises(ValueError, match="--train_norm_csv .* needs a train_norm column with 5"):
        read_train_norm(tmp_path / "n.csv", 5, "--train_norm_csv")
    (tmp_path / "log.txt").write_text("Logging to /tmp\nloading model\n")
    with pytest.raises(ValueError, match="not a CSV of numbers"):
        read_train_norm(tmp_path / "log.txt", 4)


@pytest.mark.parametrize("first", ["calibration", "plots", "exposure_bias"])
def test_modules_import_in_any_order_and_keep_the_old_names(monkeypatch, first):
    """calibration imports exposure_bias; the moved names stay importable from there."""
    names = ("exposure_bias", "calibration", "plots")
    for name in names:  # fresh imports, undone after the test
        monkeypatch.delitem(sys.modules, f"guided_diffusion.{name}", raising=False)
        monkeypatch.delattr(guided_diffusion, name, raising=False)
    importlib.import_module(f"guided_diffusion.{first}")
    eb, c, p = (importlib.import_module(f"guided_diffusion.{name}") for name in names)
    assert eb.calibrate is c.calibrate and eb.CalibrationResult is c.CalibrationResult
    assert eb.find_root_1d is c.find_root_1d and eb.plot_delta is p.plot_delta
    assert eb.write_csv is write_csv
    with pytest.raises(AttributeError, match="diffusion_factory"):
        eb.diffusion_factory  # noqa: B018 - dropped: GaussianDiffusion.with_eps_scaler


@pytest.mark.parametrize("module", ["exposure_bias", "calibration", "plots"])
def test_no_imports_inside_functions(module):
    tree = ast.parse((ROOT / "guided_diffusion" / f"{module}.py").read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not inner, f"{module}.{fn.name} imports at line {inner[0].lineno}"
