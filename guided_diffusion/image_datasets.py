"""Training data: an image folder or an ``.npz`` batch as an endless stream of batches.

``load_data`` is the entry point of the training scripts. Images come either from a folder
(searched recursively for .jpg/.jpeg/.png/.gif; the class of a file is the part of its name
before the first underscore, and the sorted class names give the label indices, as in
guided-diffusion) or from an ``.npz`` file (``arr_0`` uint8 [N, H, W, 3], optional ``arr_1``
integer labels; the format of the evaluator's reference batches).

Every image is centre- or random-cropped to ``image_size`` and optionally flipped, then
scaled to [-1, 1] as ``uint8 / 127.5 - 1``. Each rank reads its own shard (every
``num_shards``-th item of the sorted list, starting at ``shard``). The order of items and every
random crop/flip are a function of ``(seed, shard, epoch)`` only: the same seed gives the same
batches whatever the number of loader workers.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util
from .io_util import npz_length

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")


class DataError(ValueError):
    """The training data cannot be used as given (missing, empty, unreadable, wrong shape)."""


def load_data(
    *,
    data_dir: str | os.PathLike,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_crop: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    num_workers: int = 1,
    shard: int | None = None,
    num_shards: int | None = None,
    start_batch: int = 0,
    in_channels: int = 3,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(batch, cond)`` forever: batch float32 [N, C, image_size, image_size] in [-1, 1].

    ``C = in_channels``: 3 (RGB) or 1 (grey: the ITU-R 601 luma of PIL's "L" mode, which
    is exact for grey images stored as three equal channels).

    ``cond`` is ``{"y": int64 [N]}`` when ``class_cond`` and ``{}`` otherwise.

    :param data_dir: an image folder (searched recursively) or an ``.npz`` file.
    :param class_cond: return labels (file-name prefixes, or the npz's ``arr_1``).
    :param deterministic: read the shard in sorted order instead of shuffling each epoch.
    :param random_crop: random scale-and-crop instead of the centre crop.
    :param random_flip: flip each image horizontally with probability 1/2.
    :param seed: seed of the shuffling and of the crops/flips (mixed with the shard index,
        so ranks do not share augmentations).
    :param num_workers: loader worker processes (0 reads in this process).
    :param shard, num_shards: this reader's shard; default ``dist_util.get_rank()`` and
        ``dist_util.get_world_size()``.
    :param start_batch: begin at this batch of the stream (a resumed training run), without
        reading the batches before it: the stream equals the full stream minus its head.

    Every epoch drops its last incomplete batch. Raises ``DataError`` for a missing or empty
    ``data_dir``, a malformed ``.npz``, ``class_cond`` without labels, fewer images than
    ``batch_size * num_shards``, and (when the batch is read) an unreadable image.
    """
    if batch_size < 1 or image_size < 1:
        raise DataError(f"batch_size and image_size must be positive: {batch_size}, {image_size}")
    data_dir = os.fspath(data_dir)
    if seed < 0:
        raise DataError(f"seed must be non-negative: {seed}")
    shard = dist_util.get_rank() if shard is None else shard
    num_shards = dist_util.get_world_size() if num_shards is None else num_shards
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} is not in [0, {num_shards})")

    images, classes = _read_source(data_dir, class_cond)
    if len(images) < batch_size * num_shards:
        raise DataError(
            f"{data_dir} has {len(images)} images, fewer than batch_size * num_shards = "
            f"{batch_size} * {num_shards}: no full batch could be formed"
        )
    dataset = ImageDataset(
        image_size,
        images,
        classes=classes,
        shard=shard,
        num_shards=num_shards,
        random_crop=random_crop,
        random_flip=random_flip,
        in_channels=in_channels,
    )
    if start_batch < 0:
        raise DataError(f"start_batch must be non-negative: {start_batch}")
    sampler = _SeededBatchSampler(
        len(dataset),
        batch_size,
        shuffle=not deterministic,
        seed=seed,
        shard=shard,
        start_batch=start_batch,
    )
    loader = DataLoader(
        _ReportErrors(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_ignore_sigterm if num_workers else None,
    )
    return _forever(loader)


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers leave SIGTERM to the training process (which saves, then stops them);
    a cluster's SIGTERM reaches every process of the job."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    while True:
        batches = iter(loader)  # one pass = one epoch of the sampler
        for batch in batches:
            if isinstance(batch, _Failure):
                del batches  # stop the workers now, not when the traceback is freed
                raise DataError(batch.message)
            yield batch


def _read_source(data_dir: str, class_cond: bool) -> tuple[Any, list[int] | None]:
    """(paths or uint8 NHWC array, labels or None) of a folder or an ``.npz`` file."""
    if not os.path.exists(data_dir):
        raise DataError(f"data_dir not found: {data_dir}")
    if os.path.isdir(data_dir):
        paths = list_image_files_recursively(data_dir)
        if not paths:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_dir}")
        classes = None
        if class_cond:
            names = [os.path.basename(p).split("_")[0] for p in paths]
            index = {name: i for i, name in enumerate(sorted(set(names)))}
            classes = [index[name] for name in names]
        return paths, classes
    if not data_dir.endswith(".npz"):
        raise DataError(f"data_dir must be an image folder or an .npz file: {data_dir}")
    images, labels = read_npz(data_dir)
    if class_cond and labels is None:
        raise DataError(f"class_cond needs labels, but {data_dir} has no arr_1")
    return images, (labels.tolist() if class_cond else None)


