"""Evaluator: golden math (fixture section 7), the Inception port, streaming, CLI and errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tracemalloc
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations import EvaluatorError, evaluator, inception
from evaluations.evaluator import (
    DistanceBlock,
    Evaluator,
    FIDStatistics,
    FixedReferenceFID,
    ManifoldEstimator,
    NpzArrayReader,
    f64_to_f16,
    inception_score_from_preds,
    paired_bootstrap_fid,
)
from guided_diffusion.io_util import file_sha256

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden_small"
METRIC_LINES = ("Inception Score: ", "FID: ", "sFID: ", "Precision: ", "Recall: ")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "evaluator_math.npz") as z:
        arrays = dict(z)
    meta = json.loads((GOLDEN / "evaluator_math.json").read_text())
    return arrays, meta


# ---------------------------------------------------------------------------------------
# Golden math.
# ---------------------------------------------------------------------------------------


def test_statistics_and_fid_match_fixture(golden):
    z, meta = golden
    ev = Evaluator(TinyNet(), device="cpu", progress=False)
    stats_a = ev.compute_statistics(z["acts_A"])
    stats_b = ev.compute_statistics(z["acts_B"])
    assert stats_a.mu.dtype == np.float32 and np.array_equal(stats_a.mu, z["mu_A"])
    assert np.array_equal(stats_b.mu, z["mu_B"])
    np.testing.assert_allclose(stats_a.sigma, z["sigma_A"], rtol=1e-12, atol=1e-14)
    fid = stats_b.frechet_distance(stats_a)
    assert fid == pytest.approx(meta["fid"], rel=1e-6)
    assert FIDStatistics(z["mu_A"], z["sigma_A"]).frechet_distance(
        FIDStatistics(z["mu_B"], z["sigma_B"])
    ) == pytest.approx(meta["fid_A_vs_B"], rel=1e-6)


def test_inception_score_matches_fixture(golden):
    z, meta = golden
    split = int(z["is_split_size"])
    assert inception_score_from_preds(z["is_preds"], split) == pytest.approx(
        meta["inception_score"], rel=1e-6
    )
    assert inception_score_from_preds(z["is_preds"]) == pytest.approx(
        meta["inception_score_one_split"], rel=1e-6
    )
    # splits matter: one split and three splits disagree
    assert abs(meta["inception_score"] - meta["inception_score_one_split"]) > 0.1


def test_inception_score_of_uniform_and_one_hot():
    assert inception_score_from_preds(np.full((10, 4), 0.25, np.float32)) == pytest.approx(1.0)
    one_hot = np.eye(4, dtype=np.float32)[np.arange(12) % 4]  # exact zeros: no NaN
    assert inception_score_from_preds(one_hot) == pytest.approx(4.0, rel=1e-6)


def test_distance_block_fp16_path_is_bit_exact(golden):
    z, _ = golden
    block = DistanceBlock()
    d = block.pairwise_distances(z["acts_A"], z["acts_B"])
    assert block.last_path == "fp16"
    assert d.dtype == np.float32
    assert np.array_equal(d.astype(np.float16), z["dist_AB"])


def test_f64_to_f16_rounds_once():
    x = np.random.default_rng(0).standard_normal(200_000) * 300.0
    ours = f64_to_f16(torch.from_numpy(x)).numpy()
    assert np.array_equal(ours, x.astype(np.float16))  # numpy rounds float64 -> float16 once
    # a value just above a float16 tie that a float32 detour rounds down: 1 + 2^-11 + 2^-40
    tricky = torch.tensor([1 + 2.0**-11 + 2.0**-40], dtype=torch.float64)
    assert f64_to_f16(tricky).item() == 1 + 2.0**-10
    assert tricky.half().item() == 1.0  # torch's own cast double-rounds


def test_manifold_radii_and_precision_recall_match_fixture(golden):
    z, meta = golden
    est = ManifoldEstimator(DistanceBlock())
    radii_a = est.manifold_radii(z["acts_A"])
    radii_b = est.manifold_radii(z["acts_B"])
    assert np.array_equal(radii_a, z["radii_A"]) and np.array_equal(radii_b, z["radii_B"])
    precision, recall = est.evaluate_pr(z["acts_A"], radii_a, z["acts_B"], radii_b)
    assert precision[0] == meta["precision"] and recall[0] == meta["recall"]
    a_in_b, b_in_a = est.distance_block.less_thans(z["acts_A"], radii_a, z["acts_B"], radii_b)
    assert np.array_equal(a_in_b[:, 0], z["A_in_B_manifold"])
    assert np.array_equal(b_in_a[:, 0], z["B_in_A_manifold"])


def test_small_blocks_give_identical_results(golden):
    z, meta = golden
    est = ManifoldEstimator(DistanceBlock(sub_rows=64), row_batch_size=128, col_batch_size=70)
    radii_a = est.manifold_radii(z["acts_A"])
    radii_b = est.manifold_radii(z["acts_B"])
    assert np.array_equal(radii_a, z["radii_A"]) and np.array_equal(radii_b, z["radii_B"])
    precision, recall = est.evaluate_pr(z["acts_A"], radii_a, z["acts_B"], radii_b)
    assert (precision[0], recall[0]) == (meta["precision"], meta["recall"])


def test_float32_fallback_path_matches_fixture(golden):
    z, meta = golden
    block = DistanceBlock()
    est = ManifoldEstimator(block)
    radii_a = est.manifold_radii(z["fb_acts_A"])
    assert block.last_path == "fp32"  # float16 overflows at this scale
    radii_b = est.manifold_radii(z["fb_acts_B"])
    np.testing.assert_allclose(radii_a, z["fb_radii_A"], rtol=1e-6)
    np.testing.assert_allclose(radii_b, z["fb_radii_B"], rtol=1e-6)
    precision, recall = est.evaluate_pr(z["fb_acts_A"], radii_a, z["fb_acts_B"], radii_b)
    assert (precision[0], recall[0]) == (meta["fb_precision"], meta["fb_recall"])


def test_evaluator_prec_recall_orientation(golden):
    z, meta = golden
    ev = Evaluator(TinyNet(), device="cpu", progress=False)
    assert ev.compute_prec_recall(z["acts_A"], z["acts_B"]) == (meta["precision"], meta["recall"])
    with pytest.raises(EvaluatorError, match="at least 4"):
        ev.compute_prec_recall(z["acts_A"][:3], z["acts_B"][:3])
    with pytest.raises(EvaluatorError, match="dimensions differ"):
        ev.compute_prec_recall(z["acts_A"], z["acts_B"][:, :10])


def test_fid_singular_fallback_and_errors():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((20, 16)).astype(np.float32)
    acts[:, 3] = 0  # a dead feature: the covariance product is exactly singular
    stats = FIDStatistics(acts.mean(0), np.cov(acts, rowvar=False))
    with pytest.warns(UserWarning, match="singular product"):
        fid = stats.frechet_distance(stats)
    assert abs(fid) < 1e-3
    with pytest.raises(EvaluatorError, match="imaginary component"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(
            FIDStatistics(np.zeros(2), np.diag([1.0, -4.0]))
        )
    with pytest.raises(EvaluatorError, match="dimensions differ"):
        stats.frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)))


# ---------------------------------------------------------------------------------------
# The Inception port.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_NAME
    torch.save(inception.random_inception_state_dict(), path)
    return path


def test_state_dict_layout():
    state = inception.random_inception_state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert shapes["Mixed_6d.branch7x7dbl_5.conv.weight"] == (192, 160, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") or k.endswith("conv.bias") for k in state)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    model = inception.InceptionV3FID()
    # torchvision's Inception3 without AuxLogits has 23,834,568 parameters at 1000 classes;
    # 8 more classes add 8 * 2048 + 8.
    assert sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2049
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def test_average_pool_excludes_padding():
    x = torch.ones(1, 1, 5, 5)
    assert torch.equal(inception._avg_pool_3x3_same(x), x)  # corners are 1, not 4/9


def test_legacy_bilinear_resize():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    out = inception.resize_bilinear_tf_legacy(x, (4, 4))[0, 0]
    # src = dst * in / out = 0, 0.5, 1, 1.5 -> the last row/column is clamped (no half-pixel)
    expected = torch.tensor(
        [[0.0, 5.0, 10.0, 10.0], [10.0, 15.0, 20.0, 20.0], [20.0, 25, 30, 30], [20, 25, 30, 30]]
    )
    assert torch.equal(out, expected)
    # a non-integer factor, against a direct loop
    img = torch.rand(1, 2, 7, 5) * 255
    out = inception.resize_bilinear_tf_legacy(img, (11, 9))
    ref = torch.empty(1, 2, 11, 9)
    for i in range(11):
        sy = i * np.float32(7 / 11)
        y0 = int(np.floor(sy))
        y1, ly = min(y0 + 1, 6), sy - y0
        for j in range(9):
            sx = j * np.float32(5 / 9)
            x0 = int(np.floor(sx))
            x1, lx = min(x0 + 1, 4), sx - x0
            top = img[..., y0, x0] + (img[..., y0, x1] - img[..., y0, x0]) * lx
            bot = img[..., y1, x0] + (img[..., y1, x1] - img[..., y1, x0]) * lx
            ref[..., i, j] = top + (bot - top) * ly
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
    assert not torch.allclose(
        out, F.interpolate(img, size=(11, 9), mode="bilinear", align_corners=False)
    )


def test_inception_outputs_are_the_graph_tensors(weights_file):
    model = inception.load_inception(str(weights_file))
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(conv=o))
    model.Mixed_7c.register_forward_hook(lambda m, i, o: captured.update(last=o))
    images = torch.rand(2, 3, 40, 24) * 255
    with torch.no_grad():
        pool, spatial = model(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    assert captured["conv"].shape == (2, 192, 17, 17) and captured["last"].shape[-2:] == (8, 8)
    torch.testing.assert_close(pool, captured["last"].mean(dim=(2, 3)))
    nhwc = captured["conv"].permute(0, 2, 3, 1)[..., :7]
    torch.testing.assert_close(spatial, nhwc.reshape(2, -1))  # NHWC order, first 7 channels
    assert (spatial >= 0).all()  # a ReLU output
    logits = model.logits(pool)
    torch.testing.assert_close(logits, pool @ model.fc.weight.t())  # no bias
    assert not torch.allclose(logits, model.fc(pool))


def test_weights_with_or_without_num_batches_tracked(tmp_path, weights_file):
    state = torch.load(weights_file, weights_only=True)
    model = inception.InceptionV3FID()
    full = inception.add_missing_num_batches_tracked(state, model)
    assert len(full) > len(state)
    torch.save(full, tmp_path / "full.pth")
    a = inception.load_inception(str(weights_file))
    b = inception.load_inception(str(tmp_path / "full.pth"))
    assert a.fingerprint == b.fingerprint
    del state["fc.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(inception.WeightsUnavailableError, match="fc.bias"):
        inception.load_inception(str(tmp_path / "broken.pth"))
    with pytest.raises(EvaluatorError, match="not found at"):
        inception.load_inception(str(tmp_path / "missing.pth"))


def test_unreadable_inception_weights_are_one_line(tmp_path, weights_file):
    with open(weights_file, "rb") as f:
        (tmp_path / "trunc.pth").write_bytes(f.read(100_000))
    torch.save({"weights": inception.InceptionV3FID}, tmp_path / "code.pth")
    for name, reason in (("trunc.pth", "truncated"), ("code.pth", "not a safe state dict")):
        with pytest.raises(inception.WeightsUnavailableError) as info:
            inception.load_inception(str(tmp_path / name))
        message = str(info.value)
        assert message.startswith(f"Inception weights: cannot read {tmp_path / name}: ")
        assert reason in message and "\n" not in message and "weights_only" not in message


def test_offline_error_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ADM_ES_CACHE", str(tmp_path / "cache"))

    def offline(dest, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "download_weights", offline)
    with pytest.raises(inception.WeightsUnavailableError) as info:
        inception.load_inception()
    expected = tmp_path / "cache" / inception.WEIGHTS_NAME
    assert str(expected) in str(info.value) and "\n" not in str(info.value)


def test_download_checks_hash_and_renames(tmp_path, monkeypatch):
    src = tmp_path / "served.pth"
    src.write_bytes(b"not the weights")
    dest = tmp_path / "cache" / inception.WEIGHTS_NAME
    with pytest.raises(inception.WeightsUnavailableError, match="sha256"):
        inception.download_weights(dest, url=src.as_uri())
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # temp file removed
    digest = file_sha256(src)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", digest[:8])
    inception.download_weights(dest, url=src.as_uri())
    assert dest.read_bytes() == b"not the weights"


# ---------------------------------------------------------------------------------------
# Streaming reads.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_reads_in_chunks(tmp_path, compressed):
    images = np.random.default_rng(1).integers(0, 256, (10, 5, 7, 3), dtype=np.uint8)
    path = tmp_path / "batch.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=np.arange(10))
    with NpzArrayReader(str(path)) as reader:
        assert reader.shape == images.shape and len(reader) == 10
        chunks = list(reader.read_batches(3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert np.array_equal(np.concatenate(chunks), images)
    assert all(c.flags.writeable for c in chunks)


def test_streaming_plain_npy(tmp_path):
    images = np.random.default_rng(3).random((7, 4, 4, 3)).astype(">f4") * 255  # big-endian
    np.save(tmp_path / "batch.npy", images)
    with NpzArrayReader(str(tmp_path / "batch.npy")) as reader:
        chunks = list(reader.read_batches(2))
    assert np.array_equal(np.concatenate(chunks), images)
    ev = Evaluator(TinyNet(), device="cpu", progress=False)
    pool, _ = ev.read_activations(str(tmp_path / "batch.npy"))
    torch.testing.assert_close(pool, ev.compute_activations([images.astype(np.float32)])[0])


def test_streaming_memory_stays_at_one_chunk(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (256, 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "big.npz"
    np.savez_compressed(path, arr_0=images)
    total_bytes = images.nbytes  # 3.1 MB; a chunk of 4 rows is 49 KB
    del images
    tracemalloc.start()
    with NpzArrayReader(str(path)) as reader:
        n = sum(len(c) for c in reader.read_batches(4))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 256
    assert peak < total_bytes / 8  # a few chunks' worth of buffers, not the array


# ---------------------------------------------------------------------------------------
# Command line, with a tiny feature net standing in for Inception.
# ---------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """A deterministic stand-in feature net: 12 pool features, 6 spatial features."""

    name = "tiny"
    pool_dim = 12
    spatial_dim = 6
    comparable_with_inception = True
    feature_layout = "tiny"
    fingerprint = "tiny-v1"

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(12, 12, generator=gen))
        self.head = nn.Parameter(torch.randn(5, 12, generator=gen))

    def forward(self, x):
        x = F.interpolate(x / 255.0, size=(8, 8), mode="area")
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)  # (N, 12)
        return torch.tanh(pooled @ self.proj), F.adaptive_avg_pool2d(x, (1, 2)).flatten(1)

    def logits(self, pool):
        return pool @ self.head.t()


@pytest.fixture
def tiny_cli(monkeypatch):
    monkeypatch.setattr(evaluator, "load_feature_net", lambda *a, **k: TinyNet())

    def run(*argv):
        return evaluator.main([*map(str, argv), "--device", "cpu", "--no_progress"])

    return run


def _images(n, seed, size=(16, 16), high=256):
    return np.random.default_rng(seed).integers(0, high, (n, *size, 3), dtype=np.uint8)


def _metrics(stdout):
    lines = stdout.splitlines()
    values = {}
    for prefix in METRIC_LINES:
        (line,) = [s for s in lines if s.startswith(prefix)]
        values[prefix[:-2]] = float(line[len(prefix) :])
    return values


def test_cli_tiny_net_and_json(tmp_path, tiny_cli, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 0))
    np.savez_compressed(tmp_path / "sample.npz", arr_0=_images(25, 1, size=(20, 12), high=180))
    assert (
        tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz", "--json", tmp_path / "o.json") == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-6] == "Computing evaluations..."
    assert [s.split(":")[0] for s in lines[-5:]] == [p[:-2] for p in METRIC_LINES]
    values = _metrics(out)
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["fid"] == values["FID"] and result["recall"] == values["Recall"]
    assert result["metadata"]["num_ref"] == 30 and result["metadata"]["num_samples"] == 25
    assert result["metadata"]["ref_stats_source"] == "computed"
    assert result["metadata"]["sample_shape"] == [25, 20, 12, 3]
    assert values["FID"] > 0 and 0 <= values["Precision"] <= 1


def test_cli_uses_precomputed_reference_statistics(tmp_path, tiny_cli, capsys):
    ref_images, sample_images = _images(30, 0), _images(25, 1)
    np.savez(tmp_path / "sample.npz", arr_0=sample_images)
    ev = Evaluator(TinyNet(), device="cpu", progress=False)
    pool, spatial = ev.compute_activations([ref_images])
    mu, sigma = pool.mean(0) + 0.5, np.cov(pool, rowvar=False) * 2  # differs from arr_0's
    mu_s, sigma_s = spatial.mean(0), np.cov(spatial, rowvar=False)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "plain.npz", arr_0=ref_images)
    assert (
        tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz", "--json", tmp_path / "a.json") == 0
    )
    with_stats = _metrics(capsys.readouterr().out)
    assert tiny_cli(tmp_path / "plain.npz", tmp_path / "sample.npz") == 0
    plain = _metrics(capsys.readouterr().out)
    sample_stats = ev.compute_statistics(ev.compute_activations([sample_images])[0])
    assert with_stats["FID"] == pytest.approx(
        sample_stats.frechet_distance(FIDStatistics(mu, sigma)), rel=1e-9
    )
    assert with_stats["FID"] != pytest.approx(plain["FID"])
    assert with_stats["Precision"] == plain["Precision"]  # arr_0 still gives the manifold
    meta = json.loads((tmp_path / "a.json").read_text())["metadata"]
    assert meta["ref_stats_source"] == "ref_batch"


def test_cli_reference_stats_cache(tmp_path, tiny_cli, capsys, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 0))
    np.savez(tmp_path / "sample.npz", arr_0=_images(25, 1))
    cache = tmp_path / "stats" / "ref_cache.npz"
    cache.parent.mkdir()
    args = (tmp_path / "ref.npz", tmp_path / "sample.npz", "--ref_stats_cache", cache)
    assert tiny_cli(*args) == 0
    first = capsys.readouterr().out
    assert cache.is_file() and "computing reference batch activations" in first
    assert tiny_cli(*args) == 0
    second = capsys.readouterr().out
    assert "from " + str(cache) in second and "computing reference batch" not in second
    assert _metrics(first) == _metrics(second)
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 7))  # new content: cache is stale
    assert tiny_cli(*args) == 0
    third = capsys.readouterr().out
    assert "does not match; recomputing" in third and _metrics(third) != _metrics(first)
    monkeypatch.setattr(TinyNet, "fingerprint", "tiny-v2")  # other weights: stale again
    assert tiny_cli(*args) == 0
    assert "does not match; recomputing" in capsys.readouterr().out


def _corrupt_deflated(path):
    np.savez_compressed(path, arr_0=_images(8, 3, size=(32, 32)))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[start : start + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _write_bad(path, kind):
    if kind == "no_arr_0":
        np.savez(path, images=_images(8, 0))
    elif kind == "int32":
        np.savez(path, arr_0=_images(8, 0).astype(np.int32))
    elif kind == "gray":
        np.savez(path, arr_0=_images(8, 0)[..., 0])
    elif kind == "rgba":
        np.savez(path, arr_0=np.zeros((8, 16, 16, 4), np.uint8))
    elif kind in ("nan", "inf"):
        x = _images(8, 0).astype(np.float32)
        x[5, 3, 2, 1] = np.nan if kind == "nan" else np.inf
        np.savez(path, arr_0=x)
    elif kind == "three_images":
        np.savez(path, arr_0=_images(3, 0))
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04 this is not a zip file at all")
    elif kind == "truncated":
        np.savez(path, arr_0=_images(8, 0))
        path.write_bytes(path.read_bytes()[:-700])
    elif kind == "deflate":
        _corrupt_deflated(path)
    elif kind == "bad_stats":
        np.savez(
            path,
            arr_0=_images(8, 0),
            mu=np.zeros(7),
            sigma=np.eye(7),
            mu_s=np.zeros(6),
            sigma_s=np.eye(6),
        )
    elif kind == "partial_stats":
        np.savez(path, arr_0=_images(8, 0), mu=np.zeros(12))
    elif kind != "missing":
        raise ValueError(kind)


BAD_KINDS = {
    "missing": "no such file",
    "no_arr_0": "no array 'arr_0'",
    "int32": "dtype int32",
    "gray": "expected images",
    "rgba": "expected images",
    "nan": "NaN or inf",
    "inf": "NaN or inf",
    "three_images": "at least 4",
    "garbage": "not a valid .npz|corrupt",
    "truncated": "not a valid .npz|corrupt|truncated",
    "deflate": "corrupt",
    "bad_stats": "feature net 'tiny' gives 12",
    "partial_stats": "lacks",
}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_is_one_line_error(tmp_path, tiny_cli, capsys, kind):
    np.savez(tmp_path / "good.npz", arr_0=_images(8, 1))
    bad = tmp_path / "bad.npz"
    _write_bad(bad, kind)
    assert tiny_cli(bad, tmp_path / "good.npz") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert any(word in err for word in BAD_KINDS[kind].split("|")), err


def test_script_errors_without_traceback_also_under_mpiexec(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=_images(8, 0))
    commands = [[sys.executable, "evaluations/evaluator.py"]]
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if mpiexec.exists():
        commands.append([str(mpiexec), "-n", "1", *commands[0]])
    for cmd in commands:
        proc = subprocess.run(
            [*cmd, str(tmp_path / "ref.npz"), str(tmp_path / "nope.npz")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"error: {tmp_path / 'nope.npz'}: no such file"


def test_every_flag_has_help():
    parser = evaluator.create_argparser()
    for action in parser._actions:
        assert action.help, action.dest
    args = parser.parse_args(["r.npz", "s.npz"])
    assert args.feature_net == "inception" and args.batch_size == 64


# ---------------------------------------------------------------------------------------
# End to end with the real Inception architecture (random weights).
# ---------------------------------------------------------------------------------------


def _diagonal_stats(dim, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=dim), rng.uniform(0.5, 2.0, size=dim)


def _closed_form_fid(mu1, d1, mu2, d2):
    """FID between Gaussians with diagonal covariances: no matrix square root needed."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))


