"""An LSUN category exported as lmdb (e.g. ``tower_train_lmdb``) to a folder of square images.

Every value of the lmdb (keys are image ids, values encoded WebP/JPEG bytes) is decoded,
centre-cropped and resized exactly as ``load_data``'s centre crop (BOX-halve while the
shorter side is at least twice the size, BICUBIC-resize the shorter side to the size, cut
the centre square), and written as ``OUT_DIR/{prefix}_{index:07d}.jpg`` (JPEG quality 95) in
the lmdb's key order:

    python datasets/lsun_tower.py --image-size 64 --prefix tower tower_train_lmdb lsun_tower64

Needs the optional ``lmdb`` package (``pip install lmdb``, or the project's ``lsun`` extra).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Iterator

import numpy as np
from _common import PrepError, center_crop_resize, open_rgb, run_cli, write_image_folder

FORMATS = {"jpg": {"quality": 95}, "png": {"compress_level": 1}}


def _open_lmdb(path: Path):
    try:
        import lmdb
    except ImportError:
        raise PrepError(
            "the lmdb package is needed to read LSUN: `pip install lmdb` "
            "(or `pip install -e .[lsun]`)"
        ) from None
    if not path.exists():
        raise PrepError(f"lmdb not found: {path}")
    try:
        return lmdb.open(
            str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir()
        )
    except lmdb.Error as e:
        raise PrepError(f"cannot open {path} as an lmdb database: {e}") from None


def lsun_images(
    lmdb_path: str | Path, image_size: int, max_images: int | None = None
) -> tuple[Iterator[np.ndarray], int]:
    """(iterator of uint8 [image_size, image_size, 3] crops in key order, number of them)."""
    env = _open_lmdb(Path(lmdb_path))
    total = env.stat()["entries"]
    if max_images is not None:
        total = min(total, max_images)

    def generate() -> Iterator[np.ndarray]:
        with env.begin(write=False) as txn:
            for i, (key, value) in enumerate(txn.cursor()):
                if i >= total:
                    break
                name = f"{lmdb_path}[{key.decode('latin1')}]"
                img = open_rgb(lambda v=value: io.BytesIO(v), name)
                yield center_crop_resize(img, image_size)
        env.close()

    return generate(), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64, help="side of the square output")
    parser.add_argument("--prefix", default="tower", help="file-name prefix (the class name)")
    parser.add_argument("--max-images", type=int, default=None, help="stop after this many")
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="jpg", help="jpg (quality 95) or png"
    )
    parser.add_argument("lmdb_path", help="the LSUN lmdb folder, e.g. tower_train_lmdb")
    parser.add_argument("out_dir", help="output folder (created; must not hold files yet)")
    args = parser.parse_args()
    if args.image_size < 1 or "_" in args.prefix:
        parser.error("--image-size must be positive and --prefix must not contain '_'")
    images, total = lsun_images(args.lmdb_path, args.image_size, args.max_images)
    if total == 0:
        raise PrepError(f"{args.lmdb_path} holds no images")
    names = (f"{args.prefix}_{i:07d}.{args.format}" for i in range(total))
    write_image_folder(
        args.out_dir, zip(names, images), total, replace=False, **FORMATS[args.format]
    )


if __name__ == "__main__":
    run_cli(main)
