"""otmdr.data.corrupted_dataset: the official CIFAR-10-C ``.npy`` layout, read from folders written here
with np.save and written by write_corrupted (round trip, resume, refusal, atomicity)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from otmdr.data import DatasetError, list_corruptions, load_corrupted, write_corrupted
from otmdr.data import corrupted_dataset as corrupted_module
from otmdr.data.corruptions import corrupt

pytest.importorskip("PIL")

NAMES = ["gaussian_noise", "contrast", "pixelate"]  # fast ones, incl. a Pillow-based one


def clean(n: int = 6, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, channels), dtype=np.uint8), rng.integers(0, 10, n)


def official(root: Path, n: int = 4, names=("fog", "speckle_noise"), gray: bool = False) -> dict:
    """A hand-made folder in the official layout; returns {name: array} and the labels."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    shape = (5 * n, 32, 32) if gray else (5 * n, 32, 32, 3)
    arrays = {name: rng.integers(0, 256, shape, dtype=np.uint8) for name in names}
    for name, arr in arrays.items():
        np.save(root / f"{name}.npy", arr)
    labels = np.tile(rng.integers(0, 100, n).astype(np.uint8), 5)
    np.save(root / "labels.npy", labels)
    return {"arrays": arrays, "labels": labels, "n": n}


# ----------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("gray", [False, True])
def test_reads_official_layout_each_severity_block(tmp_path, gray):
    made = official(tmp_path / "C", gray=gray)
    assert list_corruptions(tmp_path / "C") == ["fog", "speckle_noise"]  # extras beyond the 15 are listed
    n = made["n"]
    for s in range(1, 6):
        images, labels = load_corrupted(tmp_path / "C", "speckle_noise", s)
        expected = made["arrays"]["speckle_noise"][(s - 1) * n:s * n]
        if gray:
            expected = expected[..., None]
        assert images.dtype == np.uint8 and type(images) is np.ndarray and images.shape == expected.shape
        np.testing.assert_array_equal(images, expected)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, made["labels"][(s - 1) * n:s * n])


def test_list_ignores_labels_hidden_and_other_files(tmp_path):
    official(tmp_path, names=("snow",))
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / ".fog.npy.abc.tmp").write_bytes(b"x")
    (tmp_path / ".hidden.npy").write_bytes(b"x")
    assert list_corruptions(tmp_path) == ["snow"]


def test_missing_folder_and_missing_labels(tmp_path):
    with pytest.raises(DatasetError, match="not a directory.*Expected layout"):
        list_corruptions(tmp_path / "nope")
    with pytest.raises(DatasetError, match="not a directory"):
        load_corrupted(tmp_path / "nope", "fog", 1)
    official(tmp_path / "C")
    (tmp_path / "C" / "labels.npy").unlink()
    with pytest.raises(DatasetError, match=r"missing file labels\.npy in .*C"):
        list_corruptions(tmp_path / "C")
    with pytest.raises(DatasetError, match=r"missing file labels\.npy"):
        load_corrupted(tmp_path / "C", "fog", 1)


def test_missing_corruption_lists_available(tmp_path):
    official(tmp_path)
    with pytest.raises(DatasetError, match=r"no frost\.npy in .*the corruptions there are: fog, speckle_noise"):
        load_corrupted(tmp_path, "frost", 2)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True])
def test_severity_out_of_range(tmp_path, severity):
    official(tmp_path)
    with pytest.raises(ValueError, match="severity must be one of 1, 2, 3, 4, 5"):
        load_corrupted(tmp_path, "fog", severity)