def test_end_to_end_random_inception(tmp_path, weights_file, capsys):
    """The CLI with the full Inception architecture (random weights) on two tiny batches.

    Both files carry precomputed diagonal statistics (the OpenAI reference-batch format), so
    FID and sFID have closed forms and the two 2048-d square roots are the only ones: with
    statistics from 5 images of a random network, dead features make the product singular
    and the fallback would double the (CPU-expensive) square roots. The path from
    activations to statistics is tested above with the tiny net.
    """
    stats = {}
    for name, seed, images in (
        ("ref", 0, _images(6, 0, size=(32, 32))),
        ("sample", 1, _images(5, 1, size=(40, 28))),
    ):
        mu, d = _diagonal_stats(2048, seed)
        mu_s, d_s = _diagonal_stats(2023, seed + 10)
        stats[name] = (mu, d, mu_s, d_s)
        save = np.savez if name == "ref" else np.savez_compressed
        save(
            tmp_path / f"{name}.npz",
            arr_0=images,
            mu=mu,
            sigma=np.diag(d),
            mu_s=mu_s,
            sigma_s=np.diag(d_s),
        )
    argv = [
        str(tmp_path / "ref.npz"),
        str(tmp_path / "sample.npz"),
        "--inception_path",
        str(weights_file),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--json",
        str(tmp_path / "out.json"),
    ]
    assert evaluator.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[:6] == [
        "warming up the feature network...",
        "computing reference batch activations...",
        "computing/reading reference batch statistics...",
        "computing sample batch activations...",
        "computing/reading sample batch statistics...",
        "Computing evaluations...",
    ]
    values = _metrics(captured.out)
    assert all(np.isfinite(v) for v in values.values())
    mu1, d1, mu1_s, d1_s = stats["sample"]
    mu2, d2, mu2_s, d2_s = stats["ref"]
    assert values["FID"] == pytest.approx(_closed_form_fid(mu1, d1, mu2, d2), rel=1e-6)
    assert values["sFID"] == pytest.approx(_closed_form_fid(mu1_s, d1_s, mu2_s, d2_s), rel=1e-6)
    assert 1.0 <= values["Inception Score"] <= 1008
    assert 0 <= values["Precision"] <= 1 and 0 <= values["Recall"] <= 1
    result = json.loads((tmp_path / "out.json").read_text())
    meta = result["metadata"]
    assert meta["feature_net"] == "inception" and meta["comparable_with_inception_fid"] is True
    assert meta["ref_stats_source"] == "ref_batch" and meta["sample_shape"] == [5, 40, 28, 3]
    assert "img/s" in captured.err  # progress bars with their rate


