"""dinov2-export: a training checkpoint becomes a backbone file in the released key layout that
our vit_* builders and torch.hub load, giving the trained teacher's (or student's) features."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.checkpoint.export import backbone_state_dict, export_backbone, read_tensors, resolve_checkpoint
from dinov2.cli.export import main
from dinov2.configs import load_config
from dinov2.hub.description import from_config
from dinov2.hub.weights import load_exact, load_state_dict_from
from dinov2.models.vision_transformer import vit_small
from dinov2.train.train import Trainer
from chunked_keys import chunk_block_keys
from crafted import write_crafted_metadata
from gloo_ranks import DIST_TINY, write_dataset

REPO = Path(__file__).resolve().parents[1]
SINGLE = [x for x in DIST_TINY if not x.startswith("distributed.launcher")] + ["distributed.launcher=single"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # block_chunks (an FSDP grouping: the keys stay flat) and registers.
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
    assert "step_000000002" in printed and "torch.hub.load(REPO, 'dinov2_backbone'" in printed

    state = load_state_dict_from(str(out))
    assert "blocks.1.attn.qkv.weight" in state and "register_tokens" in state
    assert not any(k.startswith(("teacher.", "model.")) for k in state)
    images = torch.randn(2, 1, 28, 28)
    teacher = trainer.model.teacher.backbone.eval()
    with torch.no_grad():
        expected = teacher(images)
        model = vit_small(**from_config(trainer.cfg).builder_kwargs()).eval()
        load_exact(model, state, str(out))
        torch.testing.assert_close(model(images), expected)
        hub = torch.hub.load(str(REPO), "dinov2_vits14_reg", source="local", weights=str(out),
                             **from_config(trainer.cfg).builder_kwargs()).eval()
        torch.testing.assert_close(hub(images), expected)
        torch.testing.assert_close(hub.get_intermediate_layers(images, n=1)[0],
                                   teacher.get_intermediate_layers(images, n=1)[0])


def test_student_and_safetensors(trained, tmp_path):
    trainer, run_dir = trained
    info = export_backbone(run_dir / "checkpoints", tmp_path / "student.safetensors", which="student")
    assert info["format"] == "safetensors" and info["which"] == "student"
    state = load_state_dict_from(info["out"])
    student = trainer.model.student.backbone.state_dict()
    assert state.keys() == student.keys()
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], student["blocks.0.mlp.fc1.weight"])
    teacher = load_state_dict_from(export_backbone(run_dir, tmp_path / "t.pth")["out"])
    assert not torch.equal(state["blocks.0.mlp.fc1.weight"], teacher["blocks.0.mlp.fc1.weight"])  # EMA lags


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as intended
def test_checkpoint_with_chunked_block_keys_exports_the_released_layout(trained, tmp_path):
    """Checkpoints written before the models became flat, with student.block_chunks > 0, name their blocks
    model.*.backbone.blocks.{chunk}.{i}: export (and everything reading backbones through it) gives blocks.{i}."""
    import torch.distributed.checkpoint as dcp

    trainer, run_dir = trained
    prefix = "model.teacher.backbone."
    tensors = read_tensors(resolve_checkpoint(run_dir), prefix)
    old = {prefix + k: v for k, v in chunk_block_keys({k[len(prefix):]: v for k, v in tensors.items()}, 2, 2).items()}
    assert f"{prefix}blocks.1.1.attn.qkv.weight" in old
    dcp.save(old, checkpoint_id=str(tmp_path / "step_000000002"), no_dist=True)
    state = backbone_state_dict(tmp_path / "step_000000002")
    teacher = trainer.model.teacher.backbone.state_dict()
    assert state.keys() == teacher.keys()
    assert all(torch.equal(state[k], teacher[k]) for k in teacher)
    info = export_backbone(tmp_path / "step_000000002", tmp_path / "old.pth", which="teacher")
    assert load_state_dict_from(info["out"]).keys() == teacher.keys()


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


def _copy_run(run_dir: Path, dst: Path) -> Path:
    """A copy of the run (config and its one checkpoint) to damage; returns the checkpoint."""
    shutil.copytree(run_dir / "checkpoints", dst / "checkpoints")
    shutil.copy(run_dir / "config.yaml", dst / "config.yaml")
    return next((dst / "checkpoints").glob("step_*"))


def test_unsupported_suffix_directory_target_and_contradicting_format(trained, tmp_path, capsys):
    _, run_dir = trained
    assert main([str(run_dir), str(tmp_path / "model.bin")]) == 2  # used to be written as a pickle
    err = capsys.readouterr().err
    assert "model.bin: unsupported output format '.bin'; dinov2-export writes .pth, .pt, .safetensors, .onnx" in err
    assert not (tmp_path / "model.bin").exists()
    assert main([str(run_dir), str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory; give the output file" in capsys.readouterr().err
    assert main([str(run_dir), str(tmp_path / "x.pth"), "--format", "safetensors"]) == 2
    assert "--format safetensors contradicts the suffix .pth" in capsys.readouterr().err
    assert main([str(run_dir), str(tmp_path / "x.pt")]) == 0 and "blocks.1.norm1.weight" in torch.load(
        tmp_path / "x.pt", weights_only=True)


def _damage(kind: str, checkpoint: Path, marker: Path) -> None:
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    if kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif kind == "missing shard":
        shard.unlink()
    elif kind == "truncated metadata":
        (checkpoint / ".metadata").write_bytes((checkpoint / ".metadata").read_bytes()[:300])
    else:  # a crafted .metadata that would run code
        write_crafted_metadata(checkpoint, marker)


@pytest.mark.parametrize("kind, message", [
    ("truncated shard", "could not be loaded: EOFError"),
    ("missing shard", "could not be loaded: FileNotFoundError"),
    ("truncated metadata", ".metadata: not readable DCP checkpoint metadata (truncated"),
    ("crafted metadata", ".metadata: refused to unpickle builtins.exec"),
])
def test_corrupt_or_crafted_checkpoint_is_one_line_exit_2_and_out_keeps_its_content(
        trained, tmp_path, capsys, kind, message):
    _, run_dir = trained
    checkpoint = _copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    _damage(kind, checkpoint, marker)
    out = tmp_path / "out" / "teacher.pth"
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    assert main([str(tmp_path / "run"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dinov2-export: error: ") and message in err, err
    assert out.read_bytes() == b"the previous export"  # atomic: old file intact, no temporary left
    assert [p.name for p in out.parent.iterdir()] == ["teacher.pth"]
    assert not marker.exists()


def test_success_replaces_the_output_atomically(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "teacher.safetensors"
    out.write_bytes(b"the previous export")
    assert main([str(run_dir), str(out)]) == 0
    assert "blocks.0.attn.qkv.weight" in load_state_dict_from(str(out))
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.safetensors"]


def test_read_only_target_directory_in_a_real_process(trained, tmp_path):
    """The installed command, as a user runs it: one line on stderr, exit 2, no traceback. Root
    ignores permissions, so as root the process runs without the capability that lets it."""
    _, run_dir = trained
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    command = [sys.executable, "-m", "dinov2.cli.export", str(run_dir), str(locked / "teacher.pth")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only to this process")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert f"cannot write {locked / 'teacher.pth'}: Permission denied" in done.stderr
    assert list(locked.iterdir()) == []


def _small_file_limit():  # in the child: files may not grow past 20 kB (EFBIG, like a full disk)
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_write_that_fails_midway_leaves_the_previous_export(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "teacher.pth"
    out.write_bytes(b"the previous export")
    command = [sys.executable, "-m", "dinov2.cli.export", str(run_dir), str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_small_file_limit)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"dinov2-export: error: cannot write {out}: ") and "Traceback" not in done.stderr
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.pth"]