def count_images(data_dir: str) -> int:
    """Number of images in an image folder or in the ``arr_0`` of an ``.npz`` file."""
    if os.path.isdir(data_dir):
        return len(list_image_files_recursively(data_dir))
    try:
        return npz_length(data_dir)
    except ValueError as e:
        raise DataError(str(e)) from None


def data_share(
    data_dir: str,
    num_samples: int,
    batch_size: Optional[int],
    *,
    image_size: int,
    class_cond: bool,
    in_channels: int,
    rank: int,
    world: int,
    device: torch.device,
) -> Iterator[Tuple[np.ndarray, torch.Tensor, dict]]:
    """Process ``rank``'s share of the first ``num_samples`` images of ``data_dir``: the global
    indices j with ``j % world == rank``, in order, in batches of ``batch_size`` as
    (indices, x0 (n, C, H, W) in [-1, 1] on ``device``, model_kwargs). ``batch_size`` None:
    the whole share as one batch, empty (n = 0) when there are more processes than samples.

    Validates at call time (not at the first batch): raises ``DataError`` (one line) for a
    missing or bad ``data_dir`` and for ``num_samples`` larger than the data.
    """
    if not data_dir:
        raise DataError("--data_dir is required: an image folder or an .npz file of x_0")
    stream = load_data(
        data_dir=data_dir,
        batch_size=1,
        image_size=image_size,
        class_cond=class_cond,
        deterministic=True,
        random_flip=False,
        num_workers=0,
        shard=rank,
        num_shards=world,
        in_channels=in_channels,
    )
    total = count_images(data_dir)
    if num_samples > total:
        raise DataError(f"--num_samples {num_samples} exceeds the {total} images in {data_dir}")
    mine = np.arange(rank, num_samples, world)
    if batch_size is None:
        chunks = [mine]  # one batch, possibly empty
    else:
        chunks = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
    empty = (torch.zeros((0, in_channels, image_size, image_size)), {"y": torch.zeros(0).long()})

    def batches() -> Iterator[Tuple[np.ndarray, torch.Tensor, dict]]:
        for idx in chunks:
            items = [next(stream) for _ in idx] or [empty]
            x0 = torch.cat([x for x, _ in items]).to(device)
            kwargs = {}
            if class_cond:
                kwargs["y"] = torch.cat([c["y"] for _, c in items]).to(device)
            yield idx, x0, kwargs

    return batches()


