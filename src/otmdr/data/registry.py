"""The dataset registry: specs by name and :func:`load_split`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._types import DatasetError, DatasetSpec, ImageData

__all__ = ["list_datasets", "get_spec", "load_split", "resolve_spec", "SPLITS", "register_dataset",
           "dataset_from_factory", "registered_loader"]

SPLITS = ("train", "test")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]

_IDX_LAYOUT = ("DIR/train-images-idx3-ubyte[.gz], DIR/train-labels-idx1-ubyte[.gz], "
               "DIR/t10k-images-idx3-ubyte[.gz], DIR/t10k-labels-idx1-ubyte[.gz] (IDX format, gzip or plain)")
_FOLDER_LAYOUT = ("DIR/train/<class>/*.{jpg,jpeg,png} and DIR/test/<class>/*.{jpg,jpeg,png}, the same class "
                  "folders in both; DIR may also be a .tar.gz/.tar archive of that layout, optionally under one "
                  "top-level folder")

_SPECS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
    _SPECS[spec.name] = spec


_register(DatasetSpec(
    name="digits", num_classes=10, in_channels=1, image_size=8,
    # Computed once from the 1,437 training images scaled to [0, 1] (0.3053 / 0.3759 over all 1,797).
    mean=(0.3054,), std=(0.3760,),
    layout="nothing: the 1,797 8x8 images ship with scikit-learn (fixed stratified 80/20 train/test split, seed 0)",
    how_to_get="pip install scikit-learn (part of otmdr[train])",
    needs_root=False,
))
_register(DatasetSpec(
    name="mnist", num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,),
    layout=_IDX_LAYOUT,
    how_to_get="the four MNIST files from http://yann.lecun.com/exdb/mnist/ or any mirror "
               "(a torchvision MNIST/raw folder works too)",
    needs_root=True,
))
_register(DatasetSpec(
    name="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=(0.2860,), std=(0.3530,),
    layout=_IDX_LAYOUT,
    how_to_get="the four files from https://github.com/zalandoresearch/fashion-mnist (data/fashion/), or on "
               "Debian the package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)",
    needs_root=True,
))
_register(DatasetSpec(
    name="cifar10", num_classes=10, in_channels=3, image_size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    layout="DIR/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta} (python pickles); "
           "DIR may also be the cifar-10-batches-py folder itself or the cifar-10-python.tar.gz archive",
    how_to_get="'CIFAR-10 python version' (cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html",
    needs_root=True,
))
_CIFAR100_COMMON: dict[str, Any] = dict(
    in_channels=3, image_size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    layout="DIR/cifar-100-python/{train, test, meta} (python pickles); DIR may also be the cifar-100-python "
           "folder itself or the cifar-100-python.tar.gz archive",
    how_to_get="'CIFAR-100 python version' (cifar-100-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html",
    needs_root=True,
)
_register(DatasetSpec(name="cifar100", num_classes=100, **_CIFAR100_COMMON))  # fine labels
_register(DatasetSpec(name="cifar100-coarse", num_classes=20, **_CIFAR100_COMMON))  # the 20 superclasses
_register(DatasetSpec(
    name="cifar10-jpeg", num_classes=10, in_channels=3, image_size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    layout="DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg for the 10 CIFAR-10 classes (airplane .. truck), "
           "32x32 RGB; DIR may also be a .tar.gz archive of that layout (e.g. cifar10-jpeg.tar.gz), optionally "
           "under one top-level folder",
    how_to_get="a CIFAR-10 image-folder export such as cifar10-jpeg.tar.gz (60,000 JPEGs, CIFAR-10's own split); "
               "or use the original pickles with data.name=cifar10",
    needs_root=True,
))
_register(DatasetSpec(
    # Shape fields are 0 until the data is seen: call resolve_spec(spec, data) after loading.
    name="imagefolder", num_classes=0, in_channels=0, image_size=0, mean=(0.5,), std=(0.5,),
    layout=_FOLDER_LAYOUT + "; all images of one size (channels follow the first image: grayscale or RGB)",
    how_to_get="your own images, one folder per class under train/ and test/",
    needs_root=True,
))


#: datasets that plugin modules registered with :func:`register_dataset`: name -> loader
_LOADERS: dict[str, Callable[..., Any]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a loader under ``name`` (then ``data.name: <name>``), in a plugin module that
    ``otmdr --import MODULE`` imports. The loader is a data factory (docs/your-model.md): called
    with ``data.options`` as keywords, it returns the splits :func:`dataset_from_factory` reads."""
    key = name.strip().lower().replace("_", "-")

    def decorator(loader: Callable[..., Any]) -> Callable[..., Any]:
        if key in _SPECS:
            raise ValueError(f"dataset {name!r} is registered twice")
        if not callable(loader):
            raise TypeError(f"register_dataset({name!r}) decorates a function, got {type(loader).__name__}")
        doc = (loader.__doc__ or "").strip().splitlines()
        _register(DatasetSpec(name=key, num_classes=0, in_channels=0, image_size=0, mean=(0.5,), std=(0.5,),
                              layout=doc[0].strip() if doc else f"whatever {loader.__module__}.{loader.__name__} "
                              "reads (a registered loader)", how_to_get=f"otmdr --import {loader.__module__}",
                              needs_root=False))
        _LOADERS[key] = loader
        return loader

    return decorator


