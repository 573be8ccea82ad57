"""Tests of guided_diffusion.image_datasets: load_data over folders and .npz files."""

from __future__ import annotations

import inspect
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import logger
from guided_diffusion.image_datasets import (
    DataError,
    ImageDataset,
    center_crop_arr,
    list_image_files_recursively,
    load_data,
    random_crop_arr,
)


def _value_images(n: int, size: int = 8) -> np.ndarray:
    """n images whose pixels all equal 10 * i (identifiable after any crop or flip)."""
    return np.stack([np.full((size, size, 3), 10 * i, dtype=np.uint8) for i in range(n)])


def _ids(batch: torch.Tensor) -> list[int]:
    """Recover the 10 * i values of _value_images from a [-1, 1] batch."""
    values = ((batch + 1) * 127.5).round().to(torch.int64)
    assert (values == values[:, :1, :1, :1]).all()
    return (values[:, 0, 0, 0] // 10).tolist()


def _save_folder(tmp_path: Path, names: list[str], images: np.ndarray) -> Path:
    folder = tmp_path / "images"
    for name, arr in zip(names, images):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)
    return folder


def _take(gen, n):
    return list(itertools.islice(gen, n))


def test_folder_labels_from_prefixes_and_exact_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    names = ["dog_0.png", "cat_1.png", "sub/dog_2.png", "bird_3.png", "cat_x_4.png", "cat.png"]
    folder = _save_folder(tmp_path, names, images)
    gen = load_data(
        data_dir=str(folder),
        batch_size=6,
        image_size=8,
        class_cond=True,
        deterministic=True,
        random_flip=False,
        num_workers=0,
    )
    batch, cond = next(gen)
    assert batch.dtype == torch.float32 and batch.shape == (6, 3, 8, 8)
    assert cond["y"].dtype == torch.int64
    # sorted paths: bird_3, cat.png, cat_1, cat_x_4, dog_0, sub/dog_2
    # classes sorted: bird=0, cat=1, cat.png=2, dog=3
    order = [3, 5, 1, 4, 0, 2]
    assert cond["y"].tolist() == [0, 2, 1, 1, 3, 3]
    expected = torch.from_numpy(images[order].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    assert batch.min() >= -1 and batch.max() <= 1


def test_unconditional_folder_has_empty_cond(tmp_path):
    folder = _save_folder(tmp_path, [f"a_{i}.png" for i in range(4)], _value_images(4))
    batch, cond = next(load_data(data_dir=str(folder), batch_size=2, image_size=8, num_workers=0))
    assert cond == {} and batch.shape == (2, 3, 8, 8)


def test_npz_exact_values_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([4, 3, 2, 1, 0], dtype=np.int32)
    path = tmp_path / "data.npz"
    np.savez(path, images, labels)
    gen = load_data(
        data_dir=str(path),
        batch_size=5,
        image_size=8,
        class_cond=True,
        deterministic=True,
        random_flip=False,
        num_workers=0,
    )
    batch, cond = next(gen)
    expected = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    assert cond["y"].tolist() == [4, 3, 2, 1, 0] and cond["y"].dtype == torch.int64


def test_npz_of_other_size_is_center_cropped(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(2, 20, 12, 3), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, images)
    batch, _ = next(
        load_data(
            data_dir=str(path),
            batch_size=2,
            image_size=8,
            deterministic=True,
            random_flip=False,
            num_workers=0,
        )
    )
    for got, img in zip(batch, images):
        want = center_crop_arr(Image.fromarray(img), 8).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_center_crop_arr():
    # exact size: identity
    img = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(img), 16), img)
    # centred: three 32-wide bands, the middle one is kept without resampling
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, 32:64] = 128
    bands[:, 64:] = 255
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(bands), 32), bands[:, 32:64])
    # twice the size: one 2x2 BOX average (PIL's fixed-point filter: within 1)
    big = np.random.default_rng(4).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mean = big.reshape(16, 2, 16, 2, 3).astype(np.float64).mean(axis=(1, 3))
    out = center_crop_arr(Image.fromarray(big), 16)
    assert out.shape == (16, 16, 3) and np.abs(out - mean).max() <= 1
    # non-square, much larger: halved, resized, cropped; a constant image stays constant
    flat = np.full((130, 70, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(flat), 16), flat[:16, :16])


