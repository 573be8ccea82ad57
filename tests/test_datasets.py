"""Tests of the dataset preparation scripts in datasets/ on miniature sources in the real
formats (IDX files, a CIFAR tarball, an LSUN lmdb, ImageNet-32 batch files, image folders
and archives), and of their outputs read back with load_data."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.image_datasets import center_crop_arr, load_data

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


_MODULES: dict = {}


def _script(name: str):
    """Import datasets/<name>.py (datasets/ is a folder of scripts, not a package)."""
    if name not in _MODULES:
        if str(DATASETS) not in sys.path:
            sys.path.insert(0, str(DATASETS))
        spec = importlib.util.spec_from_file_location(f"prep_{name}", DATASETS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def _run(name: str, *args, ok: bool = True, subprocess_: bool = False):
    """Run a script's command line: in this process (fast), or as ``python datasets/X.py``.

    Returns an object with ``returncode`` and ``stderr``. A failure must exit with status 1
    and end stderr with one ``X.py: error: ...`` line and no traceback.
    """
    argv = [str(DATASETS / f"{name}.py"), *map(str, args)]
    if subprocess_:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    else:
        module, err = _script(name), io.StringIO()
        old_argv, sys.argv = sys.argv, argv
        code = 0
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module.run_cli(module.main)
        except SystemExit as e:  # run_cli: sys.exit("<prog>: error: ...")
            code = 1 if isinstance(e.code, str) else e.code
            if isinstance(e.code, str):
                err.write(e.code + "\n")
        finally:
            sys.argv = old_argv
        proc = subprocess.CompletedProcess(argv, code, "", err.getvalue())
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]  # progress bars may come before
        assert last.startswith(f"{name}.py: error: "), proc.stderr
    return proc


def _load_all(data_dir, n, image_size, class_cond=True):
    """Every image of data_dir in sorted order, as (uint8 NHWC, labels or None)."""
    gen = load_data(
        data_dir=str(data_dir),
        batch_size=n,
        image_size=image_size,
        class_cond=class_cond,
        deterministic=True,
        random_flip=False,
        num_workers=0,
    )
    batch, cond = next(gen)
    assert batch.min() >= -1 and batch.max() <= 1
    images = ((batch.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return images, (cond["y"].numpy() if class_cond else None)


def _check_evaluator_reads(path: Path, images: np.ndarray) -> None:
    """The evaluator's batch reader accepts the .npz and streams back exactly its images."""
    evaluator = pytest.importorskip("evaluations.evaluator")
    with evaluator.open_image_batch(str(path)) as reader:
        assert len(reader) == len(images)
        chunks = list(reader.read_batches(4))
    np.testing.assert_array_equal(np.concatenate(chunks), images)


