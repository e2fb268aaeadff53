"""scikit-learn's 8x8 handwritten digits (1,797 images shipped inside the package).

Pixels 0..16 are rescaled to uint8 0..255 (``round(v * 255 / 16)``). The test split is fixed:
a stratified 80/20 split with seed 0 (``sklearn.model_selection.train_test_split``), 1,437 train
and 360 test images, the same split as ``examples/digits_compare.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from ._types import DatasetError, ImageData


def load_digits_split(split: str) -> ImageData:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetError(
            "dataset 'digits' comes with scikit-learn, which is not installed: pip install 'otmdr[train]'"
        ) from None
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    idx = np.sort(train_idx if split == "train" else test_idx)
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(1),
        labels=torch.from_numpy(labels[idx]),
        classes=[str(i) for i in range(10)],
    )
