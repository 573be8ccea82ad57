"""CelebA-HQ at 256x256 as an ``.npz`` (``arr_0`` uint8 [30000, 256, 256, 3], by file name).

The source is a folder (or a zip/tar) of the 30,000 CelebA-HQ images at 1024x1024 (or at
512 or 256). Each image is resized with ``load_data``'s centre crop: on square images whose
side is 256 times a power of two that is 2x2 BOX (area) halvings down to 256.

    python datasets/celebahq256_npz.py --source celeba_hq_1024/ --out celebahq256.npz
"""

from _common import images_to_npz_main, run_cli


def main() -> None:
    images_to_npz_main(__doc__, image_size=256, default_out="celebahq256.npz")


if __name__ == "__main__":
    run_cli(main)
