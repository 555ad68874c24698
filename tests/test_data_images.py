"""One listing rule and one decoding rule for training, evaluation and curation (dinov2/data/images.py)."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from data_curation.embed import ImagePathDataset, list_images
from dinov2.data import ClassFolderDataset, ImageFolderDataset, SkipUnreadable, list_image_files, load_image
from dinov2.data.images import image_extensions, to_8bit
from dinov2.eval.data import eval_transform, load_dataset


def _png(path, value=(10, 20, 30), size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, value).save(path)


def _gradient16(width=512, height=3):
    """uint16 gradient from 0 to 65535 along x (every row the same)."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(row, (height, 1))


def _expected8(values16):
    return np.rint(values16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


# ----------------------------------------------------------------------------- decoding


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    grad = _gradient16()
    path = tmp_path / "g16.png"
    Image.fromarray(grad).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit file
    # What PIL's convert alone does (the bug): nearly everything saturates to 255.
    assert (np.asarray(Image.open(path).convert("L")) == 255).mean() > 0.9

    gray = np.asarray(load_image(str(path), "L"))
    np.testing.assert_array_equal(gray, _expected8(grad))
    assert gray.min() == 0 and gray.max() == 255
    assert np.all(np.diff(gray[0].astype(int)) >= 0)  # monotone along the gradient
    assert len(np.unique(gray)) == 256  # every 8-bit level is used
    rgb = np.asarray(load_image(str(path), "RGB"))
    assert rgb.shape == (3, 512, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))
    assert load_image(str(path), None).mode == "L"  # mode None: channels kept, 8 bits


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_16bit_mode_scales_by_65535(mode):
    values = np.array([[0, 1, 128, 257, 30000, 65534, 65535]], dtype=np.uint16)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (values.shape[1], 1), values.astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(values).convert("I")
    else:
        img = Image.fromarray(values)
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(to_8bit(img)), _expected8(values))


def test_float_images_map_unit_range_and_refuse_others():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(values))), [[0, 64, 128, 255]])
    with pytest.raises(ValueError, match=r"values in \[0, 300\].*\[0, 1\]"):
        to_8bit(Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32)))
    big = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    assert big.mode == "I"
    with pytest.raises(ValueError, match=r"\[0, 70000\].*65535"):
        to_8bit(big)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_8bit(rgb) is rgb  # 8-bit modes are left alone


def test_training_eval_and_curation_decode_16bit_the_same_way(tmp_path):
    grad = _gradient16(width=300, height=4)
    (tmp_path / "cls").mkdir()
    path = str(tmp_path / "cls" / "g.png")
    Image.fromarray(grad).save(path)
    expected = _expected8(grad)
    train = np.asarray(ImageFolderDataset(str(tmp_path), mode="RGB")[0][0])
    evaluation = np.asarray(load_dataset(str(tmp_path))[0][0].convert("RGB"))
    curation = ImagePathDataset([path], np.asarray, 28)[0][1]
    for name, arr in (("train", train), ("eval", evaluation), ("curation", curation)):
        assert arr.shape == (4, 300, 3), name
        np.testing.assert_array_equal(arr[..., 0], expected, err_msg=name)
    # the eval transform scales a 16-bit image handed to it directly too
    x = eval_transform(14, 1.0, mean=(0.0,), std=(1.0,), channels=1)(Image.fromarray(grad[:, :4]))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.0


# ----------------------------------------------------------------------------- listing


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    for rel in ["a.png", "sub/b.jpg", "sub/deeper/c.PNG", "z/d.bmp"]:
        _png(str(root / rel))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    os.makedirs(root / ".git")
    _png(str(root / ".git" / "e.png"))
    return root


def _rel(paths, root):
    return [os.path.relpath(p, root) for p in paths]


TRUE_FILES = ["a.png", "sub/b.jpg", "sub/deeper/c.PNG", "z/d.bmp"]


def test_listing_is_recursive_sorted_and_skips_hidden(tree):
    assert _rel(list_image_files(tree), tree) == TRUE_FILES
    assert ".png" in image_extensions() and ".jpg" in image_extensions() and ".h5" not in image_extensions()


@pytest.mark.timeout(60)
def test_a_symlink_loop_lists_each_file_once(tree):
    os.symlink(".", tree / "loop")  # ln -s . DIR/loop
    assert _rel(list_image_files(tree), tree) == TRUE_FILES
    assert len(ImageFolderDataset(str(tree))) == 4


@pytest.mark.timeout(60)
def test_two_loops_terminate(tree):
    os.symlink(".", tree / "loop")
    os.symlink("..", tree / "sub" / "up")
    os.symlink("../sub", tree / "z" / "side")  # a directory reached twice
    assert _rel(list_image_files(tree), tree) == TRUE_FILES


def test_real_paths_win_and_links_to_one_file_count_once(tree, tmp_path):
    os.symlink("z/d.bmp", tree / "0_link.bmp")  # sorts first, still the real path is kept
    os.link(tree / "a.png", tree / "hard.png")
    os.symlink("missing.png", tree / "dangling.png")
    outside = tmp_path / "outside"
    _png(str(outside / "o.png"))
    os.symlink(outside, tree / "linked_dir")  # a directory symlink to new files is followed
    assert _rel(list_image_files(tree), tree) == sorted(TRUE_FILES + ["linked_dir/o.png"])


@pytest.mark.timeout(60)
def test_a_fifo_named_like_an_image_is_not_listed_nor_read(tree):
    os.mkfifo(tree / "x.jpg")  # opening it for reading would block forever
    os.mkfifo(tree / "sub" / "y.png")
    assert _rel(list_image_files(tree), tree) == TRUE_FILES
    ds = SkipUnreadable(ImageFolderDataset(str(tree)))
    assert [ds[i][0].size for i in range(len(ds))] == [(6, 5)] * 4


@pytest.mark.timeout(60)
def test_training_eval_and_curation_share_the_listing(tmp_path):
    root = tmp_path / "labelled"
    for rel in ["cat/1.png", "cat/2.png", "dog/1.png", "dog/deep/2.png", "dog/3.png"]:
        _png(str(root / rel))
    os.symlink("..", root / "dog" / "loop")
    os.mkfifo(root / "cat" / "fifo.png")
    expected = ["cat/1.png", "cat/2.png", "dog/1.png", "dog/3.png", "dog/deep/2.png"]
    assert _rel(ImageFolderDataset(str(root)).paths, root) == expected
    labelled = ClassFolderDataset(str(root))
    assert labelled.classes == ["cat", "dog"] and labelled.targets == [0, 0, 1, 1, 1]
    assert _rel([p for p, _ in labelled.samples], root) == expected
    assert load_dataset(str(root)).targets == [0, 0, 1, 1, 1]
    assert list_images(root) == [os.path.realpath(root / p) for p in expected]


def test_listing_errors_name_the_folder(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_image_files(tmp_path / "missing")
    _png(str(tmp_path / "f.png"))
    with pytest.raises(NotADirectoryError, match="f.png"):
        list_image_files(tmp_path / "f.png")
    if os.geteuid() != 0:  # root reads any folder
        locked = tmp_path / "d" / "locked"
        _png(str(locked / "x.png"))
        _png(str(tmp_path / "d" / "ok.png"))
        os.chmod(locked, 0)
        try:
            with caplog.at_level(logging.WARNING, logger="dinov2.data.images"):
                assert _rel(list_image_files(tmp_path / "d"), tmp_path / "d") == ["ok.png"]
            assert "locked" in caplog.text
        finally:
            os.chmod(locked, 0o755)