def script_data_share(
    args: Any, batch_size: Optional[int], num_samples: Optional[int] = None
) -> Iterator[Tuple[np.ndarray, torch.Tensor, dict]]:
    """``data_share`` of a script's flags (``--data_dir``, ``--num_samples``, ``--image_size``,
    ``--class_cond``, ``--in_channels``) for this process's rank, world and device."""
    return data_share(
        args.data_dir,
        args.num_samples if num_samples is None else num_samples,
        batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        in_channels=getattr(args, "in_channels", 3),
        rank=dist_util.get_rank(),
        world=dist_util.get_world_size(),
        device=dist_util.dev(),
    )


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (uint8 [N, H, W, 3]) and ``arr_1`` (int64 [N], or None) of an ``.npz`` file."""
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            if "arr_0" not in keys:
                raise DataError(f"{path} has no arr_0 (arrays: {sorted(keys) or 'none'})")
            images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in keys else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, header or pickle errors: a bad file
        raise DataError(f"cannot read {path}: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DataError(
            f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
        )
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{path}: arr_1 must be {len(images)} integer labels, "
                f"got {labels.dtype} {list(labels.shape)}"
            )
        labels = labels.astype(np.int64)
    return images, labels


def list_image_files_recursively(data_dir: str) -> list[str]:
    """Sorted paths of every .jpg/.jpeg/.png/.gif file (any case) under ``data_dir``."""
    found = []
    for root, _dirs, files in os.walk(data_dir):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return sorted(found)


class ImageDataset(Dataset):
    """One shard of an image folder or uint8 NHWC array, cropped, flipped and scaled.

    guided-diffusion's signature: ``image_paths`` is a sequence of file paths or (here also)
    a uint8 array [N, H, W, 3]; this dataset holds items ``shard, shard + num_shards, ...``
    as ``local_images`` / ``local_classes``. ``dataset[i]`` draws its crop/flip from fresh
    randomness; ``dataset[(i, sample_seed)]`` draws them from ``sample_seed`` (reproducible).
    Returns ``(float32 [C, size, size] in [-1, 1], {"y": int64} or {})``; raises
    ``DataError`` naming the file when an image cannot be read.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: Union[Sequence[str], np.ndarray],
        classes: Sequence[int] | None = None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise DataError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.local_images = image_paths[shard::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.local_images)

    def _pil_image(self, idx: int) -> Image.Image:
        item = self.local_images[idx]
        if isinstance(item, np.ndarray):
            return Image.fromarray(item)
        try:
            with open(item, "rb") as f:
                img = Image.open(f)
                img.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            raise DataError(f"cannot read image {item}: {e}") from None
        return img.convert("RGB")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        idx, sample_seed = key if isinstance(key, tuple) else (key, None)
        rng = np.random.default_rng(sample_seed)
        item = self.local_images[idx]
        if (
            isinstance(item, np.ndarray)
            and not self.random_crop
            and item.shape[:2] == (self.resolution, self.resolution)
        ):
            arr = item  # already the right size: the centre crop would be the identity
        elif self.random_crop:
            arr = random_crop_arr(self._pil_image(idx), self.resolution, rng=rng)
        else:
            arr = center_crop_arr(self._pil_image(idx), self.resolution)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        if self.in_channels == 1:
            arr = to_grey(arr)
        arr = arr.astype(np.float32) / 127.5 - 1  # [H, W, C] in [-1, 1]
        out = {} if self.local_classes is None else {"y": np.int64(self.local_classes[idx])}
        return np.transpose(arr, (2, 0, 1)), out  # [C, H, W]


# guided-diffusion's private name, which forks import
_list_image_files_recursively = list_image_files_recursively


