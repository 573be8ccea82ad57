"""The classifier, super-resolution and likelihood entry points, end to end on tiny models."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_train import cli_flags, load, run_script, snapshot, tiny_flags, write_npz

from guided_diffusion import logger
from guided_diffusion.likelihood import run_bpd_evaluation
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.seeding import make_generator, step_seed

DIFFUSION = dict(diffusion_steps=20, noise_schedule="cosine")
CLASSIFIER = dict(
    image_size=8,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="4",
    classifier_channel_mult="1,2",
    num_classes=2,
    **DIFFUSION,
)


def test_classifier_training_feeds_classifier_sample(tmp_path):
    """Train a class-conditional UNet and a noisy classifier for a few steps; both load
    (strict) into classifier_sample.py with nothing but their training flags."""
    data = write_npz(tmp_path / "d.npz")
    model_flags = tiny_flags(class_cond=True, num_classes=2)
    unet = run_script(
        "image_train.py",
        *cli_flags(model_flags),
        f"--data_dir={data}",
        "--batch_size=4",
        "--max_steps=2",
        "--num_workers=0",
        f"--log_dir={tmp_path / 'unet'}",
    )
    assert unet.returncode == 0, unet.stderr
    clf_args = [
        *cli_flags(CLASSIFIER),
        f"--data_dir={data}",
        f"--val_data_dir={data}",
        "--batch_size=4",
        "--iterations=4",
        "--save_interval=2",
        "--eval_interval=2",
        "--log_interval=2",
        "--anneal_lr=True",
        "--num_workers=0",
        f"--log_dir={tmp_path / 'clf'}",
    ]
    clf = run_script("classifier_train.py", *clf_args)
    assert clf.returncode == 0, clf.stderr
    for name in ("model000002.pt", "opt000002.pt", "model000004.pt", "opt000004.pt"):
        assert (tmp_path / "clf" / name).exists(), name
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1", "val_acc@5"):
        assert re.search(rf"\| {re.escape(key)} +\|", clf.stdout), key
    before = snapshot(tmp_path / "clf")
    refused = run_script("classifier_train.py", *clf_args, "--lr=1e-3")
    assert refused.returncode == 2 and "--lr 0.0003 there, 0.001 now" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert snapshot(tmp_path / "clf") == before

    saved = json.loads((tmp_path / "clf" / "flags.json").read_text())
    classifier = create_classifier(
        **{k: saved[k] for k in classifier_defaults()}, num_classes=saved["num_classes"]
    )
    classifier.load_state_dict(load(tmp_path / "clf" / "model000004.pt"), strict=True)

    clf_flags = {k: v for k, v in CLASSIFIER.items() if k not in DIFFUSION}
    sample = run_script(
        "classifier_sample.py",
        *cli_flags(model_flags),
        *cli_flags(clf_flags),
        f"--model_path={tmp_path / 'unet' / 'ema_0.9999_000002.pt'}",
        f"--classifier_path={tmp_path / 'clf' / 'model000004.pt'}",
        "--timestep_respacing=3",
        "--num_samples=2",
        "--batch_size=2",
        "--progress=False",
        f"--log_dir={tmp_path / 'samples'}",
    )
    assert sample.returncode == 0, sample.stderr
    (out,) = (tmp_path / "samples").glob("samples_2x8x8x3.npz")
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)


SR = dict(
    large_size=32,
    small_size=16,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="8",
    num_head_channels=32,
    class_cond=True,
    num_classes=2,
    **DIFFUSION,
)


def test_super_res_train_and_sample(tmp_path):
    """Train a class-conditional super-resolution model for 2 steps (a rerun with other flags
    is refused); it loads strictly, and super_res_sample.py upsamples the base samples in
    order, cycled, each with its own label."""
    data = write_npz(tmp_path / "d.npz", n=4, size=32)
    train_args = [
        *cli_flags(SR),
        f"--data_dir={data}",
        "--batch_size=2",
        "--max_steps=2",
        "--num_workers=0",
        f"--log_dir={tmp_path / 'sr'}",
    ]
    train = run_script("super_res_train.py", *train_args)
    assert train.returncode == 0, train.stderr
    defaults = sr_model_and_diffusion_defaults()
    defaults.update(SR)
    model, _ = sr_create_model_and_diffusion(**defaults)
    model.load_state_dict(load(tmp_path / "sr" / "model000002.pt"), strict=True)
    refused = run_script("super_res_train.py", *train_args, "--dropout=0.1")
    assert refused.returncode == 2 and "--dropout 0.0 there, 0.1 now" in refused.stderr

    low = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    labels = np.array([1, 0, 1])
    np.savez(tmp_path / "low.npz", low, labels)
    sample = run_script(
        "super_res_sample.py",
        *cli_flags(SR),
        f"--model_path={tmp_path / 'sr' / 'ema_0.9999_000002.pt'}",
        f"--base_samples={tmp_path / 'low.npz'}",
        "--timestep_respacing=2",
        "--num_samples=5",
        "--batch_size=2",
        "--progress=False",
        f"--log_dir={tmp_path / 'up'}",
    )
    assert sample.returncode == 0, sample.stderr
    with np.load(tmp_path / "up" / "samples_5x32x32x3.npz") as out:
        assert out["arr_0"].shape == (5, 32, 32, 3) and out["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(out["arr_1"], labels[[0, 1, 2, 0, 1]])

    wrong = run_script(
        "super_res_sample.py",
        *cli_flags({**SR, "small_size": 8}),
        f"--model_path={tmp_path / 'sr' / 'model000002.pt'}",
        f"--base_samples={tmp_path / 'low.npz'}",
        f"--log_dir={tmp_path / 'up2'}",
    )
    assert wrong.returncode == 2 and "--small_size is 8" in wrong.stderr
    assert wrong.stderr.strip().count("\n") == 0, wrong.stderr
    missing = run_script("super_res_sample.py", f"--base_samples={tmp_path / 'low.npz'}")
    assert missing.returncode == 2 and "--model_path is required" in missing.stderr


def test_bits_per_dim_apply_the_eps_scaler_like_the_original():
    """run_bpd_evaluation is calc_bpd_loop averaged over batches; lambda = b divides eps in
    p_mean_variance (as the original), so b != 1 changes the bound and b = 1 is plain ADM."""
    flags = tiny_flags()
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    with torch.no_grad():
        for p in model.out.parameters():  # the output layer starts at zero: eps = 0
            p.normal_(0, 0.1)
    scaled = create_model_and_diffusion(**{**flags, "eps_scaler": 1.2})[1]
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    data = iter([(x[:1], {}), (x[1:], {})])
    logger.configure(None, format_strs=[])
    with torch.no_grad():
        out = run_bpd_evaluation(model, diffusion, data, num_samples=2, seed=3)
        generator = make_generator(step_seed(3, 0, 0))  # rank 0's, as documented
        direct = [diffusion.calc_bpd_loop(model, x[i : i + 1], generator=generator) for i in (0, 1)]
        other = run_bpd_evaluation(model, scaled, iter([(x[:1], {})]), num_samples=1, seed=3)
    assert out["vb"].shape == (flags["diffusion_steps"],)
    np.testing.assert_allclose(
        out["vb"], np.mean([d["vb"][0].numpy() for d in direct], axis=0), rtol=1e-5
    )
    assert float(other["bpd"]) != pytest.approx(float(direct[0]["total_bpd"][0]), rel=1e-4)


def test_image_nll_prints_bits_per_dim(tmp_path):
    data = write_npz(tmp_path / "d.npz", labels=False)
    flags = tiny_flags()
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = run_script(
        "image_nll.py",
        *cli_flags({k: flags[k] for k in model_and_diffusion_defaults()}),
        f"--model_path={tmp_path / 'model.pt'}",
        f"--data_dir={data}",
        "--num_samples=4",
        "--batch_size=2",
        f"--log_dir={tmp_path / 'nll'}",
    )
    assert out.returncode == 0, out.stderr
    bpd = float(re.search(r"bits/dim: ([0-9.]+)", out.stdout).group(1))
    assert 0 < bpd < 100
    vb = np.load(tmp_path / "nll" / "vb_terms.npz")["arr_0"]
    assert vb.shape == (flags["diffusion_steps"],) and np.all(np.isfinite(vb))

    missing = run_script(
        "image_nll.py",
        *cli_flags({k: flags[k] for k in model_and_diffusion_defaults()}),
        f"--model_path={tmp_path / 'model.pt'}",
        f"--data_dir={tmp_path / 'missing'}",
        f"--log_dir={tmp_path / 'nll2'}",
    )
    assert missing.returncode != 0 and "not found" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0, missing.stderr