# --------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def fmnist_source(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "fashion-mnist"
    src.mkdir()
    data = {}
    for split, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros inside
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        labels[:10] = [9, 0, 1, 2, 3, 4, 5, 6, 7, 8][:n]  # train: every class present
        compress = split == "train"  # one split gzip-compressed, the other raw
        suffix = ".gz" if compress else ""
        _write_idx(src / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(src / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
        data[split] = (images, labels)
    return src, data


def test_fashion_mnist(tmp_path, fmnist_source):
    src, data = fmnist_source
    out = tmp_path / "out"
    _run("fashion_mnist", "--source", src, "--out_dir", out, subprocess_=True)
    for split, name in (("train", "fmnist_train"), ("t10k", "fmnist_test")):
        images, labels = data[split]
        with np.load(out / f"{name}.npz") as npz:
            x, y = npz["arr_0"], npz["arr_1"]
        assert x.dtype == np.uint8 and x.shape == (len(images), 32, 32, 3)
        assert y.dtype == np.int64 and y.tolist() == labels.tolist()
        for c in range(3):  # 2 zero pixels on every side, the image inside, equal channels
            np.testing.assert_array_equal(x[:, 2:30, 2:30, c], images)
        border = np.ones((32, 32), dtype=bool)
        border[2:30, 2:30] = False
        assert (x[:, border] == 0).all()

    images, labels = data["train"]
    names = sorted(p.name for p in (out / "fmnist_train").iterdir())
    assert names == sorted(f"{lab}_{i:05d}.png" for i, lab in enumerate(labels))
    assert "9_00000.png" in names and "0_00001.png" in names
    with np.load(out / "fmnist_train.npz") as npz:
        x = npz["arr_0"]
    for i in (0, 5):
        png = np.asarray(Image.open(out / "fmnist_train" / f"{labels[i]}_{i:05d}.png"))
        np.testing.assert_array_equal(png, x[i])

    # load_data: class indices from the digit prefixes are the dataset's own labels
    got, y = _load_all(out / "fmnist_train", len(labels), 32)
    order = sorted(range(len(labels)), key=lambda i: f"{labels[i]}_{i:05d}")
    assert y.tolist() == labels[order].tolist()
    np.testing.assert_array_equal(got, x[order])
    got, y = _load_all(out / "fmnist_test.npz", 5, 32)
    assert y.tolist() == data["t10k"][1].tolist()
    _check_evaluator_reads(out / "fmnist_train.npz", x)
    _check_evaluator_reads(out / "fmnist_test.npz", got)

    # idempotent rerun; --no_png leaves the folder alone
    _run("fashion_mnist", "--source", src, "--out_dir", out, "--no_png")
    assert sorted(p.name for p in (out / "fmnist_train").iterdir()) == names
    _run("fashion_mnist", "--source", src, "--out_dir", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "fmnist_test.npz",
        "fmnist_train",
        "fmnist_train.npz",
    ]


def test_fashion_mnist_errors(tmp_path, fmnist_source):
    src, _ = fmnist_source
    proc = _run(
        "fashion_mnist",
        "--source",
        tmp_path / "none",
        "--out_dir",
        tmp_path,
        ok=False,
        subprocess_=True,
    )
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    (src / "t10k-labels-idx1-ubyte").unlink()
    proc = _run("fashion_mnist", "--source", src, "--out_dir", tmp_path, ok=False)
    assert "t10k-labels-idx1-ubyte" in proc.stderr
    fm = _script("fashion_mnist")
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x03" + np.array([2, 28, 28], ">u4").tobytes() + b"\x00" * 10)
    with pytest.raises(fm.PrepError, match="header"):
        fm.read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(fm.PrepError, match="not an IDX file"):
        fm.read_idx(bad)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(rng, n):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return data, labels


def _write_cifar_tarball(path: Path, batches: dict, extra: dict | None = None) -> None:
    """The official layout: cifar-10-batches-py/<name>, Python-2-style pickles (bytes keys)."""
    with tarfile.open(path, "w:gz") as tf:

        def add(name, obj):
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))

        meta = {b"label_names": [b"airplane", b"automobile", b"bird"], b"num_vis": 3072}
        add("batches.meta", meta)
        for name, (data, labels) in batches.items():
            add(name, {b"batch_label": name.encode(), b"labels": labels, b"data": data})
        for name, payload in (extra or {}).items():
            add(name, payload)


@pytest.fixture
def cifar_archive(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: _cifar_batch(rng, 3 if name == "test_batch" else 2) for name in names}
    batches["data_batch_1"][1][:2] = [0, 9]
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_tarball(path, batches)
    return path, batches


