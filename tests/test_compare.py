"""scripts/compare_samplers.py end to end, at toy sizes, on the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT


def _fmnist_like(path, n, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 32, 32, 3), np.uint8)
    img[:, 2:30, 2:30, :] = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    np.savez(path, arr_0=img, arr_1=rng.integers(0, 10, n).astype(np.int64))


def run(args, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_samplers.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_compare_samplers_table_and_resume(tmp_path):
    _fmnist_like(tmp_path / "ref.npz", 40, 1)
    _fmnist_like(tmp_path / "train.npz", 16, 0)
    out = tmp_path / "out"
    args = ["--ref_batch", tmp_path / "ref.npz", "--feature_net", "fmnist", "--out_dir", out]
    args += ["--steps_list", "3,4", "--num_samples", 8, "--batch_size", 4, "--num_boot", 20]
    args += ["--methods", "adm,es,ts_es,ddim_eta1,dpmpp2m", "--data_dir", tmp_path / "train.npz"]
    args += ["--calib_samples", 4, "--progress", "False"]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["steps"], r["method"]) for r in rows] == [
        (s, m) for s in (3, 4) for m in ("adm", "es", "ts_es", "ddim_eta1", "dpmpp2m")
    ]
    for r in rows:
        assert np.isfinite(r["fid"]) and r["diff_interval"][0] <= r["diff_interval"][1]
        if r["method"] == "adm":
            assert r["diff"] == 0
        assert r["b"] > 0.9  # the calibrated b of that step count
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| 3_ts_es |" in table
    assert (out / "comparison.png").stat().st_size > 0
    again = run(args, tmp_path)  # every set and both calibrations are on disk: nothing to redo
    assert again.returncode == 0 and again.stdout.count("nothing to do") == len(rows)
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_compare_samplers_needs_a_reference(tmp_path):
    # the bundled model brings its reference batch and data; explicitly empty ones are
    # refused (on a fresh clone without data/fmnist the missing data is named instead)
    args = ["--out_dir", tmp_path, "--methods", "adm,es", "--ref_batch", "", "--data_dir", ""]
    proc = run(args, tmp_path)
    assert proc.returncode == 2 and "--ref_batch" in proc.stderr and "Traceback" not in proc.stderr
