"""Shared helpers of the dataset preparation scripts in this folder.

The scripts are run as files (``python datasets/cifar10.py ...``), so this module is imported
as ``_common`` from the script's own folder. It holds the pieces that every script needs once:

* ``PrepError`` and ``run_cli``: a failure is one line on stderr and exit status 1;
* ``safe_pickle_load``: reads the pickled batch files of CIFAR-10 and ImageNet-32 while
  refusing anything but plain containers and numpy arrays;
* ``planar_to_nhwc``: the [N, 3072] channel-plane rows of those files to [N, 32, 32, 3];
* ``iter_source_images`` / ``images_to_array``: images from a folder, a zip or a tar archive,
  in sorted name order, through a per-image transform, into one uint8 NHWC array;
* ``center_crop_resize``: the centre crop of ``load_data`` (imported from
  ``guided_diffusion.image_datasets``, the one implementation);
* ``prepare_out_dir`` / ``check_out_file``: an output path that cannot be used (a file
  where a folder is wanted, or the reverse) is a one-line error before any work;
* ``write_npz`` and ``write_image_folder``: outputs written atomically (``write_npz`` through
  ``guided_diffusion.io_util``, the project's one atomic write; a folder through a temporary
  sibling that is renamed), so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import argparse
import codecs
import io
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
REPO_ROOT = Path(__file__).resolve().parents[1]

try:
    from guided_diffusion import io_util
    from guided_diffusion.image_datasets import center_crop_arr
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO_ROOT))
    from guided_diffusion import io_util
    from guided_diffusion.image_datasets import center_crop_arr


class PrepError(Exception):
    """A problem with the inputs of a preparation script, reported as one line."""


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; a ``PrepError`` becomes ``<script>: error: <message>`` and exit status 1."""
    try:
        main()
    except PrepError as e:
        prog = os.path.basename(sys.argv[0]) or "prepare"
        sys.exit(f"{prog}: error: {e}")


# --------------------------------------------------------------------------- pickles


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR / ImageNet-32 batch pickle needs: how numpy rebuilds arrays."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): codecs.encode}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-rebuilding globals and refuses the rest."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (only numpy arrays are expected)"
            ) from None


def safe_pickle_load(f: BinaryIO, what: str) -> dict:
    """Load a pickled dict of bytes/str/lists/numpy arrays (Python 2 pickles included).

    Keys are returned as ``str`` whether the file stored them as bytes or str. Any other
    global (functions, classes) is refused, so a crafted file cannot run code.
    Raises ``PrepError`` naming ``what`` when the file is not such a dict.
    """
    try:
        obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure is a bad input file
        raise PrepError(f"cannot read {what}: {e}") from None
    if not isinstance(obj, dict):
        raise PrepError(f"{what} is not a pickled dict (got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def planar_to_nhwc(data: np.ndarray, size: int, what: str) -> np.ndarray:
    """Rows of ``3 * size * size`` bytes (R plane, G plane, B plane, each row-major) to NHWC.

    This is the layout of the CIFAR-10 and downsampled-ImageNet batch files.
    """
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise PrepError(
            f"{what}: expected uint8 data of shape [N, {3 * size * size}], "
            f"got {data.dtype} {list(data.shape)}"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- images


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def iter_source_images(source: str | os.PathLike) -> Iterator[tuple[str, Callable[[], BinaryIO]]]:
    """Yield ``(name, open)`` for every image in a folder (recursive), zip or tar archive.

    Names are paths relative to the folder or archive root. Folders and zips are walked in
    sorted name order; a tar (possibly compressed) is read once, in archive order, because
    a compressed tar cannot be read out of order cheaply: ``images_to_array`` sorts after.
    ``open()`` returns a binary file object of the image's bytes.
    """
    path = Path(source)
    if path.is_dir():
        names = sorted(
            str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and _is_image(p.name)
        )
        for name in names:
            yield name, (lambda p=path / name: open(p, "rb"))
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image(n)):
                yield name, (lambda n=name: io.BytesIO(zf.read(n)))
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if member.isfile() and _is_image(member.name):
                    data = tf.extractfile(member).read()
                    yield member.name, (lambda d=data: io.BytesIO(d))
    elif path.exists():
        raise PrepError(f"{path} is not a folder, a zip or a tar archive")
    else:
        raise PrepError(f"source not found: {path}")


def count_source_images(source: str | os.PathLike) -> int | None:
    """Number of images in a folder or zip (cheap); ``None`` for a tar (would need a pass)."""
    path = Path(source)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.is_file() and _is_image(p.name))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return sum(1 for n in zf.namelist() if not n.endswith("/") and _is_image(n))
    return None


def open_rgb(opener: Callable[[], BinaryIO], name: str) -> Image.Image:
    """Decode one image to RGB; raises ``PrepError`` naming the file when it is unreadable."""
    try:
        with opener() as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt file
        raise PrepError(f"cannot read image {name}: {e}") from None
    return img.convert("RGB")


