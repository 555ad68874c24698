"""AdamW parameter groups: layer-wise decay, patch-embed multiplier, no decay on biases/norms/gammas."""

import pytest
import torch

from dinov2.configs import load_config
from dinov2.train.param_groups import apply_schedule_to_groups, build_param_groups, layer_id, param_settings
from dinov2.train.ssl_meta_arch import SSLMetaArch


@pytest.mark.parametrize(
    "name, expected",
    [
        ("backbone.cls_token", 0), ("backbone.pos_embed", 0), ("backbone.patch_embed.proj.weight", 0),
        ("backbone.mask_token", 0), ("backbone.register_tokens", 0),
        ("backbone.blocks.0.attn.qkv.weight", 1), ("backbone.blocks.11.mlp.fc1.bias", 12),
        ("backbone.norm.weight", 13), ("dino_head.mlp.0.weight", 13), ("ibot_head.last_layer.weight", 13),
    ],
)
def test_layer_ids(name, expected):
    assert layer_id(name, depth=12) == expected


def test_settings_follow_the_recipe():
    s = param_settings("backbone.patch_embed.proj.weight", 12, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    assert s["lr_multiplier"] == pytest.approx(0.9**13 * 0.2) and s["wd_multiplier"] == 1.0
    s = param_settings("backbone.blocks.11.ls1.gamma", 12, 0.9, 0.2)
    assert s["lr_multiplier"] == pytest.approx(0.9) and s["wd_multiplier"] == 0.0
    s = param_settings("dino_head.last_layer.parametrizations.weight.original1", 12, 0.9, 0.2)
    assert s["is_last_layer"] and s["lr_multiplier"] == 1.0
    assert param_settings("backbone.blocks.3.norm2.bias", 12, 0.9, 0.2)["wd_multiplier"] == 0.0


def test_groups_cover_every_trainable_parameter_once_and_apply_schedule():
    # block_chunks (an FSDP grouping only) leaves the parameter names flat: blocks.{i}
    cfg = load_config(None, ["student.arch=vit_small", "student.depth=2", "student.embed_dim=32", "student.num_heads=2",
                             "student.block_chunks=2",
                             "dino.head_n_prototypes=16", "ibot.head_n_prototypes=16", "ibot.separate_head=true",
                             "crops.global_crops_size=28", "crops.local_crops_size=14"])
    model = SSLMetaArch(cfg)
    groups = build_param_groups(model.student.named_parameters(), depth=2, layerwise_decay=0.5, patch_embed_lr_mult=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.student.parameters())
    settings = {tuple(v for k, v in g.items() if k != "params") for g in groups}
    assert len(settings) == len(groups)  # fused: one group per distinct setting
    optimizer = torch.optim.AdamW(groups)
    apply_schedule_to_groups(optimizer.param_groups, lr=1.0, last_layer_lr=0.0, weight_decay=0.04)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.student.named_parameters())
    assert by_param[id(named["backbone.patch_embed.proj.weight"])]["lr"] == pytest.approx(0.5**3 * 0.1)
    assert by_param[id(named["backbone.blocks.1.attn.qkv.weight"])]["lr"] == pytest.approx(0.5)
    assert by_param[id(named["backbone.blocks.1.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["dino_head.mlp.0.weight"])]["weight_decay"] == pytest.approx(0.04)
    last = [n for n in named if "last_layer" in n]
    assert last and all(by_param[id(named[n])]["lr"] == 0.0 for n in last)