def test_cifar10(tmp_path, cifar_archive):
    archive, batches = cifar_archive
    out = tmp_path / "out"
    _run("cifar10", "--archive", archive, "--out_dir", out, "--npz", subprocess_=True)
    classes = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split, names in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),
        ("test", ["test_batch"]),
    ):
        data = np.concatenate([batches[n][0] for n in names])
        labels = [lab for n in names for lab in batches[n][1]]
        with np.load(out / f"cifar10_{split}.npz") as npz:
            x, y = npz["arr_0"], npz["arr_1"]
        assert x.dtype == np.uint8 and x.shape == (len(data), 32, 32, 3)
        assert y.dtype == np.int64 and y.tolist() == labels
        # channel planes: pixel (r, c) of channel k is data[k * 1024 + r * 32 + c]
        for i, r, c, k in [(0, 0, 0, 0), (1, 5, 7, 1), (len(data) - 1, 31, 30, 2)]:
            assert x[i, r, c, k] == data[i, k * 1024 + r * 32 + c]
        files = sorted(p.name for p in (out / f"cifar_{split}").iterdir())
        assert files == sorted(f"{classes[lab]}_{i:05d}.png" for i, lab in enumerate(labels))
        png = np.asarray(Image.open(out / f"cifar_{split}" / f"{classes[labels[1]]}_00001.png"))
        np.testing.assert_array_equal(png, x[1])
    assert (out / "cifar_train" / "plane_00000.png").exists()
    assert (out / "cifar_train" / "truck_00001.png").exists()

    # load_data: folder labels are the sorted class names, npz labels the archive's
    train_labels = [lab for i in range(1, 6) for lab in batches[f"data_batch_{i}"][1]]
    got, y = _load_all(out / "cifar_train", 10, 32)
    order = sorted(range(10), key=lambda i: f"{classes[train_labels[i]]}_{i:05d}")
    present = sorted({classes[lab] for lab in train_labels})
    assert y.tolist() == [present.index(classes[train_labels[i]]) for i in order]
    with np.load(out / "cifar10_train.npz") as npz:
        np.testing.assert_array_equal(got, npz["arr_0"][order])
    got, y = _load_all(out / "cifar10_train.npz", 10, 32)
    assert y.tolist() == train_labels
    _check_evaluator_reads(out / "cifar10_train.npz", got)
    with np.load(out / "cifar10_test.npz") as npz:
        _check_evaluator_reads(out / "cifar10_test.npz", npz["arr_0"])