def test_wrong_shapes(tmp_path):
    official(tmp_path, n=4)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "odd.npy", rng.integers(0, 256, (19, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"odd\.npy holds 19 images, not a positive multiple of 5"):
        load_corrupted(tmp_path, "odd", 1)
    np.save(tmp_path / "more.npy", rng.integers(0, 256, (25, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"more\.npy holds 25 images but .*labels\.npy holds 20 labels"):
        load_corrupted(tmp_path, "more", 1)
    np.save(tmp_path / "chw.npy", rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"chw\.npy holds a uint8 array of shape \(20, 3, 32, 32\).*channels last"):
        load_corrupted(tmp_path, "chw", 1)
    np.save(tmp_path / "flat.npy", rng.integers(0, 256, (20, 3072), dtype=np.uint8))
    with pytest.raises(DatasetError, match="expected uint8"):
        load_corrupted(tmp_path, "flat", 1)


def test_wrong_dtypes(tmp_path):
    made = official(tmp_path, n=4)
    np.save(tmp_path / "float.npy", made["arrays"]["fog"].astype(np.float32) / 255)
    with pytest.raises(DatasetError, match=r"float\.npy holds a float32 array.*expected uint8"):
        load_corrupted(tmp_path, "float", 3)
    np.save(tmp_path / "labels.npy", made["labels"].astype(np.float64))
    with pytest.raises(DatasetError, match=r"labels\.npy holds a float64 array.*integer labels"):
        load_corrupted(tmp_path, "fog", 3)


def test_truncated_and_garbled_files(tmp_path):
    official(tmp_path, n=4)
    raw = (tmp_path / "fog.npy").read_bytes()
    (tmp_path / "fog.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"fog\.npy is corrupt or truncated: not a readable \.npy array"):
        load_corrupted(tmp_path, "fog", 1)
    (tmp_path / "fog.npy").write_bytes(raw[:40])  # ends inside the header
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_corrupted(tmp_path, "fog", 1)
    (tmp_path / "fog.npy").write_bytes(b"")
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_corrupted(tmp_path, "fog", 1)
    (tmp_path / "fog.npy").write_bytes(b"not numpy at all" * 100)
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_corrupted(tmp_path, "fog", 1)
    raw = (tmp_path / "labels.npy").read_bytes()
    (tmp_path / "labels.npy").write_bytes(raw[:-3])
    with pytest.raises(DatasetError, match=r"labels\.npy is corrupt or truncated"):
        load_corrupted(tmp_path, "speckle_noise", 1)


def test_reads_only_the_severity_block(tmp_path, monkeypatch):
    """np.load is asked for a memory map, so a 150 MB file is not read whole."""
    official(tmp_path)
    modes = []
    real = np.load

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(corrupted_module.np, "load", spy)
    load_corrupted(tmp_path, "fog", 2)
    assert modes and all(m == "r" for m in modes)


# ----------------------------------------------------------------------------------------- writing

def test_round_trip_equals_corrupt_per_severity(tmp_path):
    images, labels = clean()
    seen = []
    out = write_corrupted(images, labels, tmp_path / "out", corruptions=NAMES, seed=7, progress=seen.append,
                          source="six random images")
    assert out == tmp_path / "out" and seen == NAMES
    assert list_corruptions(out) == sorted(NAMES)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{c}.npy" for c in NAMES), "labels.npy", "meta.json"])
    stored = np.load(out / "labels.npy")
    assert stored.dtype == np.uint8 and stored.shape == (30,)
    np.testing.assert_array_equal(stored, np.tile(labels, 5))
    for name in NAMES:
        whole = np.load(out / f"{name}.npy")
        assert whole.dtype == np.uint8 and whole.shape == (30, 32, 32, 3)
        for s in range(1, 6):
            got, got_labels = load_corrupted(out, name, s)
            np.testing.assert_array_equal(got, corrupt(images, name, s, 7))
            np.testing.assert_array_equal(got_labels, labels)
    # the blocks differ from each other and from the clean images: the severity really is applied per block
    got1, _ = load_corrupted(out, "gaussian_noise", 1)
    got5, _ = load_corrupted(out, "gaussian_noise", 5)
    assert not np.array_equal(got1, images) and not np.array_equal(got1, got5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True and meta["n"] == 6 and meta["seed"] == 7 and meta["corruptions"] == NAMES
    assert meta["source"] == "six random images" and "frost" in meta["note"]
    assert meta["corruption_version"] and meta["otmdr_version"]


def test_chunks_match_generated_source_and_nchw_tensor_input(tmp_path):
    """With N > chunk, chunk i uses seed + i: the file equals the on-the-fly evaluation source."""
    images, labels = clean(n=7)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out = write_corrupted(nchw, torch.from_numpy(labels), tmp_path / "out", corruptions=["gaussian_noise"],
                          seed=3, chunk=3)
    for s in (1, 4):
        got, _ = load_corrupted(out, "gaussian_noise", s)
        expected = np.concatenate([corrupt(images[i:i + 3], "gaussian_noise", s, 3 + i) for i in range(0, 7, 3)])
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(got, corrupt(images, "gaussian_noise", s, 3))  # chunking is not ignored
    from otmdr.eval.corruption_grid import generated_source

    source = generated_source(nchw, torch.from_numpy(labels), seed=3, chunk=3)
    for s in (2, 5):
        on_the_fly, _ = source("gaussian_noise", s)
        got, _ = load_corrupted(out, "gaussian_noise", s)
        np.testing.assert_array_equal(torch.from_numpy(got).permute(0, 3, 1, 2).numpy(), on_the_fly.numpy())


def test_grayscale_and_large_labels(tmp_path):
    images, _ = clean(channels=1)
    labels = np.array([0, 300, 5, 299, 1, 2])
    out = write_corrupted(images[..., 0], labels, tmp_path / "out", corruptions=["contrast"])
    assert np.load(out / "contrast.npy").shape == (30, 32, 32, 1)
    assert np.load(out / "labels.npy").dtype == np.int64
    got, got_labels = load_corrupted(out, "contrast", 2)
    np.testing.assert_array_equal(got, corrupt(images, "contrast", 2, 0))
    np.testing.assert_array_equal(got_labels, labels)


def test_write_rejects_bad_arguments(tmp_path):
    images, labels = clean()
    with pytest.raises(ValueError, match="corruptions must be distinct names"):
        write_corrupted(images, labels, tmp_path / "a", corruptions=["rain"])
    with pytest.raises(ValueError, match="labels must be 6 integers"):
        write_corrupted(images, labels[:5], tmp_path / "a", corruptions=["contrast"])
    with pytest.raises(ValueError, match="images must be a non-empty uint8"):
        write_corrupted(images.astype(np.float32), labels, tmp_path / "a", corruptions=["contrast"])
    assert not (tmp_path / "a").exists()


def test_refuses_foreign_folders(tmp_path):
    images, labels = clean()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and is not a corrupted copy written by otmdr.*new or empty"):
        write_corrupted(images, labels, foreign, corruptions=["contrast"])
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    official(tmp_path / "official")  # the official release has no meta.json: never written into
    with pytest.raises(DatasetError, match="not a corrupted copy written by otmdr"):
        write_corrupted(images, labels, tmp_path / "official", corruptions=["contrast"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        write_corrupted(images, labels, tmp_path / "file", corruptions=["contrast"])
    empty = tmp_path / "empty"
    empty.mkdir()
    write_corrupted(images, labels, empty, corruptions=["contrast"])  # an existing empty folder is fine
    assert list_corruptions(empty) == ["contrast"]


def test_refuses_own_folder_with_other_settings(tmp_path):
    images, labels = clean()
    out = write_corrupted(images, labels, tmp_path / "out", corruptions=["contrast"], seed=1)
    before = (out / "contrast.npy").read_bytes()
    with pytest.raises(DatasetError, match=r"other settings \(seed: 1 there, 2 now\).*delete"):
        write_corrupted(images, labels, out, corruptions=["contrast"], seed=2)
    with pytest.raises(DatasetError, match="the source images or labels differ"):
        write_corrupted(images, (labels + 1) % 10, out, corruptions=["contrast"], seed=1)
    with pytest.raises(DatasetError, match="corruptions:"):
        write_corrupted(images, labels, out, corruptions=["contrast", "pixelate"], seed=1)
    assert (out / "contrast.npy").read_bytes() == before
    assert json.loads((out / "meta.json").read_text())["seed"] == 1


def test_interrupted_write_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    images, labels = clean()
    real = corrupted_module._corrupt_chunk
    calls = []

    def failing(x, name, severity, seed):
        calls.append((name, severity))
        if name == "pixelate" and severity == 3:
            raise KeyboardInterrupt  # like Ctrl-C mid-file
        return real(x, name, severity, seed)

    monkeypatch.setattr(corrupted_module, "_corrupt_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        write_corrupted(images, labels, tmp_path / "out", corruptions=NAMES)
    out = tmp_path / "out"
    assert ("pixelate", 2) in calls  # it failed mid-way through the file
    assert sorted(p.name for p in out.iterdir()) == ["contrast.npy", "gaussian_noise.npy", "labels.npy", "meta.json"]
    assert json.loads((out / "meta.json").read_text())["complete"] is False
    kept = {name: (out / f"{name}.npy").stat().st_mtime_ns for name in ("gaussian_noise", "contrast")}

    monkeypatch.setattr(corrupted_module, "_corrupt_chunk", real)
    (out / ".pixelate.npy.stale.tmp").write_bytes(b"left by a killed run")
    seen = []
    write_corrupted(images, labels, out, corruptions=NAMES, progress=seen.append)
    assert seen == ["pixelate"]  # complete files are kept, not regenerated
    assert {name: (out / f"{name}.npy").stat().st_mtime_ns for name in kept} == kept
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert json.loads((out / "meta.json").read_text())["complete"] is True
    for s in (1, 3, 5):
        np.testing.assert_array_equal(load_corrupted(out, "pixelate", s)[0], corrupt(images, "pixelate", s, 0))
    seen.clear()
    write_corrupted(images, labels, out, corruptions=NAMES, progress=seen.append)  # complete: nothing to do
    assert seen == []


def test_resume_regenerates_a_damaged_file(tmp_path):
    images, labels = clean()
    out = write_corrupted(images, labels, tmp_path / "out", corruptions=["contrast"])
    good = (out / "contrast.npy").read_bytes()
    (out / "contrast.npy").write_bytes(good[:1000])
    write_corrupted(images, labels, out, corruptions=["contrast"])
    assert (out / "contrast.npy").read_bytes() == good


@pytest.mark.skipif(not hasattr(__import__("os"), "fchmod"), reason="POSIX file modes")
def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    """The temporaries are created 0600; a shared copy must be readable like an np.save file."""
    import os

    old = os.umask(0o022)
    try:
        out = write_corrupted(*clean(), tmp_path / "out", corruptions=["contrast"])
    finally:
        os.umask(old)
    for name in ("contrast.npy", "labels.npy", "meta.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("otmdr.data.corrupted", None)
    with pytest.warns(DeprecationWarning, match="otmdr.data.corrupted is deprecated"):
        old = importlib.import_module("otmdr.data.corrupted")
    assert old.load_corrupted is load_corrupted and old.write_corrupted is write_corrupted
    assert old.list_corruptions is list_corruptions and old.LAYOUT == corrupted_module.LAYOUT
