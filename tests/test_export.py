"""dinov2-export: a training checkpoint becomes a backbone file in the released key layout that
our vit_* builders and torch.hub load, giving the trained teacher's (or student's) features."""

from pathlib import Path

import pytest
import torch

from dinov2.checkpoint.export import builder_kwargs, export_backbone, main
from dinov2.configs import load_config
from dinov2.hub.weights import load_exact, load_state_dict_from
from dinov2.models.vision_transformer import vit_small
from dinov2.train.train import Trainer
from gloo_ranks import DIST_TINY, write_dataset

REPO = Path(__file__).resolve().parents[1]
SINGLE = [x for x in DIST_TINY if not x.startswith("distributed.launcher")] + ["distributed.launcher=single"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # Chunked blocks (keys blocks.{chunk}.{i}) and registers exercise the key conversion.
    tmp = tmp_path_factory.mktemp("export")
    overrides = SINGLE + [write_dataset(tmp / "images.npy"), "train.max_steps=2", "student.block_chunks=2",
                          "student.num_register_tokens=2"]
    trainer = Trainer(load_config(None, overrides), tmp / "run")
    trainer.fit()
    return trainer, tmp / "run"


def test_export_round_trip_through_vit_builder_and_torch_hub(trained, tmp_path, capsys):
    trainer, run_dir = trained
    out = tmp_path / "teacher.pth"
    assert main([str(run_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step_000000002" in printed and "torch.hub.load(REPO, 'dinov2_vits14_reg'" in printed

    state = load_state_dict_from(str(out))
    assert "blocks.1.attn.qkv.weight" in state and "register_tokens" in state
    assert not any(k.startswith(("teacher.", "model.")) for k in state)
    images = torch.randn(2, 1, 28, 28)
    teacher = trainer.model.teacher.backbone.eval()
    with torch.no_grad():
        expected = teacher(images)
        model = vit_small(**builder_kwargs(trainer.cfg)).eval()
        load_exact(model, state, str(out))
        torch.testing.assert_close(model(images), expected)
        hub = torch.hub.load(str(REPO), "dinov2_vits14_reg", source="local", weights=str(out),
                             **builder_kwargs(trainer.cfg)).eval()
        torch.testing.assert_close(hub(images), expected)
        torch.testing.assert_close(hub.get_intermediate_layers(images, n=1)[0],
                                   teacher.get_intermediate_layers(images, n=1)[0])


def test_student_and_safetensors(trained, tmp_path):
    trainer, run_dir = trained
    info = export_backbone(run_dir / "checkpoints", tmp_path / "student.safetensors", which="student")
    assert info["format"] == "safetensors" and info["which"] == "student"
    state = load_state_dict_from(info["out"])
    student = trainer.model.student.backbone.state_dict()
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], student["blocks.0.0.mlp.fc1.weight"])
    teacher = load_state_dict_from(export_backbone(run_dir, tmp_path / "t.pth")["out"])
    assert not torch.equal(state["blocks.0.mlp.fc1.weight"], teacher["blocks.0.mlp.fc1.weight"])  # EMA lags


def test_export_errors_are_clear(trained, tmp_path, capsys):
    _, run_dir = trained
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x.pth")]) == 2
    assert "neither a complete DCP checkpoint" in capsys.readouterr().err
    # A config that describes another architecture than the checkpoint holds: keys are named.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "step_000000002").symlink_to(run_dir / "checkpoints" / "step_000000002")
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("depth: 2", "depth: 3"))
    assert main([str(other), str(tmp_path / "y.pth")]) == 2
    assert "keys missing from the file: blocks.2." in capsys.readouterr().err
