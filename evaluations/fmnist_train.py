"""Training of the offline feature network ``fmnist_net.FMNISTNet`` (the library half of
``scripts/train_fmnist_classifier.py``).

SGD with Nesterov momentum and a one-cycle learning rate; augmentation: random horizontal
flips and shifts of up to 2 pixels. Deterministic for a given generator and thread count.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .fmnist_net import FMNISTNet


def load_npz(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` from a dataset npz."""
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["arr_0"], z["arr_1"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise SystemExit(f"error: {path}: arr_0 must be uint8 [N, 32, 32, 3], got {images.shape}")
    if labels.shape != (len(images),):
        raise SystemExit(f"error: {path}: arr_1 must hold one label per image")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``max_shift`` pixels per image
    (zero fill), on a uint8 batch [N, C, H, W]."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None]  # (N, 1, H, 1)
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


@torch.no_grad()
def evaluate(model: FMNISTNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images [N, 3, 32, 32]."""
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        logits = model.classify(images[start : start + 1000].float())
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / len(images)


def train_fmnist_net(
    train: Tuple[torch.Tensor, torch.Tensor],
    test: Tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    gen: torch.Generator,
    on_epoch: Callable[[Dict], None] = lambda record: None,
) -> Tuple[FMNISTNet, List[Dict]]:
    """Train a fresh ``FMNISTNet`` on ``train`` (uint8 images, labels); after every epoch
    the test accuracy is measured on ``test`` and the epoch's record passed to ``on_epoch``.

    :return: the model and the per-epoch history (epoch, train_loss, test_accuracy, seconds).
    """
    (train_x, train_y), (test_x, test_y) = train, test
    model = FMNISTNet()
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    steps_per_epoch = len(train_x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    t0 = time.time()
    history: List[Dict] = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model.classify(augment(train_x[idx], gen).float()), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total_loss / steps_per_epoch,
                "test_accuracy": evaluate(model, test_x, test_y),
                "seconds": round(time.time() - t0, 1),
            }
        )
        on_epoch(history[-1])
    return model, history
