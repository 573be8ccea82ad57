"""The classifier, super-resolution and likelihood entry points, end to end on tiny models."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from test_train import cli_flags, load, run_script, tiny_flags, write_npz

from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

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
    clf = run_script(
        "classifier_train.py",
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
    )
    assert clf.returncode == 0, clf.stderr
    for name in ("model000002.pt", "opt000002.pt", "model000004.pt", "opt000004.pt"):
        assert (tmp_path / "clf" / name).exists(), name
    for key in ("train_loss", "train_acc@1", "train_acc@5", "val_loss", "val_acc@1", "val_acc@5"):
        assert re.search(rf"\| {re.escape(key)} +\|", clf.stdout), key

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


def test_super_res_train_and_sample(tmp_path):
    data = write_npz(tmp_path / "d.npz", n=4, size=64, labels=False)
    flags = dict(
        large_size=64,
        small_size=16,
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="8",
        num_head_channels=32,
        **DIFFUSION,
    )
    train = run_script(
        "super_res_train.py",
        *cli_flags(flags),
        f"--data_dir={data}",
        "--batch_size=2",
        "--max_steps=2",
        "--num_workers=0",
        f"--log_dir={tmp_path / 'sr'}",
    )
    assert train.returncode == 0, train.stderr
    defaults = sr_model_and_diffusion_defaults()
    defaults.update(flags)
    defaults.pop("use_bf16")
    model, _ = sr_create_model_and_diffusion(**defaults)
    model.load_state_dict(load(tmp_path / "sr" / "model000002.pt"), strict=True)

    low = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "low.npz", low)
    sample = run_script(
        "super_res_sample.py",
        *cli_flags(flags),
        f"--model_path={tmp_path / 'sr' / 'ema_0.9999_000002.pt'}",
        f"--base_samples={tmp_path / 'low.npz'}",
        "--timestep_respacing=2",
        "--num_samples=4",
        "--batch_size=2",
        f"--log_dir={tmp_path / 'up'}",
    )
    assert sample.returncode == 0, sample.stderr
    out = np.load(tmp_path / "up" / "samples_4x64x64x3.npz")["arr_0"]
    assert out.shape == (4, 64, 64, 3) and out.dtype == np.uint8

    wrong = run_script(
        "super_res_sample.py",
        *cli_flags({**flags, "small_size": 32}),
        f"--model_path={tmp_path / 'sr' / 'model000002.pt'}",
        f"--base_samples={tmp_path / 'low.npz'}",
        f"--log_dir={tmp_path / 'up2'}",
    )
    assert wrong.returncode != 0 and "--small_size is 32" in wrong.stderr
    assert wrong.stderr.strip().count("\n") == 0, wrong.stderr


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
