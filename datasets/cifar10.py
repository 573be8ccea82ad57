"""CIFAR-10 to folders of PNGs (training data) and, with --npz, FID reference batches.

From the official ``cifar-10-python.tar.gz`` (``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``: pickled dicts whose ``data`` is [N, 3072] uint8, the R, G and B planes of a
32x32 image, row-major, and whose ``labels`` are 0-9) this writes

* ``OUT/cifar_train/`` and ``OUT/cifar_test/``: ``{class}_{index:05d}.png`` in archive order,
  ``class`` one of plane car bird cat deer dog frog horse ship truck (guided-diffusion's names);
* with ``--npz``, ``OUT/cifar10_train.npz`` and ``OUT/cifar10_test.npz``: ``arr_0`` uint8
  [N, 32, 32, 3] in archive order and ``arr_1`` int64 labels in the archive's numbering.

    python datasets/cifar10.py --archive cifar-10-python.tar.gz --out_dir data/ --npz

Without ``--archive`` the archive is downloaded to ``OUT/cifar-10-python.tar.gz`` first.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
from _common import (
    PrepError,
    io_util,
    planar_to_nhwc,
    prepare_out_dir,
    run_cli,
    safe_pickle_load,
    write_image_folder,
    write_npz,
)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
FOLDER = "cifar-10-batches-py"


def download(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to ``dest`` and check its MD5 (``io_util.atomic_write``: ``dest``
    appears only once complete and checked).

    An existing ``dest`` with the right MD5 is reused. Raises ``PrepError`` when offline or
    when the checksum differs.
    """
    if dest.is_file() and _md5(dest) == md5:
        return dest
    print(f"downloading {url}", flush=True)

    def write(f) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                digest.update(block)
        if digest.hexdigest() != md5:
            raise PrepError(
                f"{url}: MD5 {digest.hexdigest()} != expected {md5}; the download is corrupt"
            )

    try:
        io_util.atomic_write(dest, write)
    except OSError as e:  # URLError, timeouts, refused connections
        reason = getattr(e, "reason", e)
        raise PrepError(
            f"cannot download {url} ({reason}); without internet, fetch the archive elsewhere "
            "and pass --archive PATH"
        ) from None
    return dest


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_archive(archive: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (uint8 [50000, 32, 32, 3], int64 [50000]), "test": ...}`` in archive order.

    Members are found by base name inside ``cifar-10-batches-py/``; the pickles are read
    with ``safe_pickle_load`` (numpy arrays and plain containers only).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise PrepError(f"archive not found: {archive}")
    wanted = {f"{FOLDER}/{name}" for names in SPLITS.values() for name in names}
    batches: dict[str, dict] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    data = tf.extractfile(member).read()
                    batches[name] = safe_pickle_load(io.BytesIO(data), f"{archive}:{name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PrepError(f"cannot read {archive} as a tar archive: {e}") from None
    missing = sorted(wanted - batches.keys())
    if missing:
        raise PrepError(f"{archive} lacks {', '.join(missing)}: not cifar-10-python.tar.gz?")
    out = {}
    for split, names in SPLITS.items():
        images, labels = [], []
        for name in names:
            batch = batches.pop(f"{FOLDER}/{name}")
            if "data" not in batch or "labels" not in batch:
                raise PrepError(f"{archive}:{name} has no data/labels entries")
            x = planar_to_nhwc(batch["data"], 32, f"{archive}:{name}")
            y = np.asarray(batch["labels"], dtype=np.int64)
            if y.shape != (len(x),) or y.min(initial=0) < 0 or y.max(initial=0) > 9:
                raise PrepError(f"{archive}:{name}: expected {len(x)} labels in 0-9")
            images.append(x)
            labels.append(y)
        out[split] = (np.concatenate(images), np.concatenate(labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archive", default=None, help="cifar-10-python.tar.gz; downloaded when not given"
    )
    parser.add_argument("--out_dir", default=".", help="where cifar_train/, cifar_test/ go")
    parser.add_argument(
        "--npz", action="store_true", help="also write cifar10_train.npz and cifar10_test.npz"
    )
    parser.add_argument("--url", default=URL, help="download URL (a mirror of the archive)")
    args = parser.parse_args()
    out = prepare_out_dir(args.out_dir, "--out_dir")
    archive = args.archive or download(args.url, out / "cifar-10-python.tar.gz", MD5)
    for split, (images, labels) in read_archive(archive).items():
        names = [f"{CLASSES[label]}_{i:05d}.png" for i, label in enumerate(labels)]
        write_image_folder(out / f"cifar_{split}", zip(names, images), len(names))
        if args.npz:
            write_npz(out / f"cifar10_{split}.npz", arr_0=images, arr_1=labels)


if __name__ == "__main__":
    run_cli(main)
