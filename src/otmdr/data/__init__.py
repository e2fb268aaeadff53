"""Datasets for the training pipeline: readers, splits, batched augmentation, an in-memory loader.

Nothing is downloaded: each dataset is read from files the user already has (``root``, the
CLI's ``--data-dir``), except ``digits``, which ships with scikit-learn. Every problem with
those files is a :class:`DatasetError` whose message names the path, what was expected there
and how to get it.

    spec = get_spec("cifar10")
    train = load_split("cifar10", "train", "~/data")
    tr_idx, val_idx = train_val_split(len(train.labels), 0.1, seed=0)
    loader = BatchLoader(subset(train, tr_idx), spec, 128, shuffle=True, device="cuda",
                         augment=Augment(crop_padding=4, flip=True))
    for x, y in loader: ...

Datasets: digits, mnist, fashion-mnist (IDX files), cifar10, cifar100, cifar100-coarse (the
official python pickles), cifar10-jpeg and imagefolder (``<split>/<class>/*.jpg|png`` as a
folder or a tar archive, decoded once with Pillow and cached as ``.npz``).

Corrupted test sets in the official CIFAR-10-C / CIFAR-100-C ``.npy`` layout (``<corruption>.npy``
holding severities 1..5 in blocks, plus ``labels.npy``): :func:`list_corruptions`,
:func:`load_corrupted` read one (the official release or our own copy), :func:`write_corrupted`
writes our own copy of a clean test set with :func:`otmdr.data.corruptions.corrupt`.
"""

from ._types import DatasetError, DatasetSpec, ImageData
from .loader import BatchLoader, subset, test_subset, train_val_split
from .registry import (dataset_from_factory, get_spec, list_datasets, load_split, register_dataset,
                       registered_loader, resolve_spec)
from .transforms import Augment, to_float
from .corrupted_dataset import list_corruptions, load_corrupted, write_corrupted

__all__ = [
    "DatasetError",
    "DatasetSpec",
    "ImageData",
    "list_datasets",
    "get_spec",
    "load_split",
    "resolve_spec",
    "register_dataset",
    "registered_loader",
    "dataset_from_factory",
    "train_val_split",
    "subset",
    "test_subset",
    "Augment",
    "to_float",
    "BatchLoader",
    "list_corruptions",
    "load_corrupted",
    "write_corrupted",
]
