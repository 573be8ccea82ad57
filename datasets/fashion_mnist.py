"""Fashion-MNIST (the offline dataset of this project) to 32x32 RGB training data.

Reads Debian's ``dataset-fashion-mnist`` IDX files (``{train,t10k}-{images-idx3,labels-idx1}
-ubyte[.gz]``), zero-pads every 28x28 image by 2 pixels on each side to 32x32 and repeats it
to 3 channels, then writes

* ``OUT/fmnist_train/{label}_{index:05d}.png``: the 60,000 training images (``label`` is the
  digit 0-9, so ``load_data``'s sorted class names give back the dataset's label order);
* ``OUT/fmnist_train.npz`` and ``OUT/fmnist_test.npz``: ``arr_0`` uint8 [N, 32, 32, 3] in file
  order, ``arr_1`` int64 labels (60,000 and 10,000 images).

    python datasets/fashion_mnist.py --out_dir data/
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from _common import PrepError, prepare_out_dir, run_cli, write_image_folder, write_npz

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist/"
PAD = 2  # 28 + 2 * 2 = 32
# IDX type codes (third byte of the magic number); Fashion-MNIST uses only 0x08.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw; detected from the content).

    Layout: two zero bytes, a type code, the number of dimensions D, then D big-endian
    uint32 sizes and the data in row-major order. Raises ``PrepError`` on any mismatch.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise PrepError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise PrepError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(dims) != ndim or len(raw) != expected:
        raise PrepError(f"{path}: {len(raw)} bytes, but its header {dims} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise PrepError(
        f"{source / stem}[.gz] not found; install Fashion-MNIST with "
        "`apt-get install dataset-fashion-mnist` or pass --source DIR"
    )


def load_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split (``train`` or ``t10k``) as (uint8 [N, 32, 32, 3], int64 [N]).

    Images are zero-padded by 2 pixels on every side and repeated to 3 equal channels.
    """
    source = Path(source)
    images = read_idx(_find(source, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find(source, f"{split}-labels-idx1-ubyte"))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise PrepError(f"{split} images: expected uint8 [N, 28, 28], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise PrepError(f"{split}: {len(labels)} labels for {len(images)} images")
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))  # [N, 32, 32], zeros
    rgb = np.repeat(padded[..., None], 3, axis=3)  # [N, 32, 32, 3]
    return rgb, labels.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", default=DEFAULT_SOURCE, help="folder of the IDX files (Debian's by default)"
    )
    parser.add_argument("--out_dir", default=".", help="where fmnist_train/ and the .npz go")
    parser.add_argument(
        "--no_png", action="store_true", help="write only the .npz files, not fmnist_train/"
    )
    args = parser.parse_args()
    source = Path(args.source)
    if not source.is_dir():
        raise PrepError(
            f"Fashion-MNIST source folder {source} not found; install it with "
            "`apt-get install dataset-fashion-mnist` or pass --source DIR"
        )
    out = prepare_out_dir(args.out_dir, "--out_dir")
    train_x, train_y = load_split(source, "train")
    test_x, test_y = load_split(source, "t10k")
    write_npz(out / "fmnist_train.npz", arr_0=train_x, arr_1=train_y)
    write_npz(out / "fmnist_test.npz", arr_0=test_x, arr_1=test_y)
    if not args.no_png:
        names = [f"{label}_{i:05d}.png" for i, label in enumerate(train_y)]
        write_image_folder(out / "fmnist_train", zip(names, train_x), len(names), compress_level=1)


if __name__ == "__main__":
    run_cli(main)