def test_cifar10_without_npz_writes_only_folders(tmp_path, cifar_archive):
    archive, _ = cifar_archive
    _run("cifar10", "--archive", archive, "--out_dir", tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["cifar_test", "cifar_train"]


def test_cifar10_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    rng = np.random.default_rng(2)
    batches = {f"data_batch_{i}": _cifar_batch(rng, 1) for i in range(2, 6)}
    batches["test_batch"] = _cifar_batch(rng, 1)
    archive = tmp_path / "evil.tar.gz"
    _write_cifar_tarball(archive, batches, extra={"data_batch_1": pickle.dumps(Evil())})
    proc = _run("cifar10", "--archive", archive, "--out_dir", tmp_path / "o", ok=False)
    assert "refusing to load global builtins.exec" in proc.stderr
    assert not marker.exists()


def test_cifar10_errors_and_download(tmp_path, cifar_archive):
    archive, _ = cifar_archive
    proc = _run("cifar10", "--archive", tmp_path / "missing.tar.gz", ok=False)
    assert "archive not found" in proc.stderr
    proc = _run(
        "cifar10", "--out_dir", tmp_path / "dl", "--url", "http://127.0.0.1:9/c.tar.gz", ok=False
    )
    assert "cannot download" in proc.stderr and "--archive" in proc.stderr
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tf:
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        tf.addfile(info, io.BytesIO(b""))
    proc = _run("cifar10", "--archive", partial, ok=False)
    assert "lacks" in proc.stderr and "data_batch_1" in proc.stderr

    cifar = _script("cifar10")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dl" / "cifar.tar.gz"
    assert cifar.download(archive.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == archive.read_bytes()
    with pytest.raises(cifar.PrepError, match="MD5"):
        cifar.download(archive.as_uri(), tmp_path / "dl" / "other.tar.gz", "0" * 32)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["cifar.tar.gz"]


# --------------------------------------------------------------------------- LSUN


def _encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_lsun_tower(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(100, 70, 3), dtype=np.uint8),
        np.full((33, 33, 3), 200, dtype=np.uint8),
    ]
    values = [
        _encode(images[0], "WEBP", lossless=True),
        _encode(images[1], "WEBP", lossless=True),
        _encode(images[2], "JPEG", quality=100),
    ]
    keys = [b"bbb", b"aaa", b"ccc"]  # lmdb iterates in key order: images 1, 0, 2
    db = tmp_path / "tower_train_lmdb"
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in zip(keys, values):
            txn.put(key, value)
    env.close()

    out = tmp_path / "tower32"
    args = ["--image-size", 32, "--prefix", "tower", "--format", "png", db, out]
    _run("lsun_tower", *args, subprocess_=True)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["tower_0000000.png", "tower_0000001.png", "tower_0000002.png"]
    for i, src in enumerate([images[1], images[0]]):
        got = np.asarray(Image.open(out / files[i]))
        np.testing.assert_array_equal(got, center_crop_arr(Image.fromarray(src), 32))
    got, _ = _load_all(out, 3, 32, class_cond=False)
    np.testing.assert_array_equal(got[0], center_crop_arr(Image.fromarray(images[1]), 32))

    # the README's command line: JPEGs, here capped at two images
    out_jpg = tmp_path / "tower_jpg"
    _run("lsun_tower", "--image-size", 32, "--prefix", "tower", "--max-images", 2, db, out_jpg)
    files = sorted(p.name for p in out_jpg.iterdir())
    assert files == ["tower_0000000.jpg", "tower_0000001.jpg"]
    jpg = np.asarray(Image.open(out_jpg / files[0]))
    want = center_crop_arr(Image.fromarray(images[1]), 32)
    want_jpg = np.asarray(Image.open(io.BytesIO(_encode(want, "JPEG", quality=95))))
    np.testing.assert_array_equal(jpg, want_jpg)  # the same crop, saved at quality 95

    proc = _run("lsun_tower", "--image-size", 32, db, out, ok=False)
    assert "not empty" in proc.stderr
    proc = _run("lsun_tower", tmp_path / "no_lmdb", tmp_path / "o2", ok=False)
    assert "lmdb not found" in proc.stderr


def test_lsun_without_lmdb_package(monkeypatch, tmp_path):
    lsun = _script("lsun_tower")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # makes `import lmdb` fail
    with pytest.raises(lsun.PrepError, match="pip install lmdb"):
        lsun.lsun_images(tmp_path, 32)


# --------------------------------------------------------------------------- ImageNet-32


def _write_imagenet_batches(src: Path, rng, as_npz: bool = False) -> dict:
    src.mkdir()
    data = {}
    names = [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]
    for name in names:
        x = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(1, 1001, size=2)]
        batch = {"data": x, "labels": y, "mean": x.mean(axis=0)}
        if as_npz:
            np.savez(src / f"{name}.npz", **batch)
        else:
            (src / name).write_bytes(pickle.dumps(batch, protocol=5))  # numpy: _frombuffer
        data[name] = (x, y)
    return data


