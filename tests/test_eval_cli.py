import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dinov2.eval import evaluate_knn, knn_classify
from dinov2.cli.eval import build_parser, main
from dinov2.models.vision_transformer import DinoVisionTransformer, vit_small


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random ViT-S/14 (img 28) as an exported state dict, and a small labelled .npy set:
    three classes of near-constant grey images (separable by any continuous backbone)."""
    d = tmp_path_factory.mktemp("cli")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vit_small(patch_size=14, img_size=28, block_chunks=0,
                                                    init_values=1.0).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}, str(d / "vits.safetensors"))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    images = np.clip(40 + 80 * labels[:, None, None] + rng.normal(0, 4, (36, 20, 20)), 0, 255).astype(np.uint8)
    np.save(d / "x.npy", images)
    np.save(d / "y.npy", labels)
    return d


def backbone_args(d):
    return ["--backbone-file", str(d / "vits.safetensors"), "--arch", "vit_small", "--no-progress"]


def data_args(d):
    # img 14: one patch per image keeps the ViT-S forward cheap; kNN/linear need no more
    return ["--data", str(d / "x.npy"), "--labels", str(d / "y.npy"), "--img-size", "14", "--val-fraction", "0.25"]


@pytest.mark.parametrize("cmd", [[], ["knn"], ["linear"], ["features"], ["visualize"]])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: dinov2-eval" in capsys.readouterr().out


def test_knn_cli_equals_brute_force_on_the_exported_features(files, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert main(["knn", *backbone_args(files), *data_args(files), "--ks", "1", "5", "--output-json", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("knn (27 train, 9 test") and "k=5: top1" in line
    res = json.loads(out.read_text())
    assert res["results"]["1"]["top1"] == 100.0 and res["results"]["5"]["top1"] == 100.0
    assert res["backbone"]["embed_dim"] == 384 and res["dataset"]["n_val"] == 9

    # the same split through `features`, then an independent kNN on the written arrays
    assert main(["features", *backbone_args(files), *data_args(files), "--output-dir", str(tmp_path / "f")]) == 0
    f = {n: np.load(tmp_path / "f" / f"{n}.npy") for n in ("train_features", "train_labels", "val_features",
                                                              "val_labels")}
    assert f["train_features"].shape == (27, 384) and f["val_features"].shape == (9, 384)
    ref = knn_classify(f["train_features"], f["train_labels"], f["val_features"], f["val_labels"], ks=(1, 5),
                       backend="torch")
    assert ref["results"] == res["results"]


def test_features_cli_without_split_and_layout(files, tmp_path, capsys):
    out = tmp_path / "f"
    args = ["features", *backbone_args(files), "--data", str(files / "x.npy"), "--labels", str(files / "y.npy"),
            "--img-size", "14", "--n-blocks", "2", "--avgpool", "--output-dir", str(out)]
    assert main(args) == 0
    x, y = np.load(out / "features.npy"), np.load(out / "labels.npy")
    assert x.shape == (36, 3 * 384) and x.dtype == np.float32
    np.testing.assert_array_equal(y, np.load(files / "y.npy"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"]["all"]["shape"] == [36, 1152] and meta["n_blocks"] == 2
    assert "features written" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["sgd", "logreg"])
def test_linear_cli_reaches_100_on_separable_images(files, tmp_path, method, capsys):
    out = tmp_path / "lin.json"
    args = ["linear", *backbone_args(files), *data_args(files), "--method", method, "--epochs", "20",
            "--lrs", "0.01", "1.0", "--n-blocks", "1", "2", "--cs", "0.1", "1", "--output-json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["method"] == method and res["best"]["val_top1"] == 100.0
    if method == "sgd":
        assert len(res["results"]) == 4 * 2  # (1, 2 blocks) x (avgpool or not) x 2 lrs
    assert capsys.readouterr().out.startswith(f"linear/{method}")


def test_visualize_cli_writes_pngs(files, tmp_path, capsys):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    args = ["visualize", *backbone_args(files), str(tmp_path / "red.png"), "skimage:astronaut", "--img-size", "28",
            "--output-dir", str(tmp_path / "v"), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    astro = res["images"][1]
    assert astro["image"] == "astronaut" and astro["size"] == [28, 28]
    assert Image.open(astro["files"]["pca"]).size == (448, 448)  # 28 px enlarged 16 times: >= 448 px
    assert len([k for k in astro["files"] if k.startswith("attn_head")]) == 6


@pytest.mark.slow  # builds and initialises a full-size hub ViT-S/14 (seconds on a small CPU)
def test_hub_backbone_with_local_weights_file(files, tmp_path, capsys):
    # A file in the released layout for the hub's ViT-S/14 (img_size 518), passed by path.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vit_small(patch_size=14, img_size=518, block_chunks=0,
                                                    init_values=1.0).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    torch.save({k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}, tmp_path / "w.pth")
    args = ["knn", "--backbone", "dinov2_vits14", "--weights", str(tmp_path / "w.pth"), "--no-progress",
            *data_args(files), "--ks", "3", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["backbone"]["weights"] == str(tmp_path / "w.pth") and res["results"]["3"]["top1"] == 100.0


def test_bad_inputs_exit_2_with_one_clear_message(files, tmp_path, capsys):
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    cases = [
        (["knn", *backbone_args(files), "--data", str(root)], "class folder(s) without images: dog"),
        (["knn", *backbone_args(files), "--data", str(tmp_path / "nothing")], "as a path it does not exist"),
        (["knn", "--data", "mnist"], "name a backbone"),
        (["knn", "--backbone-file", str(files / "vits.safetensors"), "--arch", "vit_large", *data_args(files)],
         "does not match vit_large"),
        (["knn", *backbone_args(files), "--data", str(files / "x.npy")], "needs its labels"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_grayscale_demo_shaped_backbone(files, tmp_path, capsys):
    """The MNIST demo's kind of backbone: 1 input channel, patch 4, non-standard width."""
    torch.manual_seed(0)
    demo = vit_small(patch_size=4, img_size=28, in_chans=1, embed_dim=32, depth=2, num_heads=4,
                     init_values=0.1, block_chunks=0)
    torch.save(demo.state_dict(), tmp_path / "demo.pth")
    bb = ["--backbone-file", str(tmp_path / "demo.pth"), "--arch", "vit_small", "--embed-dim", "32", "--depth", "2",
          "--num-heads", "4", "--no-progress"]
    data = ["--data", str(files / "x.npy"), "--labels", str(files / "y.npy"), "--img-size", "28",
            "--resize-ratio", "1"]
    assert main(["knn", *bb, *data, "--ks", "3"]) == 2
    assert "1-channel backbone needs --mean and --std" in capsys.readouterr().err
    assert main(["knn", *bb, *data, "--ks", "3", "--mean", "0.13", "--std", "0.31", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["results"]["3"]["top1"] == 100.0 and res["backbone"]["in_chans"] == 1
    assert main(["visualize", *bb, "skimage:camera", "--img-size", "28", "--mean", "0.13", "--std", "0.31",
                 "--output-dir", str(tmp_path / "v"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert Image.open(res["images"][0]["files"]["pca"]).size == (448, 448)
    assert len([k for k in res["images"][0]["files"] if k.startswith("attn_head")]) == 4


def test_evaluate_knn_api_restores_the_train_mode():
    """The trainer calls evaluate_knn on its teacher mid-training."""
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4, block_chunks=0)
    model.train()
    images = torch.cat([torch.full((6, 3, 28, 28), -1.0), torch.full((6, 3, 28, 28), 1.0)])
    images += 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    ds = torch.utils.data.TensorDataset(images, torch.tensor([0] * 6 + [1] * 6))
    ds.targets = [0] * 6 + [1] * 6  # datasets expose their labels without decoding images
    res = evaluate_knn(model, ds, ds, ks=(3,), batch_size=5, progress=False)
    assert model.training
    assert res["results"]["3"]["top1"] == 100.0 and res["n_train"] == 12


def test_parser_defaults_match_the_paper_protocol():
    args = build_parser().parse_args(["knn", "--data", "mnist", "--backbone", "dinov2_vits14"])
    assert args.ks == [10, 20, 100, 200] and args.temperature == 0.07 and args.val_fraction == 0.2
    assert args.weights is None  # a hub name then means LVD142M; a described file its own input
    assert args.img_size is None and args.resize_ratio is None  # 224 and 256/224 unless the file says