def registered_loader(name: str) -> Callable[..., Any] | None:
    """The loader a plugin registered under ``name`` (None for the built-in datasets)."""
    return _LOADERS.get(name.strip().lower().replace("_", "-"))


_FACTORY_KEYS = ("train", "test", "val", "classes", "mean", "std")


def dataset_from_factory(result: Any, name: str) -> tuple[DatasetSpec, ImageData, ImageData | None, ImageData]:
    """``(spec, train, val or None, test)`` from what a data factory returned; every problem is a
    one-line :class:`DatasetError` naming ``name`` (the factory's path) and what was expected.

    ``result`` is a mapping with ``"train"`` and ``"test"`` (and optionally ``"val"``): each an
    :class:`ImageData` or an ``(images, labels)`` pair of torch tensors or numpy arrays. Images:
    ``(N, C, H, W)`` or ``(N, H, W)`` (one channel), square, uint8 0-255 or floats in [0, 1]
    (stored as uint8: rounded to 1/255). Labels: ``(N,)`` integers in ``0 .. classes - 1``.
    Optional ``"classes"``: the class names (default: ``"0"``, ``"1"``, ... up to the largest
    label); ``"mean"``/``"std"``: per-channel pixel statistics on [0, 1] for normalisation
    (default: those of the training images).
    """
    what = f"data.factory {name}"
    if not isinstance(result, dict):
        raise DatasetError(f"{what} returned {type(result).__name__}, expected a dict with 'train' and 'test' "
                           "(optionally 'val', 'classes', 'mean', 'std'): each split an (images, labels) pair")
    unknown = [str(k) for k in result if k not in _FACTORY_KEYS]
    if unknown:
        raise DatasetError(f"{what} returned unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                           f"{', '.join(_FACTORY_KEYS)}")
    for needed in ("train", "test"):
        if result.get(needed) is None:
            raise DatasetError(f"{what} returned no {needed!r} split: return {{'train': (images, labels), "
                               "'test': (images, labels)}")
    splits = {key: _factory_split(result[key], f"{what}: {key!r}") for key in ("train", "val", "test")
              if result.get(key) is not None}
    shapes = {key: tuple(split[0].shape[1:]) for key, split in splits.items()}
    if len(set(shapes.values())) > 1:
        raise DatasetError(f"{what}: the splits' images differ in shape (C, H, W): "
                           f"{', '.join(f'{k} {v}' for k, v in shapes.items())}; they must match")
    channels, height, width = shapes["train"]
    if height != width:
        raise DatasetError(f"{what}: the images are {width}x{height} (width x height); otmdr's models and "
                           "augmentations take square images: pad or resize them")
    top = max(int(labels.max()) for _, labels in splits.values())
    classes = result.get("classes")
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
    elif not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{what}: 'classes' must be a list of class names (strings), got {classes!r}")
    classes = list(classes)
    if len(classes) < 2:
        raise DatasetError(f"{what}: {len(classes)} class(es); a classifier needs at least 2")
    for key, (_, labels) in splits.items():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= len(classes):
            raise DatasetError(f"{what}: {key!r} labels range over {low}..{high}, outside 0..{len(classes) - 1} "
                               f"({len(classes)} classes): labels are class indices")
    train_images = splits["train"][0]
    stats = {}
    for key in ("mean", "std"):
        value = result.get(key)
        if value is None:
            pixels = train_images.float().div(255).transpose(0, 1).reshape(channels, -1)
            value = pixels.mean(1) if key == "mean" else pixels.std(1).clamp_min(1e-3)
            value = [round(float(v), 4) for v in value]
        values = [value] if isinstance(value, (int, float)) else value
        if (not isinstance(values, (list, tuple)) or len(values) not in (1, channels)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            raise DatasetError(f"{what}: {key!r} must be 1 or {channels} number(s) (per channel, on [0, 1] pixels"
                               f"{', each > 0' if key == 'std' else ''}), got {value!r}")
        stats[key] = tuple(float(v) for v in values)
    spec = DatasetSpec(name=name, num_classes=len(classes), in_channels=int(channels), image_size=int(height),
                       mean=stats["mean"], std=stats["std"], layout=f"returned by {what}",
                       how_to_get="your own data factory (docs/your-model.md)", needs_root=False)
    data = {key: ImageData(images, labels, list(classes)) for key, (images, labels) in splits.items()}
    return spec, data["train"], data.get("val"), data["test"]


def _factory_split(split: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as uint8 images (N, C, H, W) and int64 labels (N,)."""
    if isinstance(split, ImageData):
        return split.images, split.labels
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise DatasetError(f"{what} is a {type(split).__name__}, expected an (images, labels) pair or an ImageData")
    images, labels = (_as_tensor(v, f"{what} {part}") for v, part in zip(split, ("images", "labels")))
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, H, W): one channel
    if images.dim() != 4:
        raise DatasetError(f"{what} images have shape {tuple(images.shape)}, expected (N, C, H, W) or (N, H, W)")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        raise DatasetError(f"{what} images have shape {tuple(images.shape)}, which looks channels-last "
                           "(N, H, W, C): permute them to (N, C, H, W), e.g. images.permute(0, 3, 1, 2)")
    if len(images) == 0:
        raise DatasetError(f"{what} holds no images")
    if images.dtype == torch.bool or images.is_complex():
        raise DatasetError(f"{what} images are {images.dtype}, expected uint8 (0-255) or floats in [0, 1]")
    if images.is_floating_point():
        low, high = float(images.min()), float(images.max())
        if not (low >= 0.0 and high <= 1.0):  # also refuses NaN
            raise DatasetError(f"{what} images are {images.dtype} with values in [{low:g}, {high:g}], expected "
                               "[0, 1]: scale them to [0, 1] (otmdr normalises them with data's mean and std) or "
                               "give uint8 0-255")
        images = images.mul(255).round_().to(torch.uint8)
    elif images.dtype != torch.uint8:
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > 255:
            raise DatasetError(f"{what} images are {images.dtype} with values in [{low}, {high}], expected "
                               "uint8 0-255 or floats in [0, 1]")
        images = images.to(torch.uint8)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise DatasetError(f"{what} labels are {labels.dtype}, expected integers (class indices 0, 1, ...)")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{what} labels have shape {tuple(labels.shape)}, expected ({images.shape[0]},): one "
                           "class index per image")
    return images.contiguous(), labels.to(torch.int64)


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "__array__"):  # numpy and friends
        import numpy as np

        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as error:
            raise DatasetError(f"{what}: {error}; expected numbers") from None
    raise DatasetError(f"{what} is a {type(value).__name__}, expected a torch tensor or a numpy array")


def list_datasets() -> list[DatasetSpec]:
    return [_SPECS[name] for name in sorted(_SPECS)]


def get_spec(name: str) -> DatasetSpec:
    key = name.strip().lower().replace("_", "-")
    if key not in _SPECS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_SPECS))}")
    return _SPECS[key]


def resolve_spec(spec: DatasetSpec, data: ImageData) -> DatasetSpec:
    """``spec`` with ``num_classes``, ``in_channels`` and ``image_size`` taken from loaded data
    (needed for ``imagefolder``; for the fixed datasets it returns ``spec`` unchanged)."""
    _, c, h, w = data.images.shape
    if spec.num_classes and spec.in_channels and spec.image_size:
        return spec
    if h != w:
        raise DatasetError(
            f"dataset '{spec.name}': the images are {w}x{h}; the models expect square images (resize them)"
        )
    return dataclasses.replace(spec, num_classes=len(data.classes), in_channels=int(c), image_size=int(h))


def _first_per_class(data: ImageData, limit: int) -> ImageData:
    keep = torch.zeros(len(data.labels), dtype=torch.bool)
    for label in range(len(data.classes)):
        keep[(data.labels == label).nonzero().flatten()[:limit]] = True
    idx = keep.nonzero().flatten()
    return ImageData(data.images[idx].clone(), data.labels[idx].clone(), list(data.classes))


def _readers() -> dict[str, Callable[..., ImageData]]:
    from .cifar import CIFAR10, CIFAR100, load_cifar_split
    from .digits import load_digits_split
    from .idx import load_idx_split
    from .imagefolder import load_image_folder

    return {
        "digits": lambda spec, split, root, **kw: load_digits_split(split),
        "mnist": lambda spec, split, root, **kw: load_idx_split(spec, split, root, "MNIST", MNIST_CLASSES),
        "fashion-mnist": lambda spec, split, root, **kw: load_idx_split(spec, split, root, "FashionMNIST",
                                                                        FASHION_CLASSES),
        "cifar10": lambda spec, split, root, **kw: load_cifar_split(spec, split, root, CIFAR10, "labels",
                                                                    "label_names"),
        "cifar100": lambda spec, split, root, **kw: load_cifar_split(spec, split, root, CIFAR100, "fine_labels",
                                                                     "fine_label_names"),
        "cifar100-coarse": lambda spec, split, root, **kw: load_cifar_split(
            spec, split, root, CIFAR100, "coarse_labels", "coarse_label_names"),
        "cifar10-jpeg": lambda spec, split, root, **kw: _load_cifar10_jpeg(spec, split, root, **kw),
        "imagefolder": lambda spec, split, root, **kw: load_image_folder(spec, split, root, **kw),
    }


def _load_cifar10_jpeg(spec: DatasetSpec, split: str, root: Path, **kw) -> ImageData:
    from .imagefolder import load_image_folder

    data = load_image_folder(spec, split, root, mode="RGB", **kw)
    if data.classes != CIFAR10_CLASSES:
        raise DatasetError(
            f"dataset 'cifar10-jpeg': {root} has class folders {', '.join(data.classes)}, expected the CIFAR-10 "
            f"classes {', '.join(CIFAR10_CLASSES)}. For another image folder use data.name=imagefolder."
        )
    if tuple(data.images.shape[1:]) != (3, 32, 32):
        h, w = data.images.shape[2:]
        raise DatasetError(f"dataset 'cifar10-jpeg': the images in {root} are {w}x{h}, expected 32x32")
    return data


def load_split(name: str, split: str, root: str | Path | None = None, *, cache_dir: str | Path | None = None,
               limit_per_class: int | None = None) -> ImageData:
    """Load one split (``"train"`` or ``"test"``) of a registered dataset into memory.

    ``root`` is the directory (or, for image folders and CIFAR, the archive) the user points at;
    ``digits`` needs none. Image folders are decoded once and cached (see
    :mod:`otmdr.data.imagefolder`). ``limit_per_class`` keeps only the first N images of each
    class (sorted file order for image folders; used by tests). Every problem with the files is
    a :class:`DatasetError` with a message meant for the user.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for dataset '{spec.name}'; use 'train' or 'test'")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be a positive integer, got {limit_per_class}")
    path: Path | None = None
    if spec.needs_root:
        if root is None:
            raise DatasetError(
                f"dataset '{spec.name}' needs a data directory: pass --data-dir DIR "
                f"(expected layout: {spec.layout}; how to get it: {spec.how_to_get})"
            )
        path = Path(root).expanduser()
        if not path.exists():
            raise DatasetError(
                f"dataset '{spec.name}': data directory {path} does not exist "
                f"(expected layout: {spec.layout}; how to get it: {spec.how_to_get})"
            )
    loader = _LOADERS.get(spec.name)
    if loader is not None:  # registered by a plugin module: its factory's splits
        _, train, val, test = dataset_from_factory(loader(), spec.name)
        data = {"train": train, "test": test}[split]
        return data if limit_per_class is None else _first_per_class(data, limit_per_class)
    reader = _readers()[spec.name]
    folder_like = spec.name in ("imagefolder", "cifar10-jpeg")
    if folder_like:
        return reader(spec, split, path, cache_dir=cache_dir, limit_per_class=limit_per_class)
    data = reader(spec, split, path)
    return data if limit_per_class is None else _first_per_class(data, limit_per_class)
