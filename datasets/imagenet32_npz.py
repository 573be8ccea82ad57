"""Downsampled ImageNet (Chrabaszcz et al. 2017) batch files to ``.npz`` training/reference data.

Reads the unpacked ``Imagenet32_train`` / ``Imagenet32_val`` files from one folder:
``train_data_batch_1`` .. ``train_data_batch_10`` and ``val_data``, each a pickled dict (or,
from the ``*_npz`` downloads, an ``.npz``) with ``data`` [N, 3 * S * S] uint8 (R, G and B
planes, each S x S row-major) and ``labels`` 1..1000. Writes ``OUT/imagenet{S}_train.npz``
and ``OUT/imagenet{S}_val.npz`` with ``arr_0`` uint8 [N, S, S, 3] in file order and ``arr_1``
int64 labels shifted to 0..999. S (32 for ImageNet-32; 16 and 64 work too) is read from the
row length.

    python datasets/imagenet32_npz.py --source Imagenet32/ --out_dir data/
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from _common import (
    PrepError,
    planar_to_nhwc,
    prepare_out_dir,
    run_cli,
    safe_pickle_load,
    write_npz,
)
from tqdm import tqdm

NUM_TRAIN_BATCHES = 10
SPLITS = {
    "train": [f"train_data_batch_{i}" for i in range(1, NUM_TRAIN_BATCHES + 1)],
    "val": ["val_data"],
}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 [N, S, S, 3], int64 [N] labels in 0..999)."""
    if path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                batch = {k: npz[k] for k in npz.files}
        except Exception as e:  # noqa: BLE001 - any zip/format error is a bad file
            raise PrepError(f"cannot read {path}: {e}") from None
    else:
        with open(path, "rb") as f:
            batch = safe_pickle_load(f, str(path))
    if "data" not in batch or "labels" not in batch:
        raise PrepError(f"{path} has no data/labels entries (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    side = math.isqrt(data.shape[-1] // 3) if data.ndim == 2 else 0
    images = planar_to_nhwc(data, side, str(path))
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    if len(labels) != len(images) or labels.min(initial=1) < 1 or labels.max(initial=1) > 1000:
        raise PrepError(f"{path}: expected {len(images)} labels in 1..1000")
    return images, labels - 1


def _find(source: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.npz", f"{stem}.pkl", f"{stem}.pickle"):
        if (source / name).is_file():
            return source / name
    return None


def convert_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """All batch files of a split, concatenated in batch order; None when none is present."""
    paths = [_find(source, stem) for stem in SPLITS[split]]
    if not any(paths):
        return None
    missing = [stem for stem, p in zip(SPLITS[split], paths) if p is None]
    if missing:
        raise PrepError(f"{source} lacks {', '.join(missing)} (an incomplete {split} split)")
    images, labels = [], []
    for path in tqdm(paths, desc=split, unit="file"):
        x, y = read_batch(path)
        if images and x.shape[1:] != images[0].shape[1:]:
            raise PrepError(f"{path}: images of {x.shape[1:]}, unlike {images[0].shape[1:]}")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder of the unpacked batch files")
    parser.add_argument("--out_dir", default=".", help="where imagenet{S}_{split}.npz go")
    parser.add_argument(
        "--split", choices=("train", "val", "all"), default="all", help="which split to write"
    )
    args = parser.parse_args()
    out = prepare_out_dir(args.out_dir, "--out_dir")
    source = Path(args.source)
    if not source.is_dir():
        raise PrepError(f"source folder not found: {source}")
    splits = list(SPLITS) if args.split == "all" else [args.split]
    written = 0
    for split in splits:
        result = convert_split(source, split)
        if result is None:
            continue
        images, labels = result
        path = out / f"imagenet{images.shape[1]}_{split}.npz"
        write_npz(path, arr_0=images, arr_1=labels)
        written += 1
    if not written:
        wanted = " / ".join(SPLITS[s][0] for s in splits)
        raise PrepError(f"no ImageNet batch files ({wanted}...) in {source}")


if __name__ == "__main__":
    run_cli(main)
