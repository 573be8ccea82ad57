"""The project's offline feature network: a small Fashion-MNIST classifier.

``evaluator.py --feature_net fmnist`` uses it where the Inception weights cannot be had
(offline machines, ``make demo``). It is trained by ``scripts/train_fmnist_classifier.py``
on the Fashion-MNIST training split and shipped as ``models/fmnist_classifier.pt``
(metadata in ``models/fmnist_classifier.json``).

Numbers computed with it are NOT comparable with Inception-based IS/FID/sFID/precision/
recall; they only rank samples of this project's Fashion-MNIST models against each other.

Input: float images [N, 3, H, W] in [0, 255], the project's 32x32 RGB Fashion-MNIST samples
(28x28 zero-padded by 2 pixels, repeated to 3 channels). Other sizes are resized to 32x32
with the evaluator's bilinear resize; the channels are averaged and mapped to [-1, 1].

Outputs of :meth:`FMNISTNet.forward`:

- ``features`` [N, 128]: the penultimate layer, ``fc1``'s output before its ReLU (after
  the ReLU about a fifth of the units are always 0, which makes every covariance
  singular), used for FID and precision/recall; :meth:`FMNISTNet.logits` maps them to the
  10 classes (softmax -> Inception Score, at most 10);
- ``spatial`` [N, 256]: the second block's max-pooled ReLU map (8x8, 64 channels), first 4
  channels, flattened in NHWC order like Inception's ``mixed_6/conv`` (sFID).
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations import EvaluatorError
from evaluations.inception import (
    check_state_dict,
    read_weights,
    resize_bilinear_tf_legacy,
    state_dict_fingerprint,
)

IMAGE_SIZE = 32
NUM_CLASSES = 10
FEATURE_DIM = 128
SPATIAL_CHANNELS = 4
SPATIAL_DIM = 8 * 8 * SPATIAL_CHANNELS  # 256
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias), BatchNorm, ReLU; keys ``0.weight``, ``1.*``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class FMNISTNet(nn.Module):
    """Small CNN: [32 @ 32x32] -> pool -> [64 @ 16x16] -> pool -> [128 @ 8x8] -> pool ->
    fc 2048 -> 128 (the features) -> ReLU -> dropout -> fc 10.

    ``forward(images)`` takes float images [N, 3, H, W] in [0, 255] and returns
    ``(features [N, 128], spatial [N, 256])``; ``classify(images)`` returns the logits.
    """

    name = "fmnist"
    pool_dim = FEATURE_DIM
    spatial_dim = SPATIAL_DIM
    comparable_with_inception = False
    feature_layout = "fc1 before ReLU (128) / block2 pooled, 4 channels NHWC (256)"

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.block1 = ConvBNReLU(1, 32)
        self.block2 = ConvBNReLU(32, 64)
        self.block3 = ConvBNReLU(64, 128)
        self.fc1 = nn.Linear(128 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.fingerprint = ""  # set by load_fmnist_net: sha256 of the loaded weights

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 255] -> [N, 1, 32, 32] in [-1, 1] (channel mean)."""
        x = resize_bilinear_tf_legacy(images.float(), (IMAGE_SIZE, IMAGE_SIZE))
        return x.mean(dim=1, keepdim=True) / 127.5 - 1.0

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.block1(self.preprocess(images)), 2)  # (N, 32, 16, 16)
        x = F.max_pool2d(self.block2(x), 2)  # (N, 64, 8, 8)
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 256)
        x = F.max_pool2d(self.block3(x), 2)  # (N, 128, 4, 4)
        features = self.fc1(x.flatten(1))  # (N, 128), before the ReLU: no dead units
        return features, spatial

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10] = fc(dropout(relu(features))); dropout is off in eval mode."""
        return self.fc(self.dropout(F.relu(features)))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10] of float images [N, 3, H, W] in [0, 255]."""
        return self.logits(self(images)[0])


def load_fmnist_net(path: Union[str, Path], device: str = "cpu") -> FMNISTNet:
    """Load the shipped state dict (fp32 or fp16 storage) into :class:`FMNISTNet` (eval).

    A missing, unreadable or foreign file raises a one-line :class:`EvaluatorError`.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluatorError(
            f"Fashion-MNIST feature net not found at {path}; train it with "
            "scripts/train_fmnist_classifier.py or pass --fmnist_path"
        )
    state = read_weights(path, "Fashion-MNIST feature net (--fmnist_path)")
    model = FMNISTNet()
    check_state_dict(model, state, path, "an FMNISTNet state dict", EvaluatorError)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    model.fingerprint = state_dict_fingerprint(state)
    return model.to(device).eval()
