"""The shipped Fashion-MNIST feature net and ``evaluator.py --feature_net fmnist``."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import EvaluatorError
from evaluations import evaluator as evaluator_cli
from evaluations.evaluator import FMNIST_NOTE, Evaluator
from evaluations.fmnist_net import FEATURE_DIM, SPATIAL_DIM, FMNISTNet, load_fmnist_net

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "fmnist_classifier.pt"
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def test_split():
    """Debian's Fashion-MNIST test split as the project's 32x32x3 images, and labels."""
    images_gz = IDX_DIR / "t10k-images-idx3-ubyte.gz"
    labels_gz = IDX_DIR / "t10k-labels-idx1-ubyte.gz"
    if not images_gz.is_file() or not labels_gz.is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    images = _read_idx(images_gz, 16).reshape(-1, 28, 28)
    labels = _read_idx(labels_gz, 8).astype(np.int64)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3), labels  # (10000, 32, 32, 3)


@pytest.fixture(scope="module")
def net():
    return load_fmnist_net(WEIGHTS)


@pytest.fixture(scope="module")
def evaluator(net):
    return Evaluator(net, batch_size=500, device="cpu", progress=False)


def test_shipped_weights_and_card():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 4_000_000
    card = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert card["test_accuracy"] >= 0.90
    assert card["feature_dim"] == FEATURE_DIM and card["spatial_dim"] == SPATIAL_DIM
    assert "train_fmnist_classifier.py" in card["training_command"]


def test_classifies_real_test_images(net, test_split):
    images, labels = test_split
    x = torch.from_numpy(images[:200]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        pred = net.classify(x).argmax(1).numpy()
    assert (pred == labels[:200]).mean() >= 0.85
    # the same images at 28x28 (resized inside the net) are still recognised
    with torch.no_grad():
        pred28 = net.classify(x[:, :, 2:30, 2:30]).argmax(1).numpy()
    assert (pred28 == labels[:200]).mean() >= 0.6


def test_feature_shapes_and_softmax_head(net):
    x = torch.rand(5, 3, 32, 32) * 255
    with torch.no_grad():
        features, spatial = net(x)
        logits = net.logits(features)
    assert features.shape == (5, FEATURE_DIM) and spatial.shape == (5, SPATIAL_DIM)
    assert logits.shape == (5, 10)
    torch.testing.assert_close(logits, net.fc(torch.relu(features)))
    torch.testing.assert_close(logits, net.classify(x))


def test_fp16_storage_loads(tmp_path, net):
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "half.pt")
    half = load_fmnist_net(tmp_path / "half.pt")
    x = torch.rand(4, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(half(x)[0], net(x)[0], rtol=0.05, atol=0.05)
    with pytest.raises(EvaluatorError, match="not found"):
        load_fmnist_net(tmp_path / "missing.pt")
    torch.save({"block1.0.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(EvaluatorError, match="not an FMNISTNet"):
        load_fmnist_net(tmp_path / "foreign.pt")


@pytest.mark.filterwarnings("ignore:fid calculation produces singular product")
def test_fid_separates_real_from_noise(evaluator, test_split):
    images, _ = test_split
    half_a, half_b = images[:1000], images[1000:2000]
    noise = np.random.default_rng(0).integers(0, 256, half_a.shape, dtype=np.uint8)
    pool_a = evaluator.compute_activations([half_a])[0]
    pool_b = evaluator.compute_activations([half_b])[0]
    pool_noise = evaluator.compute_activations([noise])[0]
    stats_a = evaluator.compute_statistics(pool_a)
    assert abs(stats_a.frechet_distance(stats_a)) < 1e-3
    fid_real = evaluator.compute_statistics(pool_b).frechet_distance(stats_a)
    fid_noise = evaluator.compute_statistics(pool_noise).frechet_distance(stats_a)
    assert fid_real * 20 < fid_noise, (fid_real, fid_noise)
    assert evaluator.compute_inception_score(pool_a) > 5  # confident and varied over 10 classes
    precision, recall = evaluator.compute_prec_recall(pool_a, pool_b)
    assert precision > 0.5 and recall > 0.5
    # noise collapses onto a few features: the real images are outside its manifold
    assert evaluator.compute_prec_recall(pool_a, pool_noise)[1] < 0.05
    assert evaluator.compute_inception_score(pool_noise) < 2


def test_cli_fmnist_under_mpiexec(tmp_path, test_split):
    images, _ = test_split
    np.savez(tmp_path / "ref.npz", arr_0=images[:300])
    np.savez_compressed(tmp_path / "sample.npz", arr_0=images[300:500])
    cmd = [sys.executable, "evaluations/evaluator.py"]
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if mpiexec.exists():
        cmd = [str(mpiexec), "-n", "1", *cmd]
    proc = subprocess.run(
        [
            *cmd,
            str(tmp_path / "ref.npz"),
            str(tmp_path / "sample.npz"),
            "--feature_net",
            "fmnist",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "out.json"),
            "--no_progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert FMNIST_NOTE in lines
    assert [s.split(":")[0] for s in lines[-5:]] == [
        "Inception Score",
        "FID",
        "sFID",
        "Precision",
        "Recall",
    ]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["metadata"]["feature_net"] == "fmnist"
    assert result["metadata"]["comparable_with_inception_fid"] is False
    assert 0 < result["fid"] < 20 and result["precision"] > 0.5


def test_untrained_net_is_worse(test_split):
    images, labels = test_split
    x = torch.from_numpy(images[:200]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.manual_seed(0)
        pred = FMNISTNet().eval().classify(x).argmax(1).numpy()
    assert (pred == labels[:200]).mean() < 0.5  # the accuracy test above can fail


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BAD_WEIGHTS = {
    "truncated": "truncated",
    "pickled_code": "not a safe state dict (contains Python objects: posix.system)",
    "random_bytes": "not a torch checkpoint",
    "foreign": "is not an FMNISTNet state dict: 1 missing keys (first: block1.0.weight); "
    "1 unexpected keys (first: fc9.weight)",
    "not_a_dict": "is not a state dict of tensors (got Tensor)",
}


@pytest.mark.parametrize("kind", sorted(BAD_WEIGHTS))
def test_bad_weights_file_is_one_line(tmp_path, capsys, net, kind):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(WEIGHTS.read_bytes()[:5000])
    elif kind == "pickled_code":
        torch.save({"block1.0.weight": _Evil()}, path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "foreign":
        state = dict(net.state_dict())
        state["fc9.weight"] = state.pop("block1.0.weight")
        torch.save(state, path)
    else:
        torch.save(torch.zeros(3), path)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    argv = [tmp_path / "ref.npz", tmp_path / "ref.npz", "--feature_net", "fmnist"]
    argv += ["--fmnist_path", path, "--device", "cpu", "--no_progress"]
    assert evaluator_cli.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert BAD_WEIGHTS[kind] in err and str(path) in err
    assert "weights_only" not in err and "pwned" not in captured.out


def test_augment_flips_and_shifts_within_bounds():
    from evaluations.fmnist_train import augment

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    unshifted = augment(x, gen, max_shift=0)
    for i in range(2):  # no shift: each image is itself or its mirror image
        assert torch.equal(unshifted[i], x[i]) or torch.equal(unshifted[i], x[i].flip(2))
    shifted = augment(x, torch.Generator().manual_seed(1), max_shift=2)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    for i in range(2):  # a window of the zero-padded (maybe mirrored) image
        found = False
        for img in (x[i], x[i].flip(2)):
            padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    found |= torch.equal(shifted[i], padded[:, dy : dy + 8, dx : dx + 8])
        assert found