@pytest.mark.parametrize("as_npz", [False, True])
def test_imagenet32(tmp_path, as_npz):
    rng = np.random.default_rng(4)
    src = tmp_path / "Imagenet32"
    data = _write_imagenet_batches(src, rng, as_npz)
    out = tmp_path / "out"
    _run("imagenet32_npz", "--source", src, "--out_dir", out, subprocess_=as_npz)
    assert sorted(p.name for p in out.iterdir()) == ["imagenet32_train.npz", "imagenet32_val.npz"]
    train = [f"train_data_batch_{i}" for i in range(1, 11)]
    for split, names in (("train", train), ("val", ["val_data"])):
        rows = np.concatenate([data[n][0] for n in names])
        labels = [lab - 1 for n in names for lab in data[n][1]]
        with np.load(out / f"imagenet32_{split}.npz") as npz:
            x, y = npz["arr_0"], npz["arr_1"]
        assert x.dtype == np.uint8 and x.shape == (len(rows), 32, 32, 3)
        assert y.dtype == np.int64 and y.tolist() == labels
        np.testing.assert_array_equal(x, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        assert x[1, 3, 4, 2] == rows[1, 2 * 1024 + 3 * 32 + 4]
    got, y = _load_all(out / "imagenet32_train.npz", 20, 32)
    assert y.tolist() == [lab - 1 for n in train for lab in data[n][1]]


def test_imagenet32_errors(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "Imagenet32"
    _write_imagenet_batches(src, rng)
    (src / "train_data_batch_7").unlink()
    proc = _run("imagenet32_npz", "--source", src, "--out_dir", tmp_path, ok=False)
    assert "train_data_batch_7" in proc.stderr
    _run("imagenet32_npz", "--source", src, "--out_dir", tmp_path, "--split", "val")
    assert (tmp_path / "imagenet32_val.npz").exists()
    proc = _run("imagenet32_npz", "--source", tmp_path / "Imagenet32" / "x", ok=False)
    assert "not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _run("imagenet32_npz", "--source", tmp_path / "empty", ok=False)
    assert "no ImageNet batch files" in proc.stderr


# --------------------------------------------------------------------------- folders / archives


def _image_folder(root: Path, shapes: dict[str, tuple[int, int]], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = {}
    for name, (h, w) in shapes.items():
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / name)
        images[name] = arr
    return images


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
    return path


def _tar(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for p in sorted(folder.rglob("*"), reverse=True):  # archive order != name order
            tf.add(p, p.relative_to(folder.parent).as_posix(), recursive=False)
    return path


def test_celeba64(tmp_path):
    folder = tmp_path / "img_align_celeba"
    shapes = {"000002.png": (218, 178), "000001.png": (218, 178), "000003.png": (218, 178)}
    images = _image_folder(folder, shapes, seed=6)
    out = tmp_path / "celeba64.npz"
    _run("celeba64_npz", "--source", folder, "--out", out, subprocess_=True)
    with np.load(out) as npz:
        assert npz.files == ["arr_0"]
        x = npz["arr_0"]
    assert x.dtype == np.uint8 and x.shape == (3, 64, 64, 3)
    for i, name in enumerate(sorted(images)):
        crop = images[name][57:185, 25:153]  # 128x128 centred at (x=89, y=121)
        np.testing.assert_array_equal(x[i], center_crop_arr(Image.fromarray(crop), 64))
        block_mean = crop.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(x[i] - block_mean).max() <= 1  # one 2x2 BOX halving

    out_zip = tmp_path / "from_zip.npz"
    _run("celeba64_npz", "--source", _zip(folder, tmp_path / "c.zip"), "--out", out_zip)
    with np.load(out_zip) as npz:
        np.testing.assert_array_equal(npz["arr_0"], x)
    got, _ = _load_all(out, 3, 64, class_cond=False)
    np.testing.assert_array_equal(got, x)

    other = tmp_path / "o.npz"
    _run(
        "celeba64_npz",
        "--source",
        folder,
        "--out",
        other,
        "--crop_size",
        140,
        "--crop_center",
        89,
        109,
    )
    with np.load(other) as npz:
        crop = images["000001.png"][39:179, 19:159]
        np.testing.assert_array_equal(npz["arr_0"][0], center_crop_arr(Image.fromarray(crop), 64))

    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(folder / "000004.png")
    proc = _run("celeba64_npz", "--source", folder, "--out", other, ok=False)
    assert "000004.png" in proc.stderr and "does not fit" in proc.stderr


@pytest.mark.parametrize(
    "script,size",
    [("ffhq128_npz", 128), ("ffhq256_npz", 256), ("celebahq256_npz", 256)],
)
def test_square_datasets(tmp_path, script, size):
    folder = tmp_path / "images1024x1024"
    shapes = {"01000/01001.png": (2 * size, 2 * size), "00000/00002.png": (2 * size, 2 * size)}
    shapes["00000/00001.png"] = (size, size)  # already at size: unchanged
    images = _image_folder(folder, shapes, seed=size)
    source = _tar(folder, tmp_path / "ffhq.tar.gz") if script == "celebahq256_npz" else folder
    out = tmp_path / f"{script}.npz"
    _run(script, "--source", source, "--out", out)
    with np.load(out) as npz:
        x = npz["arr_0"]
    assert x.dtype == np.uint8 and x.shape == (3, size, size, 3)
    names = sorted(images)
    np.testing.assert_array_equal(x[0], images[names[0]])
    for i, name in enumerate(names):
        np.testing.assert_array_equal(x[i], center_crop_arr(Image.fromarray(images[name]), size))
    big = images[names[2]].reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    assert np.abs(x[2] - big).max() <= 1  # area (2x2 BOX) downsampling

    _run(script, "--source", source, "--out", out, "--max_images", 2)
    with np.load(out) as npz:
        np.testing.assert_array_equal(npz["arr_0"], x[:2])


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run("ffhq128_npz", "--source", tmp_path / "empty", ok=False)
    assert "no images" in proc.stderr
    proc = _run("ffhq128_npz", "--source", tmp_path / "missing", ok=False)
    assert "source not found" in proc.stderr
    _image_folder(tmp_path / "f", {"a.png": (16, 16)}, seed=7)
    (tmp_path / "f" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    proc = _run("ffhq128_npz", "--source", tmp_path / "f", "--out", tmp_path / "o.npz", ok=False)
    assert "cannot read image b.png" in proc.stderr
    assert not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------------- output paths


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_out_dir_that_is_a_file_is_one_line(tmp_path, fmnist_source, cifar_archive):
    src, _ = fmnist_source
    archive, _ = cifar_archive
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for script, args in (
        ("fashion_mnist", ["--source", src]),
        ("cifar10", ["--archive", archive]),
        ("imagenet32_npz", ["--source", tmp_path]),
    ):
        for out_dir in (afile, afile / "sub"):
            proc = _run(script, *args, "--out_dir", out_dir, ok=False)
            assert "--out_dir" in _last_line(proc) and "is a file" in _last_line(proc), script
    proc = _run("fashion_mnist", "--source", src, "--out_dir", afile, ok=False, subprocess_=True)
    assert _last_line(proc) == (
        f"fashion_mnist.py: error: --out_dir {afile} is a file, not a folder; pass a folder "
        "path (it is created)"
    )
    assert afile.read_text() == "keep me"


def test_out_file_that_is_a_folder_or_under_a_file(tmp_path):
    _image_folder(tmp_path / "f", {"a.png": (16, 16)}, seed=7)
    (tmp_path / "outdir").mkdir()
    proc = _run("ffhq128_npz", "--source", tmp_path / "f", "--out", tmp_path / "outdir", ok=False)
    assert f"--out {tmp_path / 'outdir'} is a folder" in _last_line(proc)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "x.npz"
    proc = _run("ffhq128_npz", "--source", tmp_path / "f", "--out", out, ok=False)
    assert f"--out {out}: folder" in _last_line(proc) and "file" in _last_line(proc)


def test_outputs_are_atomic_with_umask_permissions(tmp_path, fmnist_source):
    src, _ = fmnist_source
    old = os.umask(0o027)
    try:
        _run("fashion_mnist", "--source", src, "--out_dir", tmp_path / "o" / "new", "--no_png")
    finally:
        os.umask(old)
    out = tmp_path / "o" / "new"
    assert sorted(p.name for p in out.iterdir()) == ["fmnist_test.npz", "fmnist_train.npz"]
    assert stat.S_IMODE((out / "fmnist_test.npz").stat().st_mode) == 0o640