def test_random_crop_arr_shape_seed_and_variety():
    grad = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (40, 1, 3))
    pil = Image.fromarray(grad)
    crops = [random_crop_arr(pil, 32, rng=np.random.default_rng(s)) for s in range(20)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    np.testing.assert_array_equal(crops[0], random_crop_arr(pil, 32, rng=np.random.default_rng(0)))
    assert len({c.tobytes() for c in crops}) > 3  # scale and position vary
    flat = Image.fromarray(np.full((50, 45, 3), 9, dtype=np.uint8))
    np.testing.assert_array_equal(random_crop_arr(flat, 32, rng=np.random.default_rng(5)), 9)


def test_random_flip(tmp_path):
    img = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    img[0, :, :4] = 255  # left half white
    path = tmp_path / "one.npz"
    np.savez(path, np.repeat(img, 16, axis=0))
    flipped = set()
    for random_flip in (True, False):
        gen = load_data(
            data_dir=str(path),
            batch_size=16,
            image_size=8,
            random_flip=random_flip,
            num_workers=0,
        )
        batch, _ = next(gen)
        left_white = (batch[:, 0, 0, 0] > 0).tolist()
        right_white = (batch[:, 0, 0, 7] > 0).tolist()
        assert all(a != b for a, b in zip(left_white, right_white))  # original or mirrored
        flipped.add((random_flip, sum(right_white)))
    assert (False, 0) in flipped
    (n_flipped,) = [n for flag, n in flipped if flag]
    assert 0 < n_flipped < 16


def test_random_crop_option_changes_images(tmp_path):
    grad = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))
    path = tmp_path / "g.npz"
    np.savez(path, np.repeat(grad[None], 8, axis=0))
    kwargs = dict(data_dir=str(path), batch_size=8, image_size=8, random_flip=False)
    plain, _ = next(load_data(**kwargs, num_workers=0))
    cropped, _ = next(load_data(**kwargs, random_crop=True, num_workers=0))
    assert (plain == plain[:1]).all()  # every item the same image, centre crop = identity
    assert not (cropped == plain).all()  # some item was rescaled and cropped


@pytest.mark.parametrize("n,batch_size,num_shards", [(10, 1, 3), (12, 2, 2)])
def test_shards_disjoint_and_covering(tmp_path, n, batch_size, num_shards):
    path = tmp_path / "v.npz"
    np.savez(path, _value_images(n))
    seen = []
    for shard in range(num_shards):
        gen = load_data(
            data_dir=str(path),
            batch_size=batch_size,
            image_size=8,
            deterministic=True,
            random_flip=False,
            shard=shard,
            num_shards=num_shards,
            num_workers=0,
        )
        per_epoch = len(range(shard, n, num_shards)) // batch_size
        ids = [i for batch, _ in _take(gen, per_epoch) for i in _ids(batch)]
        assert ids == list(range(shard, n, num_shards))[: per_epoch * batch_size]
        seen.append(set(ids))
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == n


def test_default_shard_comes_from_dist_util(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, _value_images(4))
    gen = load_data(
        data_dir=str(path), batch_size=4, image_size=8, deterministic=True, num_workers=0
    )
    assert sorted(_ids(next(gen)[0])) == [0, 1, 2, 3]  # rank 0 of a world of 1: everything


