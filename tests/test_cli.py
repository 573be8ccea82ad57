"""The script plumbing: the one flag table, start-up, one-line errors, Ctrl-C, seeding."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion import cli, seeding
from guided_diffusion import flags as F
from guided_diffusion.cli import progress_bar

from conftest import ROOT

MPIRUN = str(Path(sys.executable).parent / "mpirun")
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


def _parser(script: str) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "scripts" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.create_argparser()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run(script, args, n=None, timeout=300):
    cmd = [sys.executable, str(ROOT / "scripts" / script), *map(str, args)]
    if n is not None:
        cmd = [MPIRUN, "-n", str(n), *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT
    )


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- the table


def test_every_flag_of_every_script_comes_from_the_table():
    """No script defines its own flag or retypes help text: the table is the one source."""
    for script in SCRIPTS:
        for action in _parser(script)._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.dest in F.FLAGS, f"{script}: --{action.dest} is not in flags.FLAGS"
            flag = F.FLAGS[action.dest]
            assert action.help, f"{script}: --{action.dest} has no help"
            if flag.choices:
                assert tuple(action.choices) == tuple(flag.choices), (script, action.dest)


def test_every_table_flag_has_help_and_a_valid_default():
    for name, flag in F.FLAGS.items():
        assert flag.help and not flag.help.endswith("."), name
        ns = argparse.Namespace(**{name: flag.default})
        F.check_flags(ns, warn=False)  # the default itself is in range
        if flag.choices:
            assert flag.default in flag.choices, name


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("num_samples", 0, "--num_samples must be positive, got 0"),
        ("eps_scaler", 0.0, "--eps_scaler must be positive, got 0"),
        ("classifier_scale", float("nan"), "--classifier_scale must be a finite number"),
        ("classifier_scale", -5.0, "--classifier_scale must be non-negative, got -5"),
        ("compare_eps_scaler", -1.0, "--compare_eps_scaler must be non-negative, got -1"),
        ("ddim_eta", 1.5, "--ddim_eta must be >= 0 and <= 1, got 1.5"),
        ("dropout", 1.0, "--dropout must be >= 0 and < 1, got 1"),
        ("eps_scaler", float("inf"), "--eps_scaler must be a finite number"),
    ],
)
def test_ranges_give_one_line_naming_the_flag(name, value, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        F.check_flags(argparse.Namespace(**{name: value}))


def test_far_out_eps_scaler_warns_but_runs():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.check_flags(argparse.Namespace(eps_scaler=1e30))
        F.check_flags(argparse.Namespace(eps_scaler=1.017))
    assert len(caught) == 1 and "--eps_scaler 1e+30 lies far outside" in str(caught[0].message)


def test_defaults_views_keep_the_original_names_and_values():
    from guided_diffusion import script_util as su

    d = su.model_and_diffusion_defaults()
    assert d["eps_scaler"] == 1.0 and d["num_classes"] == 1000 and d["image_size"] == 64
    assert d["noise_schedule"] == "linear" and d["attention_resolutions"] == "16,8"
    assert set(su.classifier_defaults()) >= {"classifier_width", "classifier_pool"}
    sr = su.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and "image_size" not in sr and "channel_mult" not in sr
    assert su.str2bool("yes") and not su.str2bool("0")


# ----------------------------------------------------------------------------- seeding


def test_seeds_are_the_documented_function_of_their_keys():
    # batch j of seed s: SeedSequence([s mod 2^32, j]) -> 63 bits (the format of earlier runs)
    state = np.random.SeedSequence([7, 3]).generate_state(2)
    want = (int(state[0]) << 32 | int(state[1])) & (2**63 - 1)
    assert seeding.batch_seed(7, 3) == want
    assert seeding.sample_seeds(7, [3, 4]) == [want, seeding.batch_seed(7, 4)]
    assert len({seeding.step_seed(0, r, s) for r in range(3) for s in range(3)}) == 9
    assert seeding.stream_seed(want, 0) != seeding.stream_seed(want, 1)
    with pytest.raises(ValueError, match="non-negative"):
        seeding.derive_seed(-1)


# ----------------------------------------------------------------------------- start-up


def test_progress_bar_is_a_no_op_when_disabled():
    bar = progress_bar(10, "x", enabled=False)
    bar.update(3)
    bar.close()


def test_log_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = one_error_line(run("image_sample.py", ["--num_samples", 1, "--log_dir", f]))
    assert f"--log_dir {f} is a file" in line


def test_classifier_scale_nan_is_refused_before_any_work(tmp_path):
    args = ["--model_path", "m.pt", "--classifier_path", "c.pt", "--classifier_scale", "nan"]
    line = one_error_line(run("classifier_sample.py", [*args, "--log_dir", tmp_path]))
    assert "--classifier_scale must be a finite number, got nan" in line


def test_ctrl_c_under_mpirun_is_one_line_without_banner(tmp_path):
    """SIGINT to mpirun reaches every rank: one line on rank 0, exit 130, no traceback."""
    args = ["--num_samples", 4096, "--batch_size", 2, "--timestep_respacing", 50]
    cmd = [
        MPIRUN,
        "-n",
        "2",
        sys.executable,
        str(ROOT / "scripts" / "image_sample.py"),
        *map(str, [*args, "--log_dir", tmp_path, "--progress", "False"]),
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "shards").glob("batch_*.npz")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert err.count("interrupted; rerun the same command to resume") == 1, err
    assert "Traceback" not in err and "BAD TERMINATION" not in out + err
    assert list((tmp_path / "shards").glob("batch_*.npz"))  # the finished batches are kept


def test_bundled_data_defaults_are_repository_paths(tmp_path, monkeypatch):
    """The bundled model's reference batch is found from any working directory; a missing
    one is a one-line error saying how to prepare it."""
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ref.npz").write_bytes(b"x")
    monkeypatch.chdir("/")
    assert cli._bundled_default("ref_batch", "data/ref.npz") == str(tmp_path / "data" / "ref.npz")
    assert cli._bundled_default("feature_net", "fmnist") == "fmnist"
    with pytest.raises(cli.UserError, match="datasets/fashion_mnist.py") as e:
        cli._bundled_default("data_dir", "data/missing.npz")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_thin(script):
    """Entry points stay thin: the work lives in the library (issue 21: 150 lines at most,
    the demo 300)."""
    limit = 300 if script == "demo.py" else 150
    lines = len((ROOT / "scripts" / script).read_text().splitlines())
    assert lines <= limit, f"scripts/{script} has {lines} lines (limit {limit})"


@pytest.mark.parametrize(
    "args,match",
    [
        (["--settings", "b10:bundled"], "expected LABEL:MODEL:STEPS"),
        (["--settings", "a:bundled:10 a:bundled:20"], "distinct labels"),
        (["--settings", "a:bundled:10", "--data_dir", "nowhere.npz"], "datasets/fashion_mnist.py"),
    ],
)
def test_exposure_study_bad_input_is_one_line(args, match, tmp_path):
    proc = run("exposure_study.py", [*args, "--out_dir", tmp_path / "o"], timeout=120)
    assert match in one_error_line(proc)
