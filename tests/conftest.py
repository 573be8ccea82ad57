"""Shared test fixtures: the golden files computed with the original ADM-ES code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "golden_small"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_json(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="session")
def golden_flags() -> dict:
    """The full create_model_and_diffusion flags of golden_small/model.pt (eps_scaler 1.0)."""
    flags = load_json("golden_small/model_flags.json")["flags"]
    flags["eps_scaler"] = 1.0  # the fixture records the original's default 0.0
    return flags


@pytest.fixture(scope="session")
def golden_model(golden_flags):
    from guided_diffusion.script_util import create_model

    keys = (
        "num_channels num_res_blocks channel_mult learn_sigma class_cond use_checkpoint "
        "attention_resolutions num_heads num_head_channels num_heads_upsample "
        "use_scale_shift_norm dropout resblock_updown use_fp16 use_new_attention_order"
    ).split()
    model = create_model(golden_flags["image_size"], **{k: golden_flags[k] for k in keys})
    state = torch.load(GOLDEN / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def golden_classifier():
    from guided_diffusion.script_util import create_classifier

    flags = load_json("golden_small/classifier_flags.json")["flags"]
    clf = create_classifier(
        image_size=flags["image_size"],
        classifier_use_fp16=flags["classifier_use_fp16"],
        classifier_width=flags["classifier_width"],
        classifier_depth=flags["classifier_depth"],
        classifier_attention_resolutions=flags["classifier_attention_resolutions"],
        classifier_use_scale_shift_norm=flags["classifier_use_scale_shift_norm"],
        classifier_resblock_updown=flags["classifier_resblock_updown"],
        classifier_pool=flags["classifier_pool"],
        classifier_channel_mult=flags["channel_mult"],
    )
    state = torch.load(GOLDEN / "classifier.pt", map_location="cpu", weights_only=True)
    clf.load_state_dict(state, strict=True)
    return clf.eval()


@pytest.fixture(scope="session")
def diffusion_npz():
    return dict(np.load(GOLDEN / "diffusion.npz"))


@pytest.fixture(scope="session")
def guidance_npz():
    return dict(np.load(GOLDEN / "guidance.npz"))


@pytest.fixture(scope="session")
def losses_npz():
    return dict(np.load(GOLDEN / "losses.npz"))
