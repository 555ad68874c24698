import pytest
import torch
from safetensors.torch import save_file

from chunked_keys import chunk_block_keys
from dinov2.eval.backbone import BackboneError, infer_backbone_config, resolve_backbone
from dinov2.models.vision_transformer import DinoVisionTransformer, vit_small


def random_state_dict(**kwargs):
    """Released-layout tensors of the given shape, random (a meta-device build gives the
    shapes in no time; a real ViT-S initialisation takes seconds on a small CPU)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vit_small(block_chunks=0, init_values=1.0, **kwargs).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def exported_vits(tmp_path_factory):
    """A ViT-S/14 with 4 registers at img_size 28, saved in both file formats, and a
    reference model holding the same tensors (loaded with plain torch, not our code)."""
    kwargs = dict(patch_size=14, img_size=28, num_register_tokens=4)
    sd = random_state_dict(**kwargs)
    with torch.device("meta"):
        ref = vit_small(block_chunks=0, init_values=1.0, **kwargs)
    ref.load_state_dict(sd, assign=True)
    d = tmp_path_factory.mktemp("export")
    torch.save(sd, d / "backbone.pth")
    save_file(sd, str(d / "backbone.safetensors"))
    return ref.eval(), d


@pytest.mark.parametrize("name", ["backbone.pth", "backbone.safetensors"])
def test_backbone_file_round_trip_gives_identical_features(exported_vits, name):
    ref, d = exported_vits
    model = resolve_backbone(backbone_file=str(d / name), arch="vit_small")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.num_register_tokens == 4 and model.patch_size == 14
    x = torch.randn(2, 3, 28, 42)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x))


def test_inferred_config_reads_the_tensors(exported_vits):
    ref, _ = exported_vits
    cfg = infer_backbone_config(ref.state_dict())
    assert cfg == {"embed_dim": 384, "in_chans": 3, "patch_size": 14, "img_size": 28, "num_register_tokens": 4,
                   "ffn_layer": "mlp", "init_values": 1.0, "depth": 12, "mlp_ratio": 4.0, "qkv_bias": True,
                   "proj_bias": True, "ffn_bias": True}


def test_backbone_file_mismatches_are_named(exported_vits, tmp_path):
    _, d = exported_vits
    path = str(d / "backbone.pth")
    with pytest.raises(BackboneError, match=r"does not match vit_base \(file: embed_dim 384.*shape mismatch"):
        resolve_backbone(backbone_file=path, arch="vit_base")
    with pytest.raises(BackboneError, match="patch_size=16 was given but the file has patch_size=14"):
        resolve_backbone(backbone_file=path, arch="vit_small", patch_size=16)
    with pytest.raises(BackboneError, match="num_register_tokens=0 was given"):
        resolve_backbone(backbone_file=path, arch="vit_small", num_register_tokens=0)
    with pytest.raises(BackboneError, match="does not describe its architecture.*give --arch"):
        resolve_backbone(backbone_file=path)
    tiny = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=4, block_chunks=0)
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(BackboneError, match=r"vit_small \(file: embed_dim 64, 2 blocks; model: embed_dim 384, 12 "
                       r"blocks\); for a non-standard size give --embed-dim, --depth and --num-heads"):
        resolve_backbone(backbone_file=str(tmp_path / "tiny.pth"), arch="vit_small")


def test_not_a_state_dict_and_missing_file(tmp_path):
    torch.save({"teacher": {"backbone": {"x": torch.zeros(1)}}, "step": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(BackboneError, match=r"ckpt.pth: expected a plain state dict .* non-tensor entries teacher \(dict\), step \(int\)"):
        resolve_backbone(backbone_file=str(tmp_path / "ckpt.pth"), arch="vit_small")
    with pytest.raises(BackboneError, match="not found"):
        resolve_backbone(backbone_file=str(tmp_path / "nope.pth"), arch="vit_small")
    with pytest.raises(BackboneError, match="exactly one"):
        resolve_backbone()


def test_hub_name_random_init_is_frozen_and_in_eval_mode():
    model = resolve_backbone(name="dinov2_vits14", weights=None, img_size=28)
    assert not model.training and model.embed_dim == 384
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(BackboneError, match="go with --backbone-file"):
        resolve_backbone(name="dinov2_vits14", arch="vit_small")


def test_half_precision_file_loads_as_float32(tmp_path):
    sd = {k: v.half() for k, v in random_state_dict(patch_size=14, img_size=14).items()}
    torch.save(sd, tmp_path / "half.pth")
    model = resolve_backbone(backbone_file=str(tmp_path / "half.pth"), arch="vit_small")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"].float())


def test_non_standard_size_like_the_mnist_demo(tmp_path):
    """The demo's student: vit_small overridden to width 64, 2 blocks, 4 heads, patch 4, one
    input channel; here also no qkv bias, MLP ratio 2 and official chunked block keys."""
    torch.manual_seed(0)
    ref = vit_small(patch_size=4, img_size=28, in_chans=1, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                    qkv_bias=False, init_values=0.1).eval()
    official = chunk_block_keys(ref.state_dict(), chunks=2, depth=2)
    assert any(k.startswith("blocks.1.1.") for k in official)  # chunked: blocks.{chunk}.{i}
    torch.save(official, tmp_path / "demo.pth")
    path = str(tmp_path / "demo.pth")
    model = resolve_backbone(backbone_file=path, arch="vit_small", embed_dim=64, depth=2, num_heads=4)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x))
    assert model.blocks[0].attn.num_heads == 4
    with pytest.raises(BackboneError, match="give --embed-dim, --depth and --num-heads"):
        resolve_backbone(backbone_file=path, arch="vit_small")
    with pytest.raises(BackboneError, match="go with --backbone-file"):
        resolve_backbone(name="dinov2_vits14", num_heads=4)
