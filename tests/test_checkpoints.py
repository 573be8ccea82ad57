"""guided_diffusion.checkpoints: unreadable files and checkpoint/flag mismatches are one
line that names the problem and the fix (never torch's advice to drop weights_only)."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import zipfile

import pytest
import torch

from guided_diffusion.checkpoints import (
    CheckpointError,
    describe_load_error,
    describe_unet_mismatch,
    infer_image_size,
    infer_unet_flags,
    load_checkpoint_into,
    load_torch_file,
    read_state_dict,
)
from guided_diffusion.script_util import create_model


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_without_pickle() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("weights.bin", b"0" * 100)
    return buf.getvalue()


GOOD = _saved({"w": torch.arange(2000.0)})


def _legacy() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(10)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


BAD_FILES = {
    # name: (make the file's bytes, expected reason)
    "pickled_code": (
        lambda: _saved({"model": _Evil()}),
        "not a safe state dict (contains Python objects: posix.system); pass a plain state "
        "dict of tensors, saved with torch.save(model.state_dict(), path)",
    ),
    "namespace": (
        lambda: _saved({"args": argparse.Namespace(lr=1), "w": torch.zeros(1)}),
        "not a safe state dict (contains Python objects: argparse.Namespace)",
    ),
    "random_bytes": (lambda: random.Random(0).randbytes(3000), "not a torch checkpoint"),
    "plain_pickle": (lambda: pickle.dumps([1, 2, 3], protocol=4), "not a torch checkpoint"),
    "text": (lambda: b"hello world\n", "not a torch checkpoint (12 bytes starting with"),
    "truncated": (lambda: GOOD[:1000], "truncated (1000 bytes; the end of its zip archive"),
    "truncated_tail": (lambda: GOOD[:-100], "truncated ("),
    "legacy_truncated": (lambda: _legacy()[:200], "truncated or corrupt (torch's legacy format"),
    "empty": (lambda: b"", "empty file (0 bytes)"),
    "zip_not_torch": (_zip_without_pickle, "not a torch checkpoint (a zip archive without"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_unreadable_checkpoint_is_one_line(tmp_path, capfd, kind):
    make, reason = BAD_FILES[kind]
    path = tmp_path / f"{kind}.pt"
    path.write_bytes(make())
    for read in (read_state_dict, load_torch_file):
        with pytest.raises(CheckpointError) as info:
            read(str(path))
        message = str(info.value)
        assert message.startswith(f"cannot read {'checkpoint ' * (read is read_state_dict)}")
        assert f"{path}: {reason}" in message, message
        assert "\n" not in message and "weights_only" not in message.lower()
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_describe_load_error_without_the_file():
    """A remote checkpoint cannot be inspected: the exception alone decides."""
    cases = (
        (GOOD[:1000], None, "truncated"),
        (b"\x93" * 50, None, "not a torch checkpoint"),
        (_saved({"m": _Evil()}), "gs://bucket/x.pt", "not a safe state dict"),
    )
    for data, source, reason in cases:
        with pytest.raises(Exception) as info:  # noqa: B017 - torch raises several types
            torch.load(io.BytesIO(data), weights_only=True)
        assert describe_load_error(info.value, source).startswith(reason)


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt$"):
        read_state_dict(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_torch_file(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory; pass a readable checkpoint file"):
        read_state_dict(str(tmp_path))
    (tmp_path / "ok.pt").write_bytes(GOOD)
    assert torch.equal(read_state_dict(str(tmp_path / "ok.pt"))["w"], torch.arange(2000.0))


# ----------------------------------------------------------------- flags vs. checkpoint


def _unet(image_size, channel_mult, attention_resolutions, **kw):
    return create_model(
        image_size,
        32,
        1,
        channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
        num_head_channels=32,
        learn_sigma=True,
        **kw,
    )


def _flags(image_size, channel_mult, attention_resolutions):
    return dict(
        image_size=image_size,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
        learn_sigma=True,
        class_cond=False,
        use_scale_shift_norm=False,
        resblock_updown=False,
    )


@pytest.fixture(scope="module")
def fmnist_like():
    """A UNet laid out like the bundled Fashion-MNIST model: 32 px, 1,2,2, attention at 16."""
    return _unet(32, "1,2,2", "16").state_dict()


@pytest.mark.parametrize("size", [28, 20])
def test_wrong_image_size_is_named_not_attention(fmnist_like, size):
    """--image_size 28 with the 32-px checkpoint: 16 does not divide 28, so the flags are
    inconsistent at 28 and the size is the one wrong flag."""
    model = _unet(size, "1,2,2", "16")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(model, fmnist_like, _flags(size, "1,2,2", "16"), path="m.pt")
    assert str(info.value) == (
        f"model checkpoint m.pt does not match the flags: --image_size {size} (checkpoint: 32: "
        "its attention layers match --attention_resolutions 16 and its channel_mult 1,2,2 at "
        "--image_size 32)"
    )


def test_image_size_or_attention_when_both_explain(fmnist_like):
    """At 64 the flags are consistent; either the size or the attention flag is wrong."""
    problems = describe_unet_mismatch(fmnist_like, _flags(64, "1,2,2", "16"))
    assert problems == [
        "--image_size 64 (checkpoint: 32, where its attention layers match "
        "--attention_resolutions 16) or --attention_resolutions 16 (checkpoint: 32 at "
        "--image_size 64)"
    ]


def test_default_channel_mult_pins_the_image_size():
    """With --channel_mult '' the checkpoint's multipliers are the default of one size."""
    state = _unet(32, "", "16,8").state_dict()  # (1, 2, 2, 2), attention at ds 2 and 4
    problems = describe_unet_mismatch(state, _flags(64, "", "16,8"))
    assert problems == [
        "--image_size 64 (checkpoint: 32: its attention layers match --attention_resolutions "
        "16,8 and its channel_mult 1,2,2,2 at --image_size 32)"
    ]
    assert describe_unet_mismatch(state, _flags(32, "", "16,8")) == []


def test_attention_mismatch_without_a_size_that_explains_it(fmnist_like):
    problems = describe_unet_mismatch(fmnist_like, _flags(32, "1,2,2", "32,16"))
    assert problems == ["--attention_resolutions 32,16 (checkpoint: 16 at --image_size 32)"]
    assert infer_image_size(infer_unet_flags(fmnist_like), _flags(32, "1,2,2", "32,16")) is None


def test_grey_model_layout_is_read(fmnist_like):
    grey = _unet(32, "1,2,2", "16", in_channels=1).state_dict()
    inferred = infer_unet_flags(grey)
    assert inferred["in_channels"] == 1 and inferred["learn_sigma"] is True
    assert infer_unet_flags(fmnist_like)["in_channels"] == 3
    flags = dict(_flags(32, "1,2,2", "16"), in_channels=3)
    assert describe_unet_mismatch(grey, flags) == ["--in_channels 3 (checkpoint: 1)"]
