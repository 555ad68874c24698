"""One data-set grammar for training, evaluation and curation (dinov2.data.spec)."""

import numpy as np
import pytest
from PIL import Image

from dinov2.data.spec import DatasetSpec, DatasetSpecError, parse_dataset_spec
from dinov2.eval.data import DataError, load_dataset
from dinov2.train.build import build_dataset


@pytest.fixture
def tree(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1]))
    (tmp_path / "list.txt").write_text("img/a/0.png\nimg/b/1.png\n")
    return tmp_path


def test_every_form_and_the_old_spellings(tree):
    assert parse_dataset_spec("mnist") == parse_dataset_spec("mnist_demo") == DatasetSpec("mnist")
    assert parse_dataset_spec("mnist_demo:train") == parse_dataset_spec("mnist:train") == DatasetSpec("mnist", "",
                                                                                                         "train")
    for kind, path in [("folder", tree / "img"), ("manifest", tree / "list.txt"), ("npy", tree / "x.npy")]:
        assert parse_dataset_spec(f"{kind}:{path}") == DatasetSpec(kind, str(path))
        assert parse_dataset_spec(str(path)) == DatasetSpec(kind, str(path))  # bare spellings (eval's, curation's)
    assert str(DatasetSpec("folder", "/d")) == "folder:/d"
    assert str(DatasetSpec("mnist", "", "held_out")) == "mnist:held_out"


@pytest.mark.parametrize("text, message", [
    ("", "empty data-set spec"),
    ("imagenet:/data", "unknown kind 'imagenet'"),
    ("folder:", "folder: needs a path"),
    ("mnist:test", "the mnist split must be train or held_out"),
    ("/no/such/dir", "as a path it does not exist"),
])
def test_errors_name_the_spec_and_the_valid_forms(text, message):
    with pytest.raises(DatasetSpecError, match=message) as error:
        parse_dataset_spec(text, what="data.dataset")
    assert "data.dataset" in str(error.value)
    if text not in ("", "folder:", "mnist:test"):
        assert "mnist[:train|:held_out], folder:PATH, manifest:PATH, npy:PATH" in str(error.value)


def test_training_and_evaluation_read_the_same_specs(tree):
    folder = f"folder:{tree / 'img'}"
    assert len(build_dataset(folder, 1)) == 6 and len(build_dataset(str(tree / "img"), 1)) == 6
    assert len(build_dataset(f"manifest:{tree / 'list.txt'}", 1)) == 2
    assert len(build_dataset(f"npy:{tree / 'x.npy'}", 1)) == 4
    labelled = load_dataset(folder)  # a class-per-folder tree: labels from the folders
    assert labelled.classes == ["a", "b"] and len(labelled) == 6
    assert len(load_dataset(str(tree / "img"))) == 6  # eval's old bare path
    assert len(load_dataset(f"npy:{tree / 'x.npy'}", str(tree / "y.npy"))) == 4
    assert len(load_dataset(str(tree / "x.npy"), str(tree / "y.npy"))) == 4
    with pytest.raises(DataError, match="is a manifest data set, which this command cannot use; use one of "
                                        "mnist.*folder:PATH, npy:PATH"):
        load_dataset(f"manifest:{tree / 'list.txt'}")
    with pytest.raises(DatasetSpecError, match="data.dataset='bogus:x': unknown kind"):
        build_dataset("bogus:x")


def test_mnist_splits_agree_between_training_and_evaluation():
    train = build_dataset("mnist:train", 1)
    held_out = load_dataset("mnist:held_out")
    assert len(train) + len(held_out) == 5000 and len(load_dataset("mnist")) == 5000