# ---------------------------------------------------------------------------------------
# Output files: folders are not created; atomic writes with the user's umask.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--ref_stats_cache", "--json"])
def test_output_in_missing_folder_is_refused_before_work(tmp_path, tiny_cli, capsys, flag):
    np.savez(tmp_path / "ref.npz", arr_0=_images(8, 0))
    np.savez(tmp_path / "sample.npz", arr_0=_images(8, 1))
    target = tmp_path / "nonexistent" / "dir" / "c.npz"
    assert tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz", flag, target) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"error: {flag} {target}: folder ") and "\n" not in err
    assert "does not exist" in err and captured.out == ""  # refused before any work
    assert not (tmp_path / "nonexistent").exists()


def test_cache_path_that_is_a_folder_is_refused(tmp_path, tiny_cli, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=_images(8, 0))
    np.savez(tmp_path / "sample.npz", arr_0=_images(8, 1))
    (tmp_path / "cache").mkdir()
    code = tiny_cli(
        tmp_path / "ref.npz", tmp_path / "sample.npz", "--ref_stats_cache", tmp_path / "cache"
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is a folder" in err and "\n" not in err


def test_written_files_get_the_umask_permissions(tmp_path, tiny_cli, capsys, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=_images(8, 0))
    np.savez(tmp_path / "sample.npz", arr_0=_images(8, 1))
    src = tmp_path / "served.pth"
    src.write_bytes(b"weights")
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", file_sha256(src)[:8])
    old = os.umask(0o027)
    try:
        args = ["--ref_stats_cache", tmp_path / "c.npz", "--json", tmp_path / "o.json"]
        assert tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz", *args) == 0
        inception.download_weights(tmp_path / "w" / "weights.pth", url=src.as_uri())
    finally:
        os.umask(old)
    for name in ("c.npz", "o.json", "w/weights.pth"):  # mkstemp alone would give 0600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------
# Float images: only [0, 255] (or [0, 1] with --float_range 0-1) is scored.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "low,high,fix",
    [
        (0.0, 1.0, "multiply by 255 (or pass --float_range 0-1)"),
        (-1.0, 1.0, "map [-1, 1] with (x + 1) * 127.5"),
        (0.0, 300.0, "clip or rescale the images"),
    ],
)
def test_float_images_out_of_range_are_refused(tmp_path, tiny_cli, capsys, low, high, fix):
    np.savez(tmp_path / "ref.npz", arr_0=_images(8, 0))
    x = np.random.default_rng(0).uniform(low, high, (8, 16, 16, 3)).astype(np.float32)
    x.reshape(-1)[:2] = low, high  # the exact range
    np.savez(tmp_path / "sample.npz", arr_0=x)
    assert tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz") == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == (
        f"error: sample batch {tmp_path / 'sample.npz'}: float images in [{low:.2f}, "
        f"{high:.2f}]; the evaluator expects uint8 or floats in [0, 255]: {fix}"
    )
    assert captured.out == ""  # checked before the network runs


