"""otmdr.data: readers on small files written here in the official formats, the image-folder
cache, splits, augmentation and the batch loader; plus the real datasets when present."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from otmdr import data as D
from otmdr.data import imagefolder as imagefolder_module

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# The real datasets: $OTMDR_SHARED_DATASETS, else ../shared/datasets beside the repository.
SHARED = Path(os.environ.get("OTMDR_SHARED_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A per-test cache dir, also set as $OTMDR_CACHE_DIR so nothing ever lands in ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("OTMDR_CACHE_DIR", str(path))
    return path


# ----------------------------------------------------------------------------- writers

def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(root: Path, n_train: int = 12, n_test: int = 7, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            raw = idx_bytes(arr)
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
        out[prefix] = (images, labels)
    return out


def write_cifar10(folder: Path, per_batch: int = 4, seed: int = 0, str_keys: bool = False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({k("batch_label"): k(name), k("labels"): labels, k("data"): data}, f, protocol=2)
        batches[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({k("label_names"): [k(c) for c in names], k("num_vis"): 3072}, f, protocol=2)
    return batches, names


def write_cifar100(folder: Path, n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [int(v) for v in rng.integers(0, 20, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, f, protocol=2)
        out[name] = (data, fine, coarse)
    fine_names = [f"fine{i:02d}".encode() for i in range(100)]
    coarse_names = [f"coarse{i:02d}".encode() for i in range(20)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": fine_names, b"coarse_label_names": coarse_names}, f, protocol=2)
    return out


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=(3, 2), size=(6, 5), mode="RGB",
                       seed: int = 0):
    """PNG images (lossless) under root/{train,test}/<class>/; returns the expected arrays."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in zip(("train", "test"), per_class):
        imgs, labels = [], []
        for label, cls in enumerate(sorted(classes)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(root / split / cls / f"{i:03d}.png")
                imgs.append(arr if arr.ndim == 3 else arr[:, :, None])
                labels.append(label)
        expected[split] = (np.stack(imgs).transpose(0, 3, 1, 2), np.array(labels))
    return expected


def make_tar(src: Path, dest: Path, top: str | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=top or ".")
    return dest


# ----------------------------------------------------------------------------- registry

def test_registry_names_and_unknown():
    names = {s.name for s in D.list_datasets()}
    assert names == {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "cifar100-coarse", "cifar10-jpeg",
                     "imagefolder"}
    assert [s.needs_root for s in D.list_datasets() if s.name == "digits"] == [False]
    for spec in D.list_datasets():
        assert spec.layout and spec.how_to_get
        if spec.in_channels:
            assert len(spec.mean) == len(spec.std) == spec.in_channels
    assert D.get_spec("cifar10").mean == (0.4914, 0.4822, 0.4465)
    with pytest.raises(D.DatasetError, match="known datasets: cifar10, cifar10-jpeg"):
        D.get_spec("imagenet")


def test_root_required_and_missing(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.load_split("fashion-mnist", "train")
    msg = str(e.value)
    assert msg.startswith("dataset 'fashion-mnist' needs a data directory: pass --data-dir DIR (expected layout: ")
    assert "t10k-images-idx3-ubyte" in msg and "how to get it:" in msg
    with pytest.raises(D.DatasetError, match="does not exist") as e:
        D.load_split("cifar10", "train", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    with pytest.raises(D.DatasetError, match="unknown split"):
        D.load_split("digits", "validation")


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    written = write_idx_set(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        d = D.load_split("mnist", split, tmp_path)
        images, labels = written[prefix]
        assert d.images.dtype == torch.uint8 and d.images.shape == (len(images), 1, 28, 28)
        assert d.labels.dtype == torch.int64
        assert np.array_equal(d.images[:, 0].numpy(), images)
        assert np.array_equal(d.labels.numpy(), labels)
    assert D.load_split("fashion-mnist", "test", tmp_path).classes[0] == "T-shirt/top"
    assert D.load_split("mnist", "test", tmp_path).classes == [str(i) for i in range(10)]


def test_idx_errors(tmp_path):
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    good = path.read_bytes()

    def check(raw: bytes, match: str, file: Path = path):
        file.write_bytes(raw)
        with pytest.raises(D.DatasetError, match=match) as e:
            D.load_split("mnist", "test", tmp_path)
        assert str(file) in str(e.value) and "Re-obtain" in str(e.value)

    check(good[:-10], "corrupt or truncated: header declares 7x28x28 = 5488 bytes of data but 5478 follow")
    check(b"\x00\x00\x08", "shorter than an IDX header")
    check(b"\x12\x34" + good[2:], "bad IDX magic number 0x12340803")
    check(good[:2] + b"\x0d" + good[3:], "dtype code 0x0d, expected 0x08")
    check(gzip.compress(good)[:-20], "gzip data does not decompress")
    path.write_bytes(good)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(D.DatasetError, match="holds 7 images but .* holds 5 labels"):
        D.load_split("mnist", "test", tmp_path)
    labels.unlink()
    with pytest.raises(D.DatasetError, match="missing file .*t10k-labels-idx1-ubyte\\[.gz\\]. Expected layout"):
        D.load_split("mnist", "test", tmp_path)


# ----------------------------------------------------------------------------- CIFAR pickles

@pytest.mark.parametrize("where", ["parent", "folder", "archive", "str-keys"])
def test_cifar10_round_trip(tmp_path, where):
    folder = tmp_path / "cifar-10-batches-py"
    batches, names = write_cifar10(folder, str_keys=where == "str-keys")
    root = {"parent": tmp_path, "folder": folder, "str-keys": tmp_path}.get(where)
    if where == "archive":
        root = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(root, "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    train = D.load_split("cifar10", "train", root)
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images.numpy().reshape(20, 3072), data)
    assert np.array_equal(train.images[0, 1].numpy(), data[0, 1024:2048].reshape(32, 32))  # channel-major rows
    assert train.labels.tolist() == labels and train.labels.dtype == torch.int64
    assert train.classes == names
    test = D.load_split("cifar10", "test", root)
    assert np.array_equal(test.images.numpy().reshape(4, 3072), batches["test_batch"][0])


def test_cifar100_fine_and_coarse(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python")
    for split in ("train", "test"):
        data, fine, coarse = written[split]
        f = D.load_split("cifar100", split, tmp_path)
        c = D.load_split("cifar100-coarse", split, tmp_path)
        assert np.array_equal(f.images.numpy().reshape(-1, 3072), data)
        assert torch.equal(f.images, c.images)
        assert f.labels.tolist() == fine and c.labels.tolist() == coarse
        assert f.classes[7] == "fine07" and len(f.classes) == 100
        assert c.classes[19] == "coarse19" and len(c.classes) == 20
    assert D.get_spec("cifar100").num_classes == 100 and D.get_spec("cifar100-coarse").num_classes == 20


def test_cifar_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    batch = folder / "data_batch_3"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(D.DatasetError, match="corrupt or truncated: not a readable python pickle") as e:
        D.load_split("cifar10", "train", tmp_path)
    assert str(batch) in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    batch.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(D.DatasetError, match="refusing to load"):
        D.load_split("cifar10", "train", tmp_path)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(D.DatasetError, match="expected uint8 \\(N, 3072\\)"):
        D.load_split("cifar10", "train", tmp_path)
    batch.unlink()
    with pytest.raises(D.DatasetError, match="missing file data_batch_3 in .*cifar-10-batches-py. Expected layout"):
        D.load_split("cifar10", "train", tmp_path)
    D.load_split("cifar10", "test", tmp_path)  # the test split does not need it


# ----------------------------------------------------------------------------- image folders and the cache

def check_folder(d: D.ImageData, expected, split: str, classes=("cat", "dog", "emu")):
    images, labels = expected[split]
    assert d.images.dtype == torch.uint8 and d.labels.dtype == torch.int64
    assert d.images.shape == images.shape
    assert np.array_equal(d.images.numpy(), images)
    assert np.array_equal(d.labels.numpy(), labels)
    assert d.classes == sorted(classes)


def test_image_folder_directory_and_archive(tmp_path, cache):
    src = tmp_path / "folder"
    expected = write_image_folder(src)
    for split in ("train", "test"):
        check_folder(D.load_split("imagefolder", split, src), expected, split)
    archive = make_tar(src, tmp_path / "folder.tar.gz", top="myimages")  # under one top-level folder
    for split in ("train", "test"):
        check_folder(D.load_split("imagefolder", split, archive), expected, split)
    flat = make_tar(src, tmp_path / "flat.tar.gz")  # entries ./train/...
    check_folder(D.load_split("imagefolder", "train", flat), expected, "train")
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 5 and all(n.endswith(".npz") for n in cached)  # atomic: no temp files left
    with pytest.raises(D.DatasetError, match="the images are 6x5; the models expect square images"):
        D.resolve_spec(D.get_spec("imagefolder"), D.load_split("imagefolder", "train", src))
    assert D.get_spec("imagefolder").num_classes == 0


def test_image_folder_grayscale_square_and_resolve_spec(tmp_path, cache):
    src = tmp_path / "gray"
    expected = write_image_folder(src, classes=("a", "b"), size=(4, 4), mode="L")
    d = D.load_split("imagefolder", "test", src)
    check_folder(d, expected, "test", classes=("a", "b"))
    spec = D.resolve_spec(D.get_spec("imagefolder"), d)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (2, 1, 4)
    x = D.to_float(d.images, spec, "cpu")
    assert torch.allclose(x, (d.images.float() / 255 - 0.5) / 0.5)
    assert D.resolve_spec(D.get_spec("cifar10"), d) is D.get_spec("cifar10")


def test_cache_reused_and_rebuilt(tmp_path, monkeypatch):
    src = tmp_path / "folder"
    expected = write_image_folder(src)
    cache_dir = tmp_path / "explicit-cache"  # the argument wins over $OTMDR_CACHE_DIR
    monkeypatch.setenv("OTMDR_CACHE_DIR", str(tmp_path / "env-cache"))
    real_decode = imagefolder_module._decode_image
    calls = []

    def counting(data, mode):
        calls.append(1)
        return real_decode(data, mode)

    monkeypatch.setattr(imagefolder_module, "_decode_image", counting)
    check_folder(D.load_split("imagefolder", "train", src, cache_dir=cache_dir), expected, "train")
    assert len(calls) == 9 and len(list(cache_dir.glob("*.npz"))) == 1
    assert not (tmp_path / "env-cache").exists()

    def fail(data, mode):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(imagefolder_module, "_decode_image", fail)
    check_folder(D.load_split("imagefolder", "train", src, cache_dir=cache_dir), expected, "train")

    # the source changes: one image is replaced -> the cache is stale and rebuilt
    new = np.full((5, 6, 3), 7, np.uint8)
    Image.fromarray(new).save(src / "train" / "dog" / "001.png")
    os.utime(src / "train" / "dog" / "001.png", ns=(1, 1_000_000_000))
    monkeypatch.setattr(imagefolder_module, "_decode_image", counting)
    calls.clear()
    d = D.load_split("imagefolder", "train", src, cache_dir=cache_dir)
    assert len(calls) == 9 and np.array_equal(d.images[4].numpy(), new.transpose(2, 0, 1))
    assert len(list(cache_dir.glob("*.npz"))) == 1

    # a damaged cache file is rebuilt, not an error
    (cache_file,) = cache_dir.glob("*.npz")
    cache_file.write_bytes(b"garbage")
    calls.clear()
    assert torch.equal(D.load_split("imagefolder", "train", src, cache_dir=cache_dir).images, d.images)
    assert len(calls) == 9

    # $OTMDR_CACHE_DIR when no argument is given
    D.load_split("imagefolder", "test", src)
    assert len(list((tmp_path / "env-cache").glob("imagefolder-test-*.npz"))) == 1


def test_archive_cache_rebuilt_when_archive_changes(tmp_path, cache, monkeypatch):
    src = tmp_path / "folder"
    write_image_folder(src)
    archive = make_tar(src, tmp_path / "a.tar.gz")
    first = D.load_split("imagefolder", "test", archive)
    monkeypatch.setattr(imagefolder_module, "_decode_image", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert torch.equal(D.load_split("imagefolder", "test", archive).images, first.images)
    monkeypatch.undo()
    monkeypatch.setenv("OTMDR_CACHE_DIR", str(cache))
    expected = write_image_folder(src, seed=5)  # new pixels, same names
    make_tar(src, archive)
    check_folder(D.load_split("imagefolder", "test", archive), expected, "test")


def test_limit_per_class(tmp_path, cache):
    src = tmp_path / "folder"
    expected = write_image_folder(src, per_class=(4, 2))
    d = D.load_split("imagefolder", "train", src, limit_per_class=2)
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    images, _ = expected["train"]
    assert np.array_equal(d.images.numpy(), images[[0, 1, 4, 5, 8, 9]])
    assert len(D.load_split("imagefolder", "train", src).labels) == 12  # a separate cache entry
    assert D.load_split("digits", "test", limit_per_class=3).labels.bincount().tolist() == [3] * 10


def test_image_folder_errors(tmp_path, cache):
    src = tmp_path / "folder"
    write_image_folder(src)
    odd = src / "train" / "dog" / "001.png"
    Image.fromarray(np.zeros((7, 6, 3), np.uint8)).save(odd)
    with pytest.raises(D.DatasetError, match="images must all share one size") as e:
        D.load_split("imagefolder", "train", src)
    assert str(odd) in str(e.value)
    odd.write_bytes(b"not a png")
    with pytest.raises(D.DatasetError, match="not a readable image") as e:
        D.load_split("imagefolder", "train", src)
    assert str(odd) in str(e.value)
    odd.unlink()
    with pytest.raises(D.DatasetError, match="has class folders cat, dog, emu, expected the CIFAR-10 classes"):
        D.load_split("cifar10-jpeg", "train", src)
    (src / "test" / "emu").rename(src / "test" / "owl")
    with pytest.raises(D.DatasetError, match=r"differ \(only in train/: emu; only in test/: owl\)"):
        D.load_split("imagefolder", "train", src)
    with pytest.raises(D.DatasetError, match="no 'test/' folder"):
        D.load_split("imagefolder", "test", src / "train")
    with pytest.raises(D.DatasetError, match="neither a directory nor a .tar"):
        D.load_split("imagefolder", "test", src / "train" / "cat" / "000.png")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"x" * 2000)[:50])
    with pytest.raises(D.DatasetError, match="corrupt or truncated: unreadable archive") as e:
        D.load_split("imagefolder", "train", bad)
    assert str(bad) in str(e.value)


# ----------------------------------------------------------------------------- digits

def test_digits_without_root():
    train, test = D.load_split("digits", "train"), D.load_split("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert test.labels.bincount().tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]  # stratified
    assert torch.equal(D.load_split("digits", "test").images, test.images)  # stable
    from sklearn.datasets import load_digits

    full = np.rint(load_digits().images * 255 / 16).astype(np.uint8).reshape(1797, 64)
    both = torch.cat([train.images, test.images]).reshape(1797, 64).numpy()
    assert np.array_equal(np.unique(both, axis=0), np.unique(full, axis=0))  # same images, counted below
    assert np.array_equal(np.unique(both, axis=0, return_counts=True)[1],
                          np.unique(full, axis=0, return_counts=True)[1])
    x = train.images.float() / 255
    spec = D.get_spec("digits")
    assert abs(x.mean().item() - spec.mean[0]) < 1e-3 and abs(x.std().item() - spec.std[0]) < 1e-3


# ----------------------------------------------------------------------------- splits

def test_train_val_split():
    tr, va = D.train_val_split(1000, 0.1, seed=3)
    assert len(va) == 100 and len(tr) == 900 and tr.dtype == va.dtype == torch.int64
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))  # disjoint and covering
    tr2, va2 = D.train_val_split(1000, 0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, D.train_val_split(1000, 0.1, seed=4)[1])
    assert len(D.train_val_split(10, 0.0, 0)[1]) == 0
    assert len(D.train_val_split(5, 0.01, 0)[1]) == 1
    with pytest.raises(ValueError):
        D.train_val_split(10, 1.0, 0)
    data = D.ImageData(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10), ["c"] * 10)
    s = D.subset(data, torch.tensor([7, 2]))
    assert s.images.flatten().tolist() == [7, 2] and s.labels.tolist() == [7, 2] and s.classes == data.classes


# ----------------------------------------------------------------------------- to_float and Augment

def test_to_float():
    spec = D.get_spec("cifar10")
    u = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = D.to_float(u, spec, "cpu")
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, (u.float() / 255 - mean) / std)


def batch(n=64, c=3, h=9, w=7, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 0.5  # no zeros


def shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img moved down by dy and right by dx, zero-filled."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[..., max(-dy, 0):h - max(dy, 0),
                                                                         max(-dx, 0):w - max(dx, 0)]
    return out


def test_augment_shape_dtype_determinism():
    x = batch()
    aug = D.Augment(crop_padding=2, flip=True, cutout=3)
    y1 = aug(x, torch.Generator().manual_seed(1))
    y2 = aug(x, torch.Generator().manual_seed(1))
    y3 = aug(x, torch.Generator().manual_seed(2))
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert torch.equal(D.Augment()(x, torch.Generator()), x)
    x64 = x.double()
    assert aug(x64, torch.Generator().manual_seed(1)).dtype == torch.float64


def test_augment_flip_is_a_flip():
    x = batch()
    y = D.Augment(flip=True)(x, torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54


@pytest.mark.parametrize("p", [1, 3])
def test_augment_crop_shifts_by_at_most_p(p):
    x = batch(n=128)
    y = D.Augment(crop_padding=p)(x, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                   if torch.equal(y[i], shift(x[i], dy, dx))]
        assert len(matches) == 1, f"sample {i} is not a shift of its input by at most {p}"
        seen.add(matches[0])
    assert len(seen) > (2 * p + 1) ** 2 // 2  # offsets vary per sample


def test_augment_cutout():
    x = batch(n=32, h=8, w=8)
    s = 4
    y = D.Augment(cutout=s)(x, torch.Generator().manual_seed(0))
    zero = (y == 0).all(1)  # (n, h, w)
    assert torch.equal(y[~zero.unsqueeze(1).expand_as(y)], x[~zero.unsqueeze(1).expand_as(x)])
    for i in range(len(x)):
        rows, cols = zero[i].any(1).nonzero().flatten(), zero[i].any(0).nonzero().flatten()
        assert 1 <= len(rows) <= s and 1 <= len(cols) <= s
        assert int(zero[i].sum()) == len(rows) * len(cols)  # a (clipped) square/rectangle
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()


# ----------------------------------------------------------------------------- BatchLoader

def small_data(n=23):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return D.ImageData(images, torch.arange(n), [str(i) for i in range(n)])


def test_batch_loader_covers_each_sample_once():
    data = small_data()
    spec = D.get_spec("mnist")
    loader = D.BatchLoader(data, spec, 5, shuffle=True, seed=1)
    assert len(loader) == 5
    orders = []
    for _ in range(2):
        ys = [y for _, y in loader]
        assert [len(y) for y in ys] == [5, 5, 5, 5, 3]
        order = torch.cat(ys)
        assert sorted(order.tolist()) == list(range(23))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    x, y = next(iter(D.BatchLoader(data, spec, 4, shuffle=False)))
    assert y.tolist() == [0, 1, 2, 3] and x.dtype == torch.float32
    assert torch.allclose(x, D.to_float(data.images[:4], spec, "cpu"))
    dl = D.BatchLoader(data, spec, 5, shuffle=True, drop_last=True)
    assert len(dl) == 4 and sum(len(y) for _, y in dl) == 20


def test_batch_loader_resume():
    data = small_data()
    spec = D.get_spec("mnist")
    aug = D.Augment(crop_padding=1, flip=True)

    def make():
        return D.BatchLoader(data, spec, 4, shuffle=True, augment=aug, seed=7)

    reference = make()
    epochs = [[(x.clone(), y.clone()) for x, y in reference] for _ in range(3)]

    def same(a, b):
        return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)) and len(a) == len(b)

    # interrupted in epoch 1 after 2 batches, resumed from the state dict in a fresh loader
    run = make()
    assert same(list(run), epochs[0])
    it = iter(run)
    got = [next(it), next(it)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert same(got + rest, epochs[1])
    assert same(list(resumed), epochs[2])

    # saved at an epoch boundary
    run = make()
    list(run)
    fresh = D.BatchLoader(data, spec, 4, shuffle=True, augment=aug, seed=123)  # the state's seed wins
    fresh.load_state_dict(run.state_dict())
    assert same(list(fresh), epochs[1])

    # an abandoned epoch is not resumed by a new iteration
    run = make()
    for _ in zip(range(2), run):
        pass
    assert same(list(run), epochs[1])


# ----------------------------------------------------------------------------- real data (skipped when absent)

def test_real_fashion_mnist_test_split():
    root = SHARED / "fashion-mnist"
    if not (root / "t10k-images-idx3-ubyte.gz").exists() and not (root / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"Fashion-MNIST not found at {root} (set OTMDR_SHARED_DATASETS)")
    d = D.load_split("fashion-mnist", "test", root)
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert len(d.classes) == 10
    assert d.labels.bincount().tolist() == [1000] * 10


def test_real_cifar10_jpeg_slice(cache):
    archive = SHARED / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {archive} (set OTMDR_SHARED_DATASETS)")
    d = D.load_split("cifar10-jpeg", "test", archive, limit_per_class=3)
    assert d.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert d.images.shape == (30, 3, 32, 32) and d.images.dtype == torch.uint8
    assert d.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert 0.2 < d.images.float().mean().item() / 255 < 0.7