def images_to_array(
    source: str | os.PathLike,
    transform: Callable[[Image.Image], np.ndarray],
    limit: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Decode every image of ``source``, apply ``transform``, stack in sorted name order.

    ``transform`` maps an RGB image to a uint8 HWC array; every result must have one shape.
    ``limit`` keeps the first ``limit`` images in name order (folders and zips only read
    those). Returns ``(arr [N, H, W, 3] uint8, names)``. Raises ``PrepError`` when there is
    no image, an image is unreadable, or the shapes differ.
    """
    rows: list[np.ndarray | None] = []
    names: list[str] = []
    total = count_source_images(source)
    if total is not None and limit is not None:
        total = min(total, limit)
    entries: Iterable = iter_source_images(source)
    for name, opener in tqdm(entries, total=total, desc="images", unit="img", file=sys.stderr):
        try:
            arr = np.asarray(transform(open_rgb(opener, name)), dtype=np.uint8)
        except PrepError as e:
            raise PrepError(f"{name}: {e}") from None
        if rows and arr.shape != rows[0].shape:
            raise PrepError(f"{name}: transformed shape {arr.shape} != {rows[0].shape}")
        rows.append(arr)
        names.append(name)
        if limit is not None and total is not None and len(rows) >= limit:
            break
    if not rows:
        raise PrepError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {source}")
    order = sorted(range(len(names)), key=names.__getitem__)[:limit]
    out = np.empty((len(order), *rows[0].shape), dtype=np.uint8)  # [N, H, W, 3]
    for i, j in enumerate(order):
        out[i] = rows[j]
        rows[j] = None  # free as we go: the peak stays near one copy of the data
    return out, [names[j] for j in order]


def center_crop_resize(img: Image.Image, size: int) -> np.ndarray:
    """``load_data``'s centre crop: BOX-halve while the short side >= 2 * size, BICUBIC-resize
    the short side to ``size``, crop the centre ``size`` x ``size``. Returns uint8 HWC."""
    return center_crop_arr(img, size)


def images_to_npz_main(
    doc: str,
    image_size: int,
    default_out: str,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    make_transform: Callable[[argparse.Namespace], Callable[[Image.Image], np.ndarray]]
    | None = None,
) -> None:
    """Command line shared by the folder/archive-to-npz scripts (CelebA, CelebA-HQ, FFHQ).

    Flags: ``--source`` (folder, zip or tar), ``--out`` (``.npz``; default ``default_out``),
    ``--image_size`` (default ``image_size``), ``--max_images``, plus those of ``add_args``.
    ``make_transform(args)`` gives the per-image transform; by default the centre crop of
    ``load_data`` to ``--image_size``. Writes ``arr_0`` uint8 [N, S, S, 3] in name order.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="folder, .zip or .tar[.gz] of images")
    parser.add_argument("--out", default=default_out, help="output .npz file")
    parser.add_argument("--image_size", type=int, default=image_size, help="output side")
    parser.add_argument("--max_images", type=int, default=None, help="keep the first N names")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    if args.image_size < 1:
        parser.error("--image_size must be positive")
    check_out_file(args.out, "--out")
    if make_transform is None:
        transform = lambda img: center_crop_resize(img, args.image_size)  # noqa: E731
    else:
        transform = make_transform(args)
    images, _ = images_to_array(args.source, transform, args.max_images)
    write_npz(args.out, arr_0=images)


# --------------------------------------------------------------------------- outputs


def prepare_out_dir(path: str | os.PathLike, flag: str = "--out_dir") -> Path:
    """Create the output folder ``path`` (and its parents), or raise a one-line
    ``PrepError`` naming ``flag`` when it cannot be (a file is in the way, no permission)."""
    try:
        return io_util.ensure_output_dir(path, flag)
    except OSError as e:
        raise PrepError(
            str(e) if isinstance(e, NotADirectoryError) else f"{flag} {path}: {e}"
        ) from None


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output file path that is not a folder; its folder is created."""
    path = Path(path)
    if path.is_dir():
        raise PrepError(f"{flag} {path} is a folder; pass a file path such as {path / 'out.npz'}")
    prepare_out_dir(path.parent, f"{flag} {path}: folder")
    return path


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write an uncompressed ``.npz`` atomically (``io_util.save_npz_atomic``); the folder is
    created."""
    path = check_out_file(path, "output")
    io_util.save_npz_atomic(path, **arrays)
    shapes = ", ".join(f"{k} {a.dtype} {list(a.shape)}" for k, a in arrays.items())
    print(f"wrote {path}: {shapes}", file=sys.stderr)


def write_image_folder(
    out_dir: str | os.PathLike,
    items: Iterable[tuple[str, np.ndarray]],
    total: int | None = None,
    replace: bool = True,
    **save_kwargs: Any,
) -> int:
    """Write every ``(name, uint8 HWC array)`` of ``items`` as the image file ``out_dir/name``.

    The files go to a temporary sibling folder that becomes ``out_dir`` at the end, so an
    interrupted run never leaves a partial folder that looks complete. An existing
    ``out_dir`` is replaced when ``replace`` (folders whose name the script owns); otherwise
    it must be empty. ``save_kwargs`` go to ``PIL.Image.save``. Returns the number written.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepError(f"{out_dir} is a file, not a folder; pass a folder path (it is created)")
    prepare_out_dir(out_dir.parent, f"{out_dir}: folder")
    if out_dir.exists() and not replace and any(out_dir.iterdir()):
        raise PrepError(f"{out_dir} exists and is not empty; remove it or choose another folder")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    count = 0
    try:
        for name, arr in tqdm(items, total=total, desc=out_dir.name, unit="img", file=sys.stderr):
            Image.fromarray(arr).save(tmp / name, **save_kwargs)
            count += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"wrote {count} images to {out_dir}", file=sys.stderr)
    return count
