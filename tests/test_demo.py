"""scripts/demo.py end to end, at toy sizes, on small Fashion-MNIST-format files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

BUNDLED = ROOT / "models" / "adm_fmnist32_ema.pt"


def _fmnist_like(path, n, seed):
    """Grey 32x32x3 uint8 images, 2-pixel zero border, like datasets/fashion_mnist.py."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 32, 32, 3), np.uint8)
    img[:, 2:30, 2:30, :] = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    np.savez(path, arr_0=img, arr_1=rng.integers(0, 10, n).astype(np.int64))


def _sets(out):
    """{lambda: images} of the sample sets of the demo run in ``out`` (one settings folder)."""
    (run,) = list((out / "runs").iterdir())
    sets = {}
    for d in run.iterdir():
        for f in d.glob("samples_*.npz"):
            with np.load(f) as z:
                sets[float(d.name)] = (f, z["arr_0"])
    return run, sets


def test_demo_end_to_end(tmp_path):
    assert BUNDLED.exists(), "the bundled model models/adm_fmnist32_ema.pt is part of the repo"
    data = tmp_path / "data"
    data.mkdir()
    _fmnist_like(data / "fmnist_train.npz", 64, 0)
    _fmnist_like(data / "fmnist_test.npz", 48, 1)
    out = tmp_path / "demo_out"
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out_dir", str(out)]
    cmd += ["--data_dir", str(data), "--steps", "4", "--lambdas", "0.99,1.0,1.02"]
    cmd += ["--num_samples", "12", "--calib_samples", "8", "--eb_samples", "8"]
    cmd += ["--batch_size", "8", "--threads", "1", "--num_boot", "50"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NOT comparable with Inception" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["steps"] == 4 and r["num_samples"] == 12
    lams = sorted(row["lambda"] for row in r["sweep"] if not row["calibrated"])
    cal = [row for row in r["sweep"] if row["calibrated"]]
    assert lams in ([0.99, 1.0, 1.02], [0.99, 1.0, 1.02, r["calibrated_b"]])
    assert len(cal) == 1 and cal[0]["lambda"] == r["calibrated_b"]
    base = next(row for row in r["sweep"] if row["lambda"] == 1.0)
    assert base["diff"] == 0 and base["diff_interval"] == [0, 0]
    for row in r["sweep"]:
        assert set(row) >= {"lambda", "fid", "diff", "diff_interval", "precision", "recall"}
        lo, hi = row["diff_interval"]
        assert np.isfinite(row["fid"]) and lo <= hi
        assert row["diff"] == pytest.approx(row["fid"] - base["fid"])
    best = min((row for row in r["sweep"] if not row["calibrated"]), key=lambda row: row["fid"])
    e = r["effect"]
    assert e["best_lambda"] == best["lambda"]
    assert e["best_beyond_noise"] == (best["diff_interval"][1] < 0)
    assert e["calibrated_b_above_1"] == (r["calibrated_b"] > 1)
    assert set(r["eps_norm"]) == {"training", "sampling, lambda 1"} | {
        f"sampling, lambda {r['calibrated_b']:g}"
    }
    assert all(len(v) == 4 for v in r["eps_norm"].values()) and len(r["delta_t"]["lambda 1"]) == 4
    for name in (
        "report.md",
        "calibration.png",
        "fid_vs_lambda.png",
        "delta_t.png",
        "eps_norm.png",
        "grids_adm_vs_es.png",
    ):
        assert (out / name).stat().st_size > 0, name
    run, sets = _sets(out)
    assert (run / "calibration.json").exists()
    assert sets[1.0][1].shape == (12, 32, 32, 3) and sets[1.0][1].dtype == np.uint8
    report = (out / "report.md").read_text()
    assert "| 1 |" in report and "NOT comparable" in report

    # resume: a rerun with the same settings reuses the calibration and the sample sets on
    # disk and redraws only what is missing, from the same seeds
    path, first = sets[1.02]
    path.unlink()  # "crashed" before this set was written
    np.savez(sets[0.99][0], arr_0=np.zeros((12, 32, 32, 3), np.uint8))  # proves reuse
    calib = (run / "calibration.json").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "calibration.json").read_text() == calib
    _, again = _sets(out)
    np.testing.assert_array_equal(again[1.02][1], first)
    fid = {
        row["lambda"]: row["fid"] for row in json.loads((out / "results.json").read_text())["sweep"]
    }
    assert fid[0.99] > 1.3 * max(fid[1.0], fid[1.02])  # blank images score far worse

    # other settings: a new run folder; the earlier one is kept
    cmd[cmd.index("--num_samples") + 1] = "8"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((out / "runs").iterdir())) == 2 and run.exists()


def test_demo_missing_model_is_one_line(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "demo.py"),
        "--model_path",
        str(tmp_path / "nope.pt"),
        "--data_dir",
        str(tmp_path),
        "--out_dir",
        str(tmp_path),
    ]
    data = tmp_path
    _fmnist_like(data / "fmnist_train.npz", 8, 0)
    _fmnist_like(data / "fmnist_test.npz", 8, 1)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "model not found" in proc.stderr and "Traceback" not in proc.stderr


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_demo_prepares_missing_data_with_the_dataset_script(tmp_path):
    """A fresh clone has no data/fmnist: the demo runs datasets/fashion_mnist.py itself
    (in its own process, as `make demo` does), from the IDX files."""
    src = tmp_path / "idx"
    src.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for split, n in (("train", 6), ("t10k", 4)):
        images[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(src / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(src / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    data = tmp_path / "data"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "demo.py"),
        "--data_dir",
        str(data),
        "--fmnist_source",
        str(src),
        "--model_path",
        str(tmp_path / "missing.pt"),  # stops the demo right after the data step
        "--out_dir",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "preparing Fashion-MNIST" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 2 and "model not found" in proc.stderr, proc.stderr
    with np.load(data / "fmnist_train.npz") as z:
        x = z["arr_0"]
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 2:30, 2:30, 1], images["train"])
    assert (data / "fmnist_test.npz").exists()

    # no IDX files: one line that names the problem and the fix
    cmd[cmd.index("--fmnist_source") + 1] = str(tmp_path / "nowhere")
    cmd[cmd.index("--data_dir") + 1] = str(tmp_path / "data2")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "cannot prepare Fashion-MNIST" in proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
