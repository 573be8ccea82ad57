"""FFHQ at 128x128 as an ``.npz`` (``arr_0`` uint8 [70000, 128, 128, 3], sorted by file name).

The source is the folder (or a zip/tar) of FFHQ's ``images1024x1024`` PNGs, or of its
``thumbnails128x128``, which pass through unchanged. Each image is resized with
``load_data``'s centre crop: on the square 1024 images that is three 2x2 BOX
(area) halvings, 1024 -> 512 -> 256 -> 128.

    python datasets/ffhq128_npz.py --source images1024x1024/ --out ffhq128.npz
"""

from _common import images_to_npz_main, run_cli


def main() -> None:
    images_to_npz_main(__doc__, image_size=128, default_out="ffhq128.npz")


if __name__ == "__main__":
    run_cli(main)
