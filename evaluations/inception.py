"""The 2015-12-05 TensorFlow FID Inception-v3 graph, rebuilt in PyTorch.

The original evaluator feeds float images in [0, 255] to TensorFlow's
``classify_image_graph_def.pb`` (2015-12-05). That graph resizes its input to 299x299
itself, normalises it, and runs an Inception-v3 that differs from torchvision's in three
ways that change FID:

1. 1008 output classes;
2. the pool branches of the Mixed 5x/6x and Mixed_7b blocks use average pooling that
   excludes the zero padding from the count (``count_include_pad=False``);
3. the pool branch of the last block (Mixed_7c) uses MAX pooling.

Module and parameter names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight``), the key layout of the widely
used PyTorch port of the graph's weights, ``pt_inception-2015-12-05-6726825d.pth``. There is
no ``AuxLogits`` head; BatchNorm uses eps = 0.001; convolutions have no bias.

Outputs of :meth:`InceptionV3FID.forward`, named as in the TensorFlow graph:

- ``pool_3`` [N, 2048]: the global average of the Mixed_7c map (FID, precision/recall);
- ``mixed_6/conv`` [N, 2023]: the ReLU output of ``Mixed_6d.branch1x1`` (TF's ``mixed_6`` is
  torchvision's ``Mixed_6d``), first 7 channels of the 17x17 map, flattened in NHWC order
  (sFID);

and :meth:`InceptionV3FID.logits` gives the 1008-way logits for the Inception Score as the
original evaluator computes them: ``pool_3 @ W`` with ``W`` the ``softmax/logits/MatMul``
weight, i.e. ``fc.weight`` WITHOUT the bias ``fc.bias``.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations import EvaluatorError
from guided_diffusion import io_util

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
)
WEIGHTS_SHA256_PREFIX = "6726825d"
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
INPUT_SIZE = 299


class WeightsUnavailableError(EvaluatorError):
    """The Inception weights are neither on disk nor downloadable."""


# ---------------------------------------------------------------------------------------
# Input handling: TF1 legacy bilinear resize and the graph's normalisation.
# ---------------------------------------------------------------------------------------


def _legacy_resize_coords(
    in_size: int, out_size: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of TF1 ``resize_bilinear`` (align_corners=False, legacy).

    TensorFlow's legacy scaler maps output index ``i`` to ``src = i * (in / out)`` in float32
    (no half-pixel centres); ``lower = floor(src)``, ``upper = min(lower + 1, in - 1)`` and
    ``lerp = src - lower``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    lerp = (src - lower.astype(np.float32)).astype(np.float32)
    return (
        torch.from_numpy(lower).to(device),
        torch.from_numpy(upper).to(device),
        torch.from_numpy(lerp).to(device),
    )


def resize_bilinear_tf_legacy(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize ``x`` [N, C, H, W] to ``size`` exactly as TF1's legacy ``resize_bilinear``.

    Interpolates in the same order as TensorFlow's kernel:
    ``top = tl + (tr - tl) * x_lerp``, ``bottom = bl + (br - bl) * x_lerp``,
    ``out = top + (bottom - top) * y_lerp``.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x  # scale 1: every lerp is 0, the kernel copies its input
    y0, y1, y_lerp = _legacy_resize_coords(in_h, out_h, x.device)
    x0, x1, x_lerp = _legacy_resize_coords(in_w, out_w, x.device)
    top_rows = x.index_select(2, y0)  # (N, C, out_h, in_w)
    bottom_rows = x.index_select(2, y1)
    top_left, top_right = top_rows.index_select(3, x0), top_rows.index_select(3, x1)
    bottom_left, bottom_right = bottom_rows.index_select(3, x0), bottom_rows.index_select(3, x1)
    top = top_left + (top_right - top_left) * x_lerp  # (N, C, out_h, out_w)
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]


# ---------------------------------------------------------------------------------------
# Network.
# ---------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x: torch.Tensor) -> torch.Tensor:
    """TF 3x3/1 SAME average pool: the zero padding is not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF mixed .. mixed_2 = Mixed_5b/5c/5d)."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (TF mixed_3 = Mixed_6a)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 .. mixed_7 = Mixed_6b..6e)."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward_with_branch1x1(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (block output, ReLU output of branch1x1); the latter is TF's ``conv``."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        b7d = self.branch7x7dbl_3(self.branch7x7dbl_2(b7d))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(b7d))
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return torch.cat([b1, b7, b7d, bp], 1), b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_branch1x1(x)[0]


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (TF mixed_8 = Mixed_7a)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (TF mixed_9 = Mixed_7b, mixed_10 = Mixed_7c).

    ``pool="avg"`` (Mixed_7b) averages without counting the padding; ``pool="max"``
    (Mixed_7c) is the FID graph's max pool.
    """

    def __init__(self, in_ch: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class InceptionV3FID(nn.Module):
    """Inception-v3 of the 2015-12-05 FID graph; see the module docstring.

    ``forward(images)`` takes float images [N, 3, H, W] with values in [0, 255] (any H, W)
    and returns ``(pool_3 [N, 2048], mixed_6/conv [N, 2023])``.
    """

    name = "inception"
    pool_dim = POOL_DIM
    spatial_dim = SPATIAL_DIM
    comparable_with_inception = True
    feature_layout = "pool_3 (2048) / mixed_6/conv, 7 channels NHWC (2023)"

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.fingerprint = ""  # set by load_inception: sha256 of the loaded weights

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = resize_bilinear_tf_legacy(images, (INPUT_SIZE, INPUT_SIZE))  # (N, 3, 299, 299)
        x = (x - 128.0) * (1.0 / 128.0)  # the graph's Sub/Mul: [0, 255] -> [-1, 1)
        x = x.contiguous(memory_format=torch.channels_last)  # ~1.6x faster convs on CPU
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, conv = self.Mixed_6d.forward_with_branch1x1(x)  # conv: (N, 192, 17, 17)
        x = self.Mixed_7a(self.Mixed_6e(x))  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool_3 = x.mean(dim=(2, 3))  # (N, 2048)
        spatial = conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(conv), -1)
        return pool_3, spatial  # (N, 2048), (N, 2023)

    def logits(self, pool_3: torch.Tensor) -> torch.Tensor:
        """1008-way logits ``pool_3 @ fc.weight^T``, WITHOUT ``fc.bias``.

        The original evaluator builds its softmax from the graph's ``softmax/logits/MatMul``
        weight alone, so the bias never enters the Inception Score.
        """
        return pool_3 @ self.fc.weight.t()


# ---------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$ADM_ES_CACHE`` if set, else ``~/.cache/adm_es``."""
    env = os.environ.get("ADM_ES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adm_es"


def add_missing_num_batches_tracked(
    state_dict: Dict[str, torch.Tensor], model: nn.Module
) -> Dict[str, torch.Tensor]:
    """Key remap: add the BatchNorm ``num_batches_tracked`` buffers a state dict lacks.

    The ported weights may predate these buffers; they do not affect inference.
    """
    out = dict(state_dict)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = torch.zeros_like(value)
    return out


def state_dict_fingerprint(state_dict: Dict[str, torch.Tensor]) -> str:
    """Hex sha256 over the sorted keys and tensor bytes of a state dict (cache identity)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        if key.endswith("num_batches_tracked"):
            continue
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def download_weights(dest: Path, url: str = WEIGHTS_URL, timeout: float = 60.0) -> Path:
    """Download the ported weights to ``dest`` (``io_util.atomic_write``: the file appears
    only once complete and its sha256 prefix checked; the cache folder is created)."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def write(out: IO[bytes]) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        if not digest.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
            raise WeightsUnavailableError(
                f"downloaded {url} has sha256 {digest.hexdigest()[:8]}..., expected "
                f"{WEIGHTS_SHA256_PREFIX}..."
            )

    io_util.atomic_write(dest, write)
    return dest


def resolve_weights_path(path: Optional[str] = None, download: bool = True) -> Path:
    """Find the weights: ``path`` if given, else the cache folder, downloading if allowed.

    Raises :class:`WeightsUnavailableError` with a one-line message naming the exact path
    where the file is expected.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsUnavailableError(f"Inception weights not found at {p} (--inception_path)")
        return p
    p = default_cache_dir() / WEIGHTS_NAME
    if p.is_file():
        return p
    if not download:
        raise WeightsUnavailableError(
            f"Inception weights not found; put {WEIGHTS_NAME} at {p} or pass --inception_path"
        )
    try:
        return download_weights(p)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsUnavailableError(
            f"could not download the Inception weights ({reason}); put {WEIGHTS_URL} "
            f"at {p} (or set ADM_ES_CACHE, or pass --inception_path)"
        ) from None


def read_weights(path: Path, what: str, error: type = EvaluatorError) -> Dict[str, torch.Tensor]:
    """A state dict of tensors from ``path`` (``torch.load(weights_only=True)``), or one
    line ``error`` saying why not (guided_diffusion.checkpoints.describe_load_error)."""
    from guided_diffusion.checkpoints import CheckpointError, load_torch_file

    try:
        state = load_torch_file(path)
    except CheckpointError as exc:
        raise error(f"{what}: {exc}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise error(f"{what}: {path} is not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str, error: type
) -> None:
    """Raise ``error`` in one line when the keys or shapes of ``state`` do not fit ``model``."""
    from guided_diffusion.checkpoints import describe_key_mismatch

    own = model.state_dict()
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        raise error(f"{path} is not {what}: {describe_key_mismatch(model, state)}")


def load_inception(
    path: Optional[str] = None, device: str = "cpu", download: bool = True
) -> InceptionV3FID:
    """Build :class:`InceptionV3FID` and load the ported weights, in eval mode on ``device``.

    ``path`` defaults to ``$ADM_ES_CACHE`` (or ``~/.cache/adm_es``) / ``WEIGHTS_NAME``,
    downloaded there on first use. State dicts with or without ``num_batches_tracked``
    are accepted; any other key mismatch is an error.
    """
    weights = resolve_weights_path(path, download=download)
    state = read_weights(weights, "Inception weights", WeightsUnavailableError)
    model = InceptionV3FID()
    state = add_missing_num_batches_tracked(state, model)
    check_state_dict(model, state, weights, "an FID Inception state dict", WeightsUnavailableError)
    model.load_state_dict(state)
    model.fingerprint = state_dict_fingerprint(state)
    return model.to(device=device, memory_format=torch.channels_last).eval()


def random_inception_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """A randomly initialised state dict in the exact key layout of the ported weights.

    For tests and benchmarks: BatchNorm running statistics are set so activations keep a
    sensible scale; ``num_batches_tracked`` is omitted as in the ported file.
    """
    gen = torch.Generator().manual_seed(seed)
    model = InceptionV3FID()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.rand(value.shape, generator=gen)
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            value = 0.1 * torch.randn(value.shape, generator=gen)
        elif key == "fc.weight":
            value = torch.randn(value.shape, generator=gen) * POOL_DIM**-0.5
        elif key == "fc.bias":
            value = torch.randn(value.shape, generator=gen)
        state[key] = value.contiguous()
    return state
