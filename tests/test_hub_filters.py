"""Loading backbone weights of another block layout or image size: dinov2.hub.filters.

Released checkpoints and our models have flat ``blocks.{i}`` keys, the released ones a 518-px position
embedding; official training checkpoints chunk their blocks (``blocks.{chunk}.{i}``) and recipes train at
224 px. The filter maps the weights onto the model; checked against every shipped recipe (on the meta
device: shapes only) and on real values."""

import pytest
import torch

from dinov2.configs import load_config
from dinov2.configs import CONFIG_DIR
from dinov2.hub import backbones
from chunked_keys import chunk_block_keys
from dinov2.hub.filters import WeightsLayoutError, backbone_filter_fn, flat_block_keys
from dinov2.models.vision_transformer import build_vit
from dinov2.state_dicts import key_mismatches
from dinov2.train.ssl_meta_arch import build_backbone

RELEASED = {"vit_small": backbones.dinov2_vits14, "vit_base": backbones.dinov2_vitb14,
            "vit_large": backbones.dinov2_vitl14, "vit_giant2": backbones.dinov2_vitg14}


def _shapes(state):
    return {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("recipe", sorted(f"train/{p.name}" for p in (CONFIG_DIR / "train").glob("*.yaml")))
def test_released_layout_fits_every_shipped_recipe(recipe):
    """Flat 518-px weights (the released layout, or a dinov2-export file of the recipe's architecture), and
    the same weights with official chunked keys, load into the recipe's training backbone after the filter."""
    cfg = load_config(recipe)
    with torch.device("meta"):
        model = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=True)
        if cfg.student.arch in RELEASED and cfg.student.embed_dim is None and cfg.student.patch_size == 14:
            source = RELEASED[cfg.student.arch](pretrained=False, ffn_layer=str(cfg.student.ffn_layer))
        else:  # no released weights: a dinov2-export file of the recipe's architecture (flat keys)
            source = build_backbone(cfg.student, 518, with_drop_path=False)
    state = source.state_dict()
    assert not any(k.count(".") > 2 and k.split(".")[2].isdigit() for k in state)  # flat keys
    depth = len(source.blocks)
    for weights in (state, chunk_block_keys(state, 2 if depth % 2 == 0 else 1, depth)):
        assert key_mismatches(_shapes(model.state_dict()), _shapes(weights))  # does not fit as it is
        filtered = backbone_filter_fn(weights, model)
        assert key_mismatches(_shapes(model.state_dict()), _shapes(filtered)) == []


def test_chunked_block_keys_become_flat():
    flat = {"blocks.0.norm1.weight": 0, "blocks.3.mlp.fc1.bias": 1, "norm.weight": 2, "pos_embed": 3}
    chunked = {"blocks.0.0.norm1.weight": 0, "blocks.1.3.mlp.fc1.bias": 1, "norm.weight": 2, "pos_embed": 3}
    assert flat_block_keys(chunked) == flat
    assert flat_block_keys(flat) == flat
    # four chunks of one block: the global index decides, not the chunk
    assert flat_block_keys({f"blocks.{i}.{i}.x": i for i in range(4)}) == {f"blocks.{i}.x": i for i in range(4)}
    with pytest.raises(ValueError, match="'blocks.3.x'"):  # one block named twice: not one backbone
        flat_block_keys({"blocks.3.x": 0, "blocks.1.3.x": 1})


@pytest.mark.parametrize("source_chunks", [1, 2, 4])
def test_values_survive_the_official_chunked_layout(source_chunks):
    kwargs = dict(img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=0.5)
    torch.manual_seed(0)
    source = build_vit("vit_small", **kwargs).eval()
    target = build_vit("vit_small", block_chunks=2, **kwargs).eval()
    official = chunk_block_keys(source.state_dict(), source_chunks, depth=4)
    target.load_state_dict(backbone_filter_fn(official, target))
    images = torch.randn(2, 3, 56, 56)
    assert torch.equal(target(images), source(images))


def test_pos_embed_is_resampled_as_the_source_model_resamples_it():
    """A 518-px source loaded into a 224-px model: at 224 px both compute the same features."""
    kwargs = dict(patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=0.5, block_chunks=0)
    torch.manual_seed(0)
    source = build_vit("vit_small", img_size=518, **kwargs).eval()
    target = build_vit("vit_small", img_size=224, **kwargs).eval()
    filtered = backbone_filter_fn(source.state_dict(), target)
    assert filtered["pos_embed"].shape == target.pos_embed.shape
    target.load_state_dict(filtered)
    images = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(target(images), source(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("source_ffn,target_ffn,fix", [
    ("mlp", "swiglufused", "student.ffn_layer=mlp"),
    ("swiglufused", "mlp", "student.ffn_layer=swiglufused"),
    ("mlp", "swiglu", "student.ffn_layer=mlp"),
])
def test_another_ffn_names_the_key_to_set(source_ffn, target_ffn, fix):
    kwargs = dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2, block_chunks=0)
    with torch.device("meta"):
        source = build_vit("vit_small", ffn_layer=source_ffn, **kwargs)
        target = build_vit("vit_small", ffn_layer=target_ffn, **kwargs)
    with pytest.raises(WeightsLayoutError, match=fix) as error:
        backbone_filter_fn(source.state_dict(), target, source="released.pth", ffn_key="student.ffn_layer")
    assert "released.pth" in str(error.value)
