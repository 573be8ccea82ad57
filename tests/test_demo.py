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


def test_demo_end_to_end(tmp_path):
    assert BUNDLED.exists(), "the bundled model models/adm_fmnist32_ema.pt is part of the repo"
    data = tmp_path / "data"
    data.mkdir()
    _fmnist_like(data / "fmnist_train.npz", 64, 0)
    _fmnist_like(data / "fmnist_test.npz", 48, 1)
    out = tmp_path / "demo_out"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "demo.py"),
        "--out_dir",
        str(out),
        "--data_dir",
        str(data),
        "--steps",
        "4",
        "--lambdas",
        "0.99,1.0,1.02",
        "--num_samples",
        "12",
        "--calib_samples",
        "8",
        "--eb_samples",
        "8",
        "--batch_size",
        "8",
        "--threads",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NOT comparable with Inception" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["steps"] == 4
    lams = [row["lambda"] for row in r["sweep"]]
    assert lams[:3] == [0.99, 1.0, 1.02] and len(lams) == 4  # plus the calibrated b
    assert r["sweep"][3]["calibrated"] and r["sweep"][3]["lambda"] == round(r["calibrated_b"], 4)
    assert r["best_lambda"] in (0.99, 1.0, 1.02)
    best = min(r["sweep"][:3], key=lambda row: row["fid"])
    assert best["lambda"] == r["best_lambda"]
    for row in r["sweep"]:
        assert set(row) >= {"lambda", "fid", "inception_score", "precision", "recall"}
        assert np.isfinite(row["fid"]) and 1.0 <= row["inception_score"] <= 10.0
    assert set(r["delta_mean"]) == {"1.0", "best"}
    assert len(r["delta_t"]["1.0"]) == 4 and len(r["eps_norm"]["training"]) == 4
    for name in (
        "report.md",
        "calibration.json",
        "fid_vs_lambda.png",
        "delta_t.png",
        "eps_norm.png",
        "grids_adm_vs_es.png",
        "grid_lambda1.png",
    ):
        assert (out / name).stat().st_size > 0, name
    with np.load(out / "samples_lambda1.npz") as z:
        assert z["arr_0"].shape == (12, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    report = (out / "report.md").read_text()
    assert "| 1 |" in report and "NOT comparable" in report

    # resume: a rerun with the same settings reuses the calibration and the sample sets
    # on disk and redraws only what is missing, with the same seeds
    with np.load(out / "samples_lambda1.02.npz") as z:
        first_102 = z["arr_0"]
    (out / "samples_lambda1.02.npz").unlink()  # "crashed" before this set was written
    marker = np.zeros((12, 32, 32, 3), np.uint8)
    np.savez(out / "samples_lambda0.99.npz", arr_0=marker)  # proves the set is reused
    calib = (out / "calibration.json").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reusing" in proc.stdout
    assert (out / "calibration.json").read_text() == calib
    with np.load(out / "samples_lambda1.02.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], first_102)
    with np.load(out / "samples_lambda0.99.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], marker)
    r2 = json.loads((out / "results.json").read_text())
    fid = {row["lambda"]: row["fid"] for row in r2["sweep"]}
    assert fid[1.02] == pytest.approx({x["lambda"]: x["fid"] for x in r["sweep"]}[1.02])
    assert fid[0.99] > 2 * max(fid[1.0], fid[1.02])  # blank images score far worse

    # other settings: nothing is reused
    cmd[cmd.index("--num_samples") + 1] = "8"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "settings changed" in proc.stdout and "reusing" not in proc.stdout
    with np.load(out / "samples_lambda0.99.npz") as z:
        assert z["arr_0"].shape[0] == 8 and z["arr_0"].any()


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
