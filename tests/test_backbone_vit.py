"""The ViT's token preparation, packing, outputs and intermediate layers, from the definitions."""

import pytest
import torch

from chunked_keys import chunk_block_keys
from conftest import randomize_
from dinov2.hub.filters import backbone_filter_fn
from dinov2.models.pos_embed import resample_patch_pos_embed
from dinov2.models.vision_transformer import DinoVisionTransformer, vit_base, vit_giant2, vit_large, vit_small


def tiny(tiny_vit_kwargs, **overrides):
    torch.manual_seed(0)
    return randomize_(DinoVisionTransformer(**{**tiny_vit_kwargs, **overrides})).eval()


def manual_forward(model, x, masks=None):
    """Tokens built by hand from the definition: patches (masked -> mask token), cls, pos, registers."""
    p = model.patch_size
    b, _, h, w = x.shape
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), -1)
    tokens = patches @ model.patch_embed.proj.weight.reshape(model.embed_dim, -1).T + model.patch_embed.proj.bias
    if masks is not None:
        tokens = torch.where(masks[..., None], model.mask_token[None], tokens)
    native = int((model.pos_embed.shape[1] - 1) ** 0.5)
    if (h // p, w // p) == (native, native):
        pos = model.pos_embed
    else:
        pos = torch.cat(
            [model.pos_embed[:, :1], resample_patch_pos_embed(
                model.pos_embed[:, 1:], (h // p, w // p), interpolate_offset=model.interpolate_offset,
                antialias=model.interpolate_antialias)], dim=1)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1) + pos
    if model.register_tokens is not None:
        tokens = torch.cat([tokens[:, :1], model.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
    per_block = []
    for block in model.blocks:
        tokens = block(tokens)
        per_block.append(tokens)
    return tokens, per_block


@pytest.mark.parametrize("size", [(56, 56), (42, 70), (28, 28)])
@pytest.mark.parametrize("registers", [0, 2])
def test_forward_features_matches_definition(tiny_vit_kwargs, size, registers):
    model = tiny(tiny_vit_kwargs, num_register_tokens=registers)
    x = torch.randn(2, 3, *size)
    out = model.forward_features(x)
    prenorm, _ = manual_forward(model, x)
    normed = model.norm(prenorm)
    torch.testing.assert_close(out["x_prenorm"], prenorm)
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1 : 1 + registers])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + registers :])
    assert out["x_norm_patchtokens"].shape == (2, (size[0] // 14) * (size[1] // 14), 64)
    torch.testing.assert_close(model(x), normed[:, 0])


def test_masked_patches_become_mask_token_before_pos_embed(tiny_vit_kwargs):
    model = tiny(tiny_vit_kwargs)
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    masks[1, 3] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    # A masked token is mask_token + its position embedding, whatever the image content.
    torch.testing.assert_close(tokens[0, 1 + 5], model.mask_token[0] + model.pos_embed[0, 1 + 5])
    out = model.forward_features(x, masks=masks)
    prenorm, _ = manual_forward(model, x, masks)
    torch.testing.assert_close(out["x_prenorm"], prenorm)
    assert out["masks"] is masks


def test_packed_list_equals_separate_passes(tiny_vit_kwargs):
    model = tiny(tiny_vit_kwargs, num_register_tokens=1)
    globals_, locals_ = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) > 0.6
    outs = model.forward_features([globals_, locals_], [masks, None])
    assert isinstance(outs, list) and len(outs) == 2
    for out, (x, m) in zip(outs, [(globals_, masks), (locals_, None)]):
        want = model.forward_features(x, masks=m)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[key], want[key], atol=1e-5, rtol=1e-5)


def test_packed_list_gradients_equal_separate_passes(tiny_vit_kwargs):
    model = tiny(tiny_vit_kwargs).train()
    xs = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)]
    outs = model.forward_features(xs)
    sum(o["x_norm_clstoken"].pow(2).sum() for o in outs).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "mask_token" not in packed_grads and len(packed_grads) == len(list(model.parameters())) - 1
    model.zero_grad()
    sum(model.forward_features(x)["x_norm_clstoken"].pow(2).sum() for x in xs).backward()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, [0, 2], [2, 0]])
def test_intermediate_layers(tiny_vit_kwargs, n):
    model = tiny(tiny_vit_kwargs, num_register_tokens=2)
    x = torch.randn(2, 3, 42, 56)
    _, per_block = manual_forward(model, x)
    wanted = sorted(range(3 - n, 3) if isinstance(n, int) else n)
    outs = model.get_intermediate_layers(x, n=n, return_class_token=True)
    assert len(outs) == len(wanted)
    for (patches, cls), index in zip(outs, wanted):
        normed = model.norm(per_block[index])
        torch.testing.assert_close(patches, normed[:, 3:])
        torch.testing.assert_close(cls, normed[:, 0])
    raw = model.get_intermediate_layers(x, n=n, norm=False)
    for patches, index in zip(raw, wanted):
        torch.testing.assert_close(patches, per_block[index][:, 3:])
    maps = model.get_intermediate_layers(x, n=n, reshape=True)
    for grid, flat in zip(maps, model.get_intermediate_layers(x, n=n)):
        assert grid.shape == (2, 64, 3, 4)
        torch.testing.assert_close(grid[:, :, 1, 2], flat[:, 1 * 4 + 2])