def to_grey(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [H, W, 1]: PIL's "L" conversion (L = (19595 R + 38470 G + 7471 B
    + 2^15) >> 16), so three equal channels v give exactly v."""
    rgb = arr.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16
    return luma.astype(np.uint8)[..., None]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Centre crop of guided-diffusion: uint8 [image_size, image_size, C].

    While the shorter side is at least ``2 * image_size`` the image is halved with a BOX
    filter (2x2 averaging); then a BICUBIC resize brings the shorter side to
    ``image_size``, and the centre square is cut out.
    """
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Random scale-and-crop of guided-diffusion: uint8 [image_size, image_size, C].

    The shorter side is resized (BOX halving, then BICUBIC) to a size drawn uniformly from
    ``[ceil(image_size / max_crop_frac), ceil(image_size / min_crop_frac)]``, and a square
    of ``image_size`` is cut at a uniformly random position. The draws come from ``rng``,
    or without it from Python's ``random`` module, as in the original (the same
    ``random.seed`` gives the original's crops).
    """

    def randrange(start: int, stop: int) -> int:
        return random.randrange(start, stop) if rng is None else int(rng.integers(start, stop))

    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    smaller = randrange(lo, hi + 1)
    img = pil_image
    while min(img.size) >= 2 * smaller:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = smaller / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = randrange(0, arr.shape[0] - image_size + 1)
    left = randrange(0, arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


class _SeededBatchSampler:
    """Batches of ``(index, sample_seed)`` whose order and seeds depend on (seed, shard, epoch).

    The epoch counter advances each time a pass starts; incomplete last batches are dropped.
    """

    def __init__(
        self, n: int, batch_size: int, shuffle: bool, seed: int, shard: int, start_batch: int = 0
    ) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.shard = seed, shard
        # start at batch ``start_batch`` of the stream without reading what comes before
        self.epoch, self._skip = divmod(start_batch, len(self))

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.shard, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(2**63 - 1, size=self.n)
        first, self._skip = self._skip * self.batch_size, 0
        for start in range(first, len(self) * self.batch_size, self.batch_size):
            span = range(start, start + self.batch_size)
            yield [(int(order[k]), int(seeds[k])) for k in span]


class _Failure:
    """A read error carried out of a loader worker as data, re-raised as one-line DataError."""

    def __init__(self, message: str) -> None:
        self.message = message


class _ReportErrors(Dataset):
    """Wraps a dataset so that a ``DataError`` travels to the main process as a ``_Failure``
    (the loader would otherwise re-raise it with a worker traceback inside the message)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.dataset[key]
        except DataError as e:
            return _Failure(str(e))


def _collate(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _Failure):
            return item
    batch = torch.from_numpy(np.stack([arr for arr, _ in items]))  # [N, 3, H, W]
    cond = {}
    if items and "y" in items[0][1]:
        cond["y"] = torch.from_numpy(np.array([out["y"] for _, out in items], dtype=np.int64))
    return batch, cond


def prepare_fashion_mnist(out_dir: str, source: str = "") -> dict:
    """``{"train": path, "test": path}`` of ``fmnist_{train,test}.npz`` in ``out_dir``, made by
    ``datasets/fashion_mnist.py`` (in its own process, as a user runs it) when missing.

    Raises ``DataError`` with the script's one-line error when it fails.
    """
    paths = {s: Path(out_dir) / f"fmnist_{s}.npz" for s in ("train", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    dist_util.print0(f"preparing Fashion-MNIST in {out_dir} ...")
    script = Path(__file__).resolve().parents[1] / "datasets" / "fashion_mnist.py"
    cmd = [sys.executable, str(script), "--out_dir", str(out_dir), "--no_png"]
    proc = subprocess.run(
        cmd + (["--source", source] if source else []), capture_output=True, text=True
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["unknown error"]
        raise DataError(f"cannot prepare Fashion-MNIST in {out_dir}: {lines[-1]}")
    return paths