def test_seed_determinism_epochs_and_drop_last(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, _value_images(10))
    kwargs = dict(data_dir=str(path), batch_size=4, image_size=8, random_crop=True)

    def run(seed, workers):
        gen = load_data(**kwargs, seed=seed, num_workers=workers)
        return [b for b, _ in _take(gen, 6)]

    a, b, c = run(0, 0), run(0, 1), run(1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, any worker count
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # another seed, other batches
    epochs = [[i for x in a[e * 2 : e * 2 + 2] for i in _ids(x)] for e in range(3)]
    for ids in epochs:  # drop_last: 2 batches of 4 distinct images out of 10 per epoch
        assert len(ids) == 8 and len(set(ids)) == 8
    assert len({tuple(ids) for ids in epochs}) > 1  # reshuffled every epoch


@pytest.mark.parametrize("start", [1, 2, 5])
def test_start_batch_continues_the_full_stream(tmp_path, start):
    """start_batch=k gives the full stream without its first k batches (across epochs)."""
    path = tmp_path / "v.npz"
    np.savez(path, _value_images(10))
    kwargs = dict(
        data_dir=str(path),
        batch_size=4,
        image_size=8,
        random_crop=True,
        random_flip=True,
        seed=3,
        num_workers=0,
    )
    full = [b for b, _ in _take(load_data(**kwargs), start + 4)]
    late = [b for b, _ in _take(load_data(**kwargs, start_batch=start), 4)]
    assert all(torch.equal(x, y) for x, y in zip(full[start:], late))


def test_deterministic_keeps_sorted_order(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, _value_images(6))
    gen = load_data(
        data_dir=str(path), batch_size=3, image_size=8, deterministic=True, num_workers=0
    )
    assert [_ids(b) for b, _ in _take(gen, 4)] == [[0, 1, 2], [3, 4, 5]] * 2


def test_list_image_files_recursively(tmp_path):
    for name in ["b.PNG", "a/c.jpg", "a/d.jpeg", "e.gif", "notes.txt", "a/z/f.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [
        Path(p).relative_to(tmp_path).as_posix() for p in list_image_files_recursively(tmp_path)
    ]
    assert found == ["a/c.jpg", "a/d.jpeg", "a/z/f.png", "b.PNG", "e.gif"]


def test_image_dataset_direct_use():
    ds = ImageDataset(8, _value_images(5), classes=[0, 1, 0, 1, 0], shard=1, num_shards=2)
    assert len(ds) == 2
    arr, out = ds[(1, 123)]
    assert arr.shape == (3, 8, 8) and arr.dtype == np.float32 and out["y"] == 1
    np.testing.assert_array_equal(ds[(1, 123)][0], arr)  # same sample seed, same output
    assert ds[0][0].shape == (3, 8, 8)


def _one_line_error(match, **kwargs):
    kwargs.setdefault("num_workers", 0)
    with pytest.raises(DataError, match=match) as info:
        next(load_data(**kwargs))
    assert "\n" not in str(info.value)
    return info.value


def test_errors(tmp_path):
    base = dict(batch_size=2, image_size=8)
    _one_line_error("data_dir not found", data_dir=str(tmp_path / "nope"), **base)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    _one_line_error("no images", data_dir=str(tmp_path / "empty"), **base)
    (tmp_path / "x.txt").write_text("")
    _one_line_error("image folder or an .npz", data_dir=str(tmp_path / "x.txt"), **base)

    np.savez(tmp_path / "no_arr0.npz", images=_value_images(4))
    _one_line_error("no arr_0", data_dir=str(tmp_path / "no_arr0.npz"), **base)
    np.savez(tmp_path / "float.npz", _value_images(4).astype(np.float32))
    _one_line_error("uint8", data_dir=str(tmp_path / "float.npz"), **base)
    np.savez(tmp_path / "gray.npz", _value_images(4)[..., 0])
    _one_line_error(r"\[N, H, W, 3\]", data_dir=str(tmp_path / "gray.npz"), **base)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    _one_line_error("cannot read", data_dir=str(tmp_path / "broken.npz"), **base)
    np.savez(tmp_path / "unlabelled.npz", _value_images(4))
    _one_line_error(
        "class_cond needs labels",
        data_dir=str(tmp_path / "unlabelled.npz"),
        class_cond=True,
        **base,
    )
    np.savez(tmp_path / "badlabels.npz", _value_images(4), np.zeros(3, dtype=np.int64))
    _one_line_error("arr_1", data_dir=str(tmp_path / "badlabels.npz"), class_cond=True, **base)
    err = _one_line_error(
        "fewer than batch_size",
        data_dir=str(tmp_path / "unlabelled.npz"),
        batch_size=3,
        image_size=8,
        shard=0,
        num_shards=2,
    )
    assert "4 images" in str(err)
    _one_line_error(
        "shard 2", data_dir=str(tmp_path / "unlabelled.npz"), shard=2, num_shards=2, **base
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named(tmp_path, workers):
    folder = _save_folder(tmp_path, ["a_0.png", "a_1.png"], _value_images(2))
    (folder / "a_2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    err = _one_line_error(
        "cannot read image",
        data_dir=str(folder),
        batch_size=3,
        image_size=8,
        deterministic=True,
        num_workers=workers,
    )
    assert "a_2.png" in str(err)


# ------------------------------------------- guided-diffusion API that downstream code imports


def _original_random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """openai/guided-diffusion's image_datasets.random_crop_arr, verbatim (the reference)."""
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = random.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = random.randrange(arr.shape[0] - image_size + 1)
    crop_x = random.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_original_signatures():
    empty = inspect.Parameter.empty
    assert _params(center_crop_arr) == [("pil_image", empty), ("image_size", empty)]
    assert _params(random_crop_arr)[:4] == [
        ("pil_image", empty),
        ("image_size", empty),
        ("min_crop_frac", 0.8),
        ("max_crop_frac", 1.0),
    ]
    assert _params(random_crop_arr)[4:] == [("rng", None)]  # optional addition
    assert _params(ImageDataset.__init__)[1:8] == [
        ("resolution", empty),
        ("image_paths", empty),
        ("classes", None),
        ("shard", 0),
        ("num_shards", 1),
        ("random_crop", False),
        ("random_flip", True),
    ]


def test_random_crop_arr_without_rng_matches_the_original():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8))
    for seed in range(6):
        for fracs in ((), (0.5, 0.9)):
            random.seed(seed)
            want = _original_random_crop_arr(img, 32, *fracs)
            random.seed(seed)
            np.testing.assert_array_equal(random_crop_arr(img, 32, *fracs), want)