def test_intermediate_layers_out_of_range(tiny_vit_kwargs):
    with pytest.raises(ValueError, match="blocks 0..2"):
        tiny(tiny_vit_kwargs).get_intermediate_layers(torch.randn(1, 3, 56, 56), n=[3])


def test_block_chunks_keep_flat_keys_and_official_chunked_weights_load(tiny_vit_kwargs):
    """``block_chunks`` (an FSDP grouping only) changes no key; the weights of an official model built with
    ``block_chunks=2`` (keys ``blocks.{chunk}.{i}``) load into the flat model through the filter and give
    the same outputs."""
    flat = tiny(tiny_vit_kwargs, depth=4)
    grouped = DinoVisionTransformer(**{**tiny_vit_kwargs, "depth": 4, "block_chunks": 2}).eval()
    assert list(grouped.state_dict()) == list(flat.state_dict())
    assert "blocks.3.attn.qkv.weight" in grouped.state_dict() and grouped.block_chunks == 2
    official = chunk_block_keys(flat.state_dict(), chunks=2, depth=4)
    assert "blocks.0.1.attn.qkv.weight" in official and "blocks.1.2.attn.qkv.weight" in official
    with pytest.raises(RuntimeError, match="blocks.1.2.attn.qkv.weight"):
        grouped.load_state_dict(official)  # not as it is
    grouped.load_state_dict(backbone_filter_fn(official, grouped), strict=True)
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(grouped(x), flat(x))
    for got, want in zip(grouped.get_intermediate_layers(x, n=[1, 3]), flat.get_intermediate_layers(x, n=[1, 3])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("block_chunks", [-1, 3])
def test_block_chunks_must_divide_depth(tiny_vit_kwargs, block_chunks):
    with pytest.raises(ValueError, match=f"block_chunks={block_chunks} must be 0 or divide depth=4"):
        DinoVisionTransformer(**{**tiny_vit_kwargs, "depth": 4, "block_chunks": block_chunks})


RELEASED_SHAPES = {  # from the released *_pretrain.pth checkpoints (img_size 518, patch 14)
    vit_small: {"pos_embed": (1, 1370, 384), "blocks.11.mlp.fc1.weight": (1536, 384)},
    vit_base: {"pos_embed": (1, 1370, 768), "blocks.11.attn.qkv.weight": (2304, 768)},
    vit_large: {"pos_embed": (1, 1370, 1024), "blocks.23.ls2.gamma": (1024,)},
    vit_giant2: {"pos_embed": (1, 1370, 1536), "blocks.39.mlp.w12.weight": (8192, 1536),
                 "blocks.39.mlp.w3.weight": (1536, 4096)},
}


@pytest.mark.parametrize("builder", list(RELEASED_SHAPES))
def test_builders_match_released_key_shapes(builder):
    kwargs = dict(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, num_register_tokens=4)
    if builder is vit_giant2:
        kwargs["ffn_layer"] = "swiglufused"
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in builder(**kwargs).state_dict().items()}
    for key, shape in RELEASED_SHAPES[builder].items():
        assert shapes[key] == shape, key
    dim = RELEASED_SHAPES[builder]["pos_embed"][2]
    assert shapes["cls_token"] == (1, 1, dim) and shapes["mask_token"] == (1, dim)
    assert shapes["register_tokens"] == (1, 4, dim) and shapes["patch_embed.proj.weight"] == (dim, 3, 14, 14)


def test_identity_ffn_and_no_biases(tiny_vit_kwargs):
    model = tiny(tiny_vit_kwargs, ffn_layer="identity", qkv_bias=False, proj_bias=False, ffn_bias=False)
    keys = set(model.state_dict())
    assert not any(".mlp." in k for k in keys) and "blocks.0.attn.qkv.bias" not in keys
    assert "blocks.0.attn.proj.bias" not in keys
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(model.forward_features(x)["x_prenorm"], manual_forward(model, x)[0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.randn(1, 1, 56, 56)), "3 input channels"),
        (lambda m: m(torch.randn(1, 3, 50, 56)), "multiple of the patch size"),
        (lambda m: m.forward_features(torch.randn(2, 3, 56, 56), masks=torch.zeros(2, 15, dtype=torch.bool)), r"\(2, 16\)"),
        (lambda m: m.forward_features([torch.randn(1, 3, 56, 56)] * 2, [None]), "2 inputs but 1 masks"),
        (lambda m: m.forward_features(torch.randn(1, 3, 56, 56), masks=torch.zeros(1, 16)), "boolean"),
        (lambda m: m.forward_features([]), "empty"),
    ],
)
def test_bad_input_is_named(tiny_vit_kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny(tiny_vit_kwargs))


def test_unknown_ffn_layer(tiny_vit_kwargs):
    with pytest.raises(ValueError, match="swiglufused"):
        DinoVisionTransformer(**{**tiny_vit_kwargs, "ffn_layer": "gelu"})


def test_layer_norm_upcasts_low_precision_parameters_for_a_float32_stream():
    """FSDP hands bf16 norm weights to the float32 residual stream: the norm runs in float32."""
    from dinov2.layers.layer_norm import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(5, 16)
    want = torch.nn.functional.layer_norm(x, (16,), norm.weight.bfloat16().float(), norm.bias.bfloat16().float(), 1e-6)
    norm.bfloat16()
    got = norm(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # otherwise exactly nn.LayerNorm
