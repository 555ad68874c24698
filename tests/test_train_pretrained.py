"""Training on from backbone weights (``student.pretrained_weights``; released or official chunked keys) with a
recipe that sets ``block_chunks``, the FFN error that names the key to set, and the head warm-up
(``train.freeze_backbone_steps``), on tiny models."""

import pytest
import torch
from safetensors.torch import save_file

from dinov2.configs import load_config
from dinov2.models.vision_transformer import build_vit
from dinov2.cli.train import main
from dinov2.train.train import Trainer
from chunked_keys import chunk_block_keys
from tiny import TINY

BACKBONE = dict(patch_size=7, embed_dim=32, depth=2, num_heads=2, in_chans=1, init_values=0.1)


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def released_like(path, img_size=63, ffn_layer="mlp", chunks=0):
    """A backbone file in the released layout (flat block keys, a larger image size) or, with ``chunks``, in an
    official training checkpoint's (``blocks.{chunk}.{i}``); values random."""
    torch.manual_seed(1)
    model = build_vit("vit_small", img_size=img_size, ffn_layer=ffn_layer, **BACKBONE)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(chunk_block_keys(state, chunks, BACKBONE["depth"]) if chunks else state, str(path))
    return model


@pytest.mark.parametrize("file_chunks", [0, 2])
def test_pretrained_weights_load_into_a_chunked_recipe(tmp_path, file_chunks):
    source = released_like(tmp_path / "backbone.safetensors", chunks=file_chunks).eval()
    trainer = Trainer(tiny_cfg(f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}",
                               "student.block_chunks=2"), tmp_path / "run")
    images = torch.randn(2, 1, 28, 28)
    for name in ("student", "teacher"):
        backbone = getattr(trainer.model, name).backbone
        assert backbone.block_chunks == 2 and list(backbone.state_dict()) == list(source.state_dict())  # flat keys
        for key, value in backbone.state_dict().items():
            if key != "pos_embed":
                assert torch.equal(value, source.state_dict()[key]), key
        torch.testing.assert_close(backbone.eval()(images), source(images), rtol=0, atol=1e-5)
    trainer.close()


def test_pretrained_weights_of_another_ffn_name_the_key(tmp_path, capsys):
    released_like(tmp_path / "backbone.safetensors", ffn_layer="mlp")
    assert main(["--output-dir", str(tmp_path / "run"), *TINY, "student.ffn_layer=swiglufused",
                 f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}"]) == 2
    assert "set student.ffn_layer=mlp" in capsys.readouterr().err


@pytest.mark.slow
def test_head_warmup_trains_only_the_heads_then_the_backbone_joins(tmp_path):
    released_like(tmp_path / "backbone.safetensors")
    args = (f"student.pretrained_weights={tmp_path / 'backbone.safetensors'}", "train.freeze_backbone_steps=2",
            "optim.warmup_epochs=0")
    start = Trainer(tiny_cfg(*args, "train.max_steps=1"), tmp_path / "start")
    initial = {k: v.clone() for k, v in start.model.state_dict().items()}
    start.close()
    Trainer(tiny_cfg(*args, "train.max_steps=2"), tmp_path / "run").fit()
    frozen = Trainer(tiny_cfg(*args, "train.max_steps=3"), tmp_path / "run")
    after_warmup = {k: v.clone() for k, v in frozen.model.state_dict().items()}
    for key, value in after_warmup.items():
        if ".backbone." in f".{key}":
            assert torch.equal(value, initial[key]), key  # student and teacher backbones untouched
        elif "head" in key and key.endswith("weight") and "last_layer" not in key:
            assert not torch.equal(value, initial[key]), key  # student and teacher heads learnt
    backbone_params = {id(p) for p in frozen.model.student.backbone.parameters()}
    assert not any(id(p) in backbone_params for p in frozen.optimizer.state)  # no Adam moments for it yet
    frozen.fit()  # step 3: the backbone joins
    moved = [k for k, v in frozen.model.state_dict().items()
             if k.startswith("student.backbone.") and not torch.equal(v, initial[k])]
    assert len(moved) > 10
    # Resumed at the join (the checkpoint has no optimizer state for the backbone): bitwise the uninterrupted run.
    uninterrupted = Trainer(tiny_cfg(*args, "train.max_steps=3"), tmp_path / "uninterrupted")
    uninterrupted.fit()
    reference = uninterrupted.model.state_dict()
    for key, value in frozen.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
