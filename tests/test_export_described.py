"""Exports describe themselves: architecture and input are written into the file by dinov2-export
and read back by the weights loader, torch.hub, dinov2-eval (no architecture flags, the training
size and statistics as defaults) and the --run / --weights random paths."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dinov2.cli.export import main as export_main
from dinov2.cli.eval import main as eval_main
from dinov2.hub.backbones import dinov2_backbone, dinov2_vitb14, dinov2_vits14
from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription, DescriptionError, from_config
from dinov2.hub.weights import WeightsFileError, load_weights, read_weights_file
from export_helpers import labelled_grey_set, train_tiny_run

REPO = Path(__file__).resolve().parents[1]


def tiny_description(**changes) -> BackboneDescription:
    fields = dict(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=28, in_chans=1,
                  mlp_ratio=4.0, ffn_layer="mlp", num_register_tokens=0, init_values=0.1, qkv_bias=True,
                  proj_bias=True, ffn_bias=True, interpolate_offset=0.1, interpolate_antialias=False, mean=(0.13,),
                  std=(0.31,), resize_ratio=1.0)
    return BackboneDescription(**{**fields, **changes})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("described")
    trainer, run_dir = train_tiny_run(tmp)
    out = tmp / "teacher.pth"
    assert export_main([str(run_dir), str(out)]) == 0
    safetensors = tmp / "teacher.safetensors"
    assert export_main([str(run_dir), str(safetensors)]) == 0
    data = labelled_grey_set(tmp)
    return trainer, run_dir, out, safetensors, data


def test_description_round_trips_and_is_read_strictly():
    d = tiny_description(source={"step": 3})
    assert BackboneDescription.from_json(d.to_json()) == d
    body = json.loads(d.to_json())
    for change, message in [
        ({"embed_dim": None}, "embed_dim must be an integer"),
        ({"qkv_bias": 1}, "qkv_bias must be true or false"),
        ({"mean": [0.1, 0.2]}, r"mean \[0.1, 0.2\] and std \[0.31\] need one value per input channel \(1\)"),
        ({"version": 99}, "version 99; this dinov2 reads versions <= 1"),
        ({"colour": "red"}, "unknown fields colour"),
        ({"format": "other"}, "not a dinov2-backbone description"),
        ({"embed_dim": 33}, "embed_dim 33 is not divisible by num_heads 2"),
    ]:
        with pytest.raises(DescriptionError, match=message):
            BackboneDescription.from_json(json.dumps({**body, **change}), "f.pth")
    missing = {k: v for k, v in body.items() if k != "patch_size"}
    with pytest.raises(DescriptionError, match="f.pth: description misses patch_size"):
        BackboneDescription.from_json(json.dumps(missing), "f.pth")


def test_export_writes_the_description_that_plain_torch_and_safetensors_read(run):
    trainer, run_dir, out, safetensors, _ = run
    expected = from_config(trainer.cfg)
    raw = torch.load(out, map_location="cpu", weights_only=True)  # plain torch, no code of ours
    assert isinstance(raw[DESCRIPTION_KEY], str)
    written = BackboneDescription.from_json(raw[DESCRIPTION_KEY])
    assert written.source["which"] == "teacher" and written.source["step"] == 1
    assert {**json.loads(written.to_json()), "source": {}} == json.loads(expected.to_json())
    assert (written.embed_dim, written.depth, written.num_heads, written.patch_size, written.img_size,
            written.in_chans, written.mean, written.std, written.init_values) == (32, 2, 2, 7, 28, 1, (0.13,),
                                                                                  (0.31,), 0.1)
    with safe_open(str(safetensors), framework="pt") as handle:
        assert BackboneDescription.from_json(handle.metadata()[DESCRIPTION_KEY]) == written
    loaded = load_weights(str(out))
    assert loaded.description == written and DESCRIPTION_KEY not in loaded.state_dict
    assert set(loaded.state_dict) == set(load_weights(str(safetensors)).state_dict)


def test_the_one_rule_for_the_description_entry(run, tmp_path):
    _, _, out, _, _ = run
    state = read_weights_file(str(out))
    text = tiny_description().to_json()
    cases = {
        "not_text.pth": ({**state, DESCRIPTION_KEY: 3}, "reserved entry 'dinov2_backbone' must be the JSON text"),
        "extra.pth": ({**state, DESCRIPTION_KEY: text, "step": 3}, r"non-tensor entries step \(int\)"),
        "bad_json.pth": ({**state, DESCRIPTION_KEY: "{not json"}, "the 'dinov2_backbone' entry is not JSON"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsFileError, match=message):
            load_weights(str(tmp_path / name))
    save_file(state, str(tmp_path / "wrong.safetensors"), metadata={DESCRIPTION_KEY: text.replace('"version": 1',
                                                                                                   '"version": 7')})
    with pytest.raises(WeightsFileError, match="wrong.safetensors: description version 7"):
        load_weights(str(tmp_path / "wrong.safetensors"))


def test_torch_hub_builds_a_described_file_without_arguments(run):
    trainer, _, out, safetensors, _ = run
    teacher = trainer.model.teacher.backbone.eval()
    images = torch.randn(2, 1, 28, 35)
    with torch.no_grad():
        expected = teacher.forward_features(images)["x_norm_patchtokens"]
        for model in (torch.hub.load(str(REPO), "dinov2_backbone", source="local", weights=str(out)),
                      dinov2_backbone(weights=str(safetensors)), dinov2_vits14(weights=str(out))):
            torch.testing.assert_close(model.eval().forward_features(images)["x_norm_patchtokens"], expected)
        baseline = dinov2_backbone(weights=str(out), pretrained=False)
        assert baseline.embed_dim == 32 and not torch.equal(baseline.pos_embed, teacher.pos_embed)
    with pytest.raises(ValueError, match="holds a vit_small backbone, not vit_base"):
        dinov2_vitb14(weights=str(out))
    with pytest.raises(ValueError, match=r"contradict it: embed_dim=64 \(the file has 32\)"):
        dinov2_vits14(weights=str(out), embed_dim=64)


def _knn(argv, capsys) -> dict:
    assert eval_main(["knn", *argv, "--ks", "3", "--no-progress", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_eval_needs_no_architecture_or_input_flags(run, capsys):
    _, run_dir, out, _, (x, y) = run
    data = ["--data", x, "--labels", y, "--val-fraction", "0.25"]
    described = _knn(["--backbone-file", str(out), *data], capsys)
    assert described["dataset"]["img_size"] == 28 and described["dataset"]["resize_ratio"] == 1.0
    assert described["backbone"]["mean"] == [0.13] and described["backbone"]["description"]["depth"] == 2
    # The same numbers as every flag spelled out by hand, on a copy without the description.
    plain = out.parent / "plain.pth"
    torch.save(read_weights_file(str(out)), plain)
    flags = ["--arch", "vit_small", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--img-size", "28",
             "--resize-ratio", "1", "--mean", "0.13", "--std", "0.31"]
    explicit = _knn(["--backbone-file", str(plain), *flags, *data], capsys)
    assert described["results"] == explicit["results"]
    from_run = _knn(["--run", str(run_dir), *data], capsys)  # teacher by default
    assert from_run["results"] == described["results"] and from_run["backbone"]["which"] == "teacher"


def test_random_init_baseline_of_a_custom_size_and_contradicting_flags(run, capsys):
    _, run_dir, out, _, (x, y) = run
    data = ["--data", x, "--labels", y, "--val-fraction", "0.25", "--output-json"]
    first = _knn(["--backbone-file", str(out), "--weights", "random", *data, str(out.parent / "r1.json")], capsys)
    second = _knn(["--run", str(run_dir), "--weights", "random", *data, str(out.parent / "r2.json")], capsys)
    assert first["results"] == second["results"]  # seeded: the same baseline from the file and the run
    assert first["backbone"]["weights"] == "random" and first["dataset"]["img_size"] == 28
    assert eval_main(["knn", "--backbone-file", str(out), "--embed-dim", "64", "--data", x, "--labels", y]) == 2
    assert "--embed-dim 64 (the file has 32) contradicts it" in capsys.readouterr().err
    assert eval_main(["knn", "--backbone-file", str(out), "--weights", "LVD142M", "--data", x, "--labels", y]) == 2
    assert "only --weights random" in capsys.readouterr().err


def test_curation_embeds_with_a_described_backbone_file(run, tmp_path):
    """dinov2-curate embed --backbone FILE: built as described and fed its own input (1 channel, its
    mean/std) although curation prepares ImageNet-normalised RGB; the reference is the evaluation's
    own preprocessing of the same images (grayscale first: equal up to 8-bit rounding)."""
    import numpy as np
    from PIL import Image

    from data_curation.cli import main as curate_main
    from dinov2.eval.data import eval_transform

    trainer, _, out, _, _ = run
    rng = np.random.default_rng(1)
    (tmp_path / "pool").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(tmp_path / "pool" / f"{i}.png")
    assert curate_main(["embed", "--images", f"folder:{tmp_path / 'pool'}", "--backbone", str(out), "--image-size",
                        "28", "--resize-size", "28", "--output-dir", str(tmp_path / "emb")]) == 0
    embeddings = np.load(tmp_path / "emb" / "embeddings.npy")
    paths = (tmp_path / "emb" / "paths.txt").read_text().splitlines()
    transform = eval_transform(28, 1.0, [0.13], [0.31], channels=1)
    teacher = trainer.model.teacher.backbone.eval()
    for row, path in zip(embeddings, paths):
        with torch.no_grad():
            expected = torch.nn.functional.normalize(teacher(transform(Image.open(path))[None]), dim=1)[0]
        assert float(torch.dot(torch.from_numpy(row), expected)) > 0.999


def test_visualize_compares_a_run_with_its_random_initialisation(run, tmp_path, capsys):
    from PIL import Image

    _, run_dir, out, _, _ = run
    argv = ["visualize", "--compare", str(out), f"random:{run_dir}", "skimage:camera", "--output-dir",
            str(tmp_path), "--no-progress", "--json"]
    assert eval_main(argv) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    image = res["images"][0]
    assert res["backbones"][0].startswith(f"{out} [vit_small 32/2/2, patch 7, trained at 28 px, step 1]")
    assert res["backbones"][1].startswith(f"run {run_dir} (teacher), random init [vit_small")
    assert [b["weights"] for b in res["backbone"]] == [None, "random"]
    assert Image.open(image["files"]["compare"]).size[1] > 2 * 448
    assert eval_main(["visualize", "--compare", str(out), str(out), "--backbone-file", str(out), "skimage:camera",
                      "--output-dir", str(tmp_path)]) == 2
    assert "--compare A B names both backbones" in capsys.readouterr().err
