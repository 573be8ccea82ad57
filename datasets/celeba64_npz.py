"""CelebA at 64x64 as an ``.npz`` (``arr_0`` uint8 [N, 64, 64, 3], sorted by file name).

The source is the folder (or ``img_align_celeba.zip`` / a tar) of the aligned 178x218
CelebA JPEGs. Each image is cropped to a ``--crop_size`` square centred at
``--crop_center X Y`` (default 128 at (89, 121): the box left=25, top=57, right=153,
bottom=185, the crop of the NCSN/DDIM line of work), then resized to ``--image_size`` with
``load_data``'s centre crop (128 -> 64 is one 2x2 BOX (area) averaging).

    python datasets/celeba64_npz.py --source img_align_celeba/ --out celeba64.npz
"""

from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
from _common import PrepError, center_crop_resize, images_to_npz_main, run_cli
from PIL import Image


def crop_box(center_x: int, center_y: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the ``size`` square centred at (center_x, center_y)."""
    left, top = center_x - size // 2, center_y - size // 2
    return left, top, left + size, top + size


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crop_size", type=int, default=128, help="side of the square crop")
    parser.add_argument(
        "--crop_center",
        type=int,
        nargs=2,
        default=(89, 121),
        metavar=("X", "Y"),
        help="centre of the crop in the 178x218 aligned image",
    )


def _make_transform(args: argparse.Namespace) -> Callable[[Image.Image], np.ndarray]:
    box = crop_box(*args.crop_center, args.crop_size)

    def transform(img: Image.Image) -> np.ndarray:
        if box[0] < 0 or box[1] < 0 or box[2] > img.width or box[3] > img.height:
            raise PrepError(f"crop box {box} does not fit in a {img.width}x{img.height} image")
        return center_crop_resize(img.crop(box), args.image_size)

    return transform


def main() -> None:
    images_to_npz_main(
        __doc__,
        image_size=64,
        default_out="celeba64.npz",
        add_args=_add_args,
        make_transform=_make_transform,
    )


if __name__ == "__main__":
    run_cli(main)