def test_image_dataset_with_the_original_keywords(tmp_path):
    folder = _save_folder(tmp_path, [f"c{i % 2}_{i}.png" for i in range(5)], _value_images(5))
    paths = list_image_files_recursively(str(folder))
    ds = ImageDataset(
        resolution=8,
        image_paths=paths,
        classes=[0, 1, 0, 1, 0],
        shard=1,
        num_shards=2,
        random_crop=True,
        random_flip=False,
    )
    assert ds.local_images == paths[1::2] and ds.local_classes == [1, 1]
    assert len(ds) == 2
    arr, out = ds[1]
    assert arr.shape == (3, 8, 8) and out["y"] == 1
    assert _ids(torch.from_numpy(arr)[None]) == [1]  # paths[3] = c1_1.png, all pixels 10


@pytest.fixture
def fresh_logger():
    logger.reset()
    yield
    logger.reset()


class _FakeComm:
    """An mpi4py-like communicator of two ranks; the other rank logged loss = 3 once."""

    def allgather(self, local):
        return [local, ({"loss": 3.0}, {"loss": 1})]


def test_logger_original_api(tmp_path, fresh_logger):
    logger.configure(str(tmp_path / "outer"), format_strs=["csv"])
    outer = logger.Logger.CURRENT
    assert logger.get_current() is outer and outer.get_dir() == str(tmp_path / "outer")
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["csv"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.logkv("a", 1)
        logger.dumpkvs()
    assert logger.Logger.CURRENT is outer and logger.get_dir() == str(tmp_path / "outer")
    logger.logkv("b", 2)
    logger.dumpkvs()
    assert (tmp_path / "inner" / "progress.csv").read_text().split() == ["a", "1"]
    assert (tmp_path / "outer" / "progress.csv").read_text().split() == ["b", "2"]

    @logger.profile("step")
    def step(x):
        time.sleep(0.02)
        return x + 1

    assert step(1) == 2 and step.__name__ == "step"
    with logger.profile_kv("io"):
        time.sleep(0.01)
    kvs = logger.getkvs()
    assert kvs["wait_step"] >= 0.02 and kvs["wait_io"] >= 0.01
    logger.dumpkvs()

    logger.set_comm(_FakeComm())  # an mpi4py communicator, as in the original
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 1.0)
    assert logger.dumpkvs()["loss"] == pytest.approx((2 * 1.0 + 3.0) / 3)


def test_logger_set_level(tmp_path, fresh_logger):
    log = logger.Logger(str(tmp_path), [logger.HumanOutputFormat(str(tmp_path / "log.txt"))])
    assert log.get_dir() == str(tmp_path)
    log.set_level(logger.WARN)
    log.log("hidden", level=logger.INFO)
    log.log("shown", level=logger.WARN)
    log.close()
    assert (tmp_path / "log.txt").read_text() == "shown\n"
    logger.set_level(logger.ERROR)
    assert logger.get_current().level == logger.ERROR
