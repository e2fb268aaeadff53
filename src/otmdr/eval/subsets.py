"""The fixed training subset that sharpness and loss landscapes are measured on.

Both are made of many full passes over a few training images; the same images for every run make
the numbers of two runs comparable, and a pass counter turns the passes into a progress bar.
"""

from __future__ import annotations

from typing import Any

from ..data import BatchLoader, ImageData, test_subset

__all__ = ["fixed_training_subset", "PassProgress"]


def fixed_training_subset(data: Any, samples: int, batch_size: int) -> list:
    """A fixed, seeded random subset of ``samples`` training images of ``data`` (what
    :func:`otmdr.train.builders.build_data` returns), normalised, not augmented, as a list of
    batches. Random, not "the first N": image folders are stored in class order."""
    train = data.train
    subset = test_subset(ImageData(train.images.cpu(), train.labels.cpu(), train.classes), samples)
    return list(BatchLoader(subset, train.spec, batch_size, shuffle=False, device=train.device))


class PassProgress(list):
    """The batches of a fixed subset, ticking a progress bar (with an estimate of the time left)
    each time a pass over all of them completes: sharpness and landscapes are made of such
    passes, so the bar moves without touching the evaluation code."""

    def __init__(self, batches: list, total: int, what: str):
        super().__init__(batches)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=what, unit="pass", dynamic_ncols=True, leave=False)

    def __iter__(self):
        yield from super().__iter__()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
