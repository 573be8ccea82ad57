"""Files the project writes: one atomic write, and the formats built on it.

Every output (checkpoints, sample batches, statistics caches, JSON, CSV, PNG) goes through
:func:`atomic_write`: the bytes go to a temporary file in the destination folder, are
flushed to disk, and the file is renamed over the final name. Readers therefore see the old
file or the new one, never a partial write, and a crash leaves no truncated file under a
final name. Files get the permissions the user's umask gives (like ``open``), not the 0600
of ``tempfile.mkstemp``.

Sample batches are the evaluator's format: ``.npz`` with ``arr_0`` uint8 [N, H, W, 3]
(and ``arr_1`` int64 labels).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    The temporary file lives in the same folder (so the rename is atomic), is fsynced
    before the rename and removed if ``write`` fails; the folder is fsynced afterwards
    where the platform allows. The file mode is ``0o666 & ~umask``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible everywhere)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(payload: bytes, path: PathLike) -> None:
    """Write ``payload`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(payload))


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), path)


# ----------------------------------------------------------------------------- npz


def save_npz_atomic(path: PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed) to ``path`` atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def write_npz_streaming(
    path: PathLike, arrays: Sequence[Tuple[str, Tuple[int, ...], np.dtype, Iterable[np.ndarray]]]
) -> None:
    """Write an ``.npz`` whose arrays arrive in chunks along axis 0 (never all in memory).

    ``arrays`` holds ``(name, shape, dtype, chunks)``; the file is what ``np.savez`` writes
    (uncompressed, readable by ``np.load``), created atomically. Raises ``RuntimeError`` when
    the chunks do not add up to ``shape[0]`` rows.
    """

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, shape, dtype, chunks in arrays:
                dtype = np.dtype(dtype)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(dtype),
                        "fortran_order": False,
                        "shape": tuple(shape),
                    }
                    np.lib.format.write_array_header_1_0(member, header)
                    rows = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        member.write(chunk.tobytes())
                        rows += chunk.shape[0]
                    if rows != shape[0]:
                        raise RuntimeError(f"{name}: wrote {rows} rows, expected {shape[0]}")

    atomic_write(path, write)


def npz_array_shape(path: PathLike, name: str = "arr_0") -> Tuple[int, ...]:
    """The shape of array ``name`` of an ``.npz`` file, read from its header only.

    Raises ``ValueError`` (one line) when the file is not an npz or lacks the array.
    """
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            return tuple(int(s) for s in reader(f)[0])
    except KeyError:
        raise ValueError(f"{path} has no array {name}") from None
    except Exception as e:  # noqa: BLE001 - any zip or header failure means a bad file
        raise ValueError(f"cannot read {path}: {e}") from None


def npz_length(path: PathLike, name: str = "arr_0") -> int:
    """Number of rows of array ``name`` of an ``.npz`` file (header only)."""
    return npz_array_shape(path, name)[0]


# ----------------------------------------------------------------------------- csv


def write_csv(path: PathLike, columns: Dict[str, np.ndarray]) -> None:
    """A CSV with the given columns (integer arrays as ints, floats with 9 digits), atomically."""
    names = list(columns)
    cols = [np.asarray(columns[k]) for k in names]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in range(len(cols[0]) if cols else 0):
        w.writerow(
            [
                int(c[r]) if np.issubdtype(c.dtype, np.integer) else f"{float(c[r]):.9g}"
                for c in cols
            ]
        )
    atomic_write_bytes(buf.getvalue().encode(), path)


def read_csv(path: PathLike) -> Dict[str, np.ndarray]:
    """Columns of a CSV written by ``write_csv`` as float64 arrays."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {name: np.array([float(r[j]) for r in rows[1:]]) for j, name in enumerate(rows[0])}


def read_train_norm(path: PathLike, steps: int, what: str = "target curve") -> np.ndarray:
    """The training curve T (steps,) by step index i from the ``train_norm`` column of an
    ``eps_norm.csv`` (``file_rows`` order). Raises ``ValueError`` naming ``what`` (e.g. the
    flag that gave ``path``) when the file does not hold such a column."""
    need = f"needs a train_norm column with {steps} rows (an eps_norm.csv of the same respacing)"
    try:
        table = read_csv(path)
    except (ValueError, IndexError):
        raise ValueError(f"{what} {path} is not a CSV of numbers: it {need}") from None
    if "train_norm" not in table or "step" not in table or len(table["train_norm"]) != steps:
        raise ValueError(f"{what} {path} {need}")
    order = np.argsort(table["step"])  # file rows run from the noisiest step; index by i
    return np.asarray(table["train_norm"], dtype=np.float64)[order]


# ----------------------------------------------------------------------------- images


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Up to ``ncol**2`` uint8 NHWC images tiled into one HWC array with white gaps.

    Grey images (C = 1, or three equal channels) give a grey (H, W) array.
    """
    images = np.asarray(images)[: ncol * ncol]
    n, h, w, c = images.shape
    if (
        c == 3
        and np.array_equal(images[..., 0], images[..., 1])
        and np.array_equal(images[..., 0], images[..., 2])
    ):
        images, c = images[..., :1], 1
    rows, cols = math.ceil(n / ncol), min(n, ncol)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[k]
    return grid[..., 0] if c == 1 else grid


def save_png(array: np.ndarray, path: PathLike) -> None:
    """A uint8 (H, W) grey or (H, W, 3) RGB array as a PNG, atomically."""
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_image_grid(images: np.ndarray, path: PathLike, ncol: int = 8) -> None:
    """Save up to ``ncol**2`` uint8 NHWC images as one PNG grid (grey when they are grey)."""
    save_png(image_grid(images, ncol), path)


def ensure_parent(path: PathLike, what: str) -> Path:
    """The parent folder of an output file, which must exist (no folders are created).

    Raises ``FileNotFoundError``/``NotADirectoryError`` with a one-line message naming
    ``what`` (e.g. ``--ref_stats_cache``) and the fix.
    """
    parent = Path(path).resolve().parent
    if not parent.exists():
        raise FileNotFoundError(
            f"{what} {path}: folder {parent} does not exist; create it first or pick another path"
        )
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path}: {parent} is not a folder")
    return parent


def ensure_output_dir(path: PathLike, what: str = "--log_dir") -> Path:
    """Create the output folder ``path`` (and parents) or say in one line why it cannot be."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(
            f"{what} {path} is a file, not a folder; pass a folder path (it is created)"
        )
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            f"{what} {path}: a part of the path is a file; pass a folder path"
        ) from None
    except NotADirectoryError:
        raise NotADirectoryError(
            f"{what} {path}: a part of the path is a file; pass a folder path"
        ) from None
    return p


def settings_folder(root: PathLike, settings: Dict[str, Any]) -> Path:
    """``root/runs/<hash of settings>``, created, with the settings as ``settings.json``:
    outputs made with other settings never share a folder, and a rerun with the same
    settings finds its earlier outputs there (resume)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    folder = Path(root) / "runs" / hashlib.sha256(text.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "settings.json", settings)
    return folder


def file_sha256(path: PathLike) -> str:
    """The SHA-256 hex digest of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