def test_float_range_flag_scores_unit_floats_like_uint8(tmp_path, tiny_cli, capsys):
    ref, sample = _images(30, 0), _images(25, 1)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "sample.npz", arr_0=sample)
    np.savez(tmp_path / "ref01.npz", arr_0=ref.astype(np.float64) / 255)
    np.savez(tmp_path / "sample01.npz", arr_0=sample.astype(np.float32) / 255)
    np.savez(tmp_path / "sample255.npz", arr_0=sample.astype(np.float32))
    assert tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz") == 0
    want = _metrics(capsys.readouterr().out)
    assert tiny_cli(tmp_path / "ref01.npz", tmp_path / "sample01.npz", "--float_range", "0-1") == 0
    got = _metrics(capsys.readouterr().out)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # with --float_range 0-1, [0, 255] floats are refused, uint8 is still scored as is
    args = (tmp_path / "ref.npz", tmp_path / "sample255.npz", "--float_range", "0-1")
    assert tiny_cli(*args) == 2
    assert "--float_range 0-1 expects floats in [0, 1]" in capsys.readouterr().err


def test_evaluator_api_refuses_unit_floats_unless_asked():
    ev = Evaluator(TinyNet(), device="cpu", progress=False)
    images = _images(6, 0)
    with pytest.raises(EvaluatorError, match=r"images: float images in \[0\.\d\d, 1\.00\]"):
        ev.compute_activations([images / 255.0])
    with pytest.raises(EvaluatorError, match="NaN or inf"):
        ev.compute_activations([np.full((2, 8, 8, 3), np.nan, np.float32)])
    unit = Evaluator(TinyNet(), device="cpu", progress=False, float_range="0-1")
    np.testing.assert_allclose(
        unit.compute_activations([images / 255.0])[0],
        ev.compute_activations([images])[0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_grey_images_as_three_equal_channels(tmp_path, tiny_cli, capsys):
    grey = _images(12, 0)[..., :1]
    np.savez(tmp_path / "ref.npz", arr_0=np.repeat(grey, 3, axis=3))
    np.savez(tmp_path / "sample.npz", arr_0=np.repeat(grey[::-1], 3, axis=3))
    assert tiny_cli(tmp_path / "ref.npz", tmp_path / "sample.npz") == 0
    values = _metrics(capsys.readouterr().out)
    assert abs(values["FID"]) < 1e-6  # the same images in another order
    assert values["Precision"] == 1.0 and values["Recall"] == 1.0
    np.savez(tmp_path / "one.npz", arr_0=grey)  # one channel: refused with the fix
    assert tiny_cli(tmp_path / "ref.npz", tmp_path / "one.npz") == 2
    assert "three equal channels" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Library API: Evaluator.reference / score, FixedReferenceFID, paired_bootstrap_fid.
# ---------------------------------------------------------------------------------------


def test_score_matches_the_cli(tmp_path, tiny_cli, capsys):
    ref_images, sample_images = _images(30, 0), _images(25, 1, size=(20, 12))
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    np.savez(tmp_path / "sample.npz", arr_0=sample_images)
    assert (
        tiny_cli(
            tmp_path / "ref.npz",
            tmp_path / "sample.npz",
            "--json",
            tmp_path / "o.json",
            "--batch_size",
            7,
        )
        == 0
    )
    cli = json.loads((tmp_path / "o.json").read_text())
    # the same batch size on both sides: float32 activations summed in other batches
    # round differently (FID 0.013 differed by 4.7e-11 at batch sizes 7 and 64)
    ev = Evaluator(TinyNet(), batch_size=7, device="cpu", progress=False)
    ref = ev.reference(ref_images)
    assert ref.pool.shape == (30, 12) and ref.source == "computed"
    scores = ev.score(sample_images, ref)
    assert scores.as_dict() == pytest.approx({k: cli[k] for k in scores.as_dict()}, rel=1e-9)
    assert scores.pool.shape == (25, 12)
    from_file = ev.score(sample_images, ev.read_reference(str(tmp_path / "ref.npz")))
    assert from_file.as_dict() == scores.as_dict()
    with pytest.raises(EvaluatorError, match="three equal channels"):
        ev.score(sample_images[..., 0], ref)


def test_fixed_reference_fid_matches_frechet_distance(golden):
    z, meta = golden
    ref = FIDStatistics(z["mu_A"], z["sigma_A"])
    fid = FixedReferenceFID(ref)
    assert fid(z["mu_B"], z["sigma_B"]) == pytest.approx(meta["fid_A_vs_B"], rel=1e-9)
    # stacked: the reference against itself and against B
    mus, sigmas = np.stack([z["mu_A"], z["mu_B"]]), np.stack([z["sigma_A"], z["sigma_B"]])
    np.testing.assert_allclose(fid(mus, sigmas), [0.0, meta["fid_A_vs_B"]], rtol=1e-9, atol=1e-6)


def _gaussian_sets(rng, n, dim, shift=0.0):
    """A reference and two sample sets from one Gaussian that differs from the reference's
    (as model samples do), ``b`` shifted by ``shift`` in every coordinate."""
    mix = np.eye(dim) + 0.3 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    ref_x = rng.standard_normal((4 * n, dim)) @ mix
    ref = FIDStatistics(ref_x.mean(0), np.cov(ref_x, rowvar=False))
    a = 1.3 * rng.standard_normal((n, dim)) @ mix + 0.5
    b = 1.3 * rng.standard_normal((n, dim)) @ mix + 0.5 + shift
    return ref, a.astype(np.float32), b.astype(np.float32)


def test_paired_bootstrap_point_estimates_and_shift():
    ref, a, b = _gaussian_sets(np.random.default_rng(0), 400, 16, shift=0.25)
    out = paired_bootstrap_fid(ref, a, b, num_boot=300, seed=1)
    for key, x in (("fid_a", a), ("fid_b", b)):
        stats = FIDStatistics(x.mean(0), np.cov(x, rowvar=False))
        assert out[key] == stats.frechet_distance(ref)  # the evaluator's own number
    assert out["diff"] == out["fid_a"] - out["fid_b"]
    low, high = out["diff_interval"]
    assert low < out["diff"] < high and high < 0  # b is shifted further from the reference
    assert out["num_boot"] == 300 and out["num_samples"] == 400 and out["level"] == 0.95
    assert paired_bootstrap_fid(ref, a, b, num_boot=300, seed=1) == out  # seeded
    assert paired_bootstrap_fid(ref, a, b, num_boot=300, seed=2) != out


def test_paired_bootstrap_covers_zero_at_the_stated_rate():
    """Two independent draws from one distribution: the 90% interval of FID(a) - FID(b)
    covers 0 in about 90% of repeats (binomial(60, 0.9): 48..59 holds 99.6% of runs), and
    the bootstrap standard error matches the spread of the difference over repeats."""
    rng = np.random.default_rng(0)
    covered, diffs, stds = 0, [], []
    for rep in range(60):
        ref, a, b = _gaussian_sets(rng, 200, 8)
        out = paired_bootstrap_fid(ref, a, b, num_boot=200, seed=rep, level=0.9)
        low, high = out["diff_interval"]
        covered += low <= 0 <= high
        diffs.append(out["diff"])
        stds.append(out["diff_std"])
    assert 48 <= covered <= 59, covered
    assert 0.7 < np.median(stds) / np.std(diffs) < 1.4, (np.median(stds), np.std(diffs))


def test_paired_bootstrap_uses_the_same_draw_for_both_sets():
    """b = a + tiny noise: shared noise cancels, so the paired interval of the difference
    is far narrower than the spread of either FID (an unpaired draw would not be)."""
    ref, a, _ = _gaussian_sets(np.random.default_rng(3), 300, 8)
    b = a + 0.01 * np.random.default_rng(4).standard_normal(a.shape).astype(np.float32)
    out = paired_bootstrap_fid(ref, a, b, num_boot=200)
    width = out["diff_interval"][1] - out["diff_interval"][0]
    assert width < 0.05 * 4 * out["fid_a_std"] and out["diff_std"] < 0.05 * out["fid_a_std"]


def test_paired_bootstrap_errors():
    ref, a, b = _gaussian_sets(np.random.default_rng(0), 20, 4)
    with pytest.raises(EvaluatorError, match="same seed"):
        paired_bootstrap_fid(ref, a, b[:10])
    with pytest.raises(EvaluatorError, match="same seed"):
        paired_bootstrap_fid(ref, a[:, :3], b[:, :3])
    with pytest.raises(EvaluatorError, match="num_boot"):
        paired_bootstrap_fid(ref, a, b, num_boot=1)
