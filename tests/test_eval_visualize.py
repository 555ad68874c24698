import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval.visualize import (
    cls_attention_from_qkv,
    foreground_mask,
    patch_features_and_attention,
    pca_rgb,
    visualize,
)
from dinov2.models.vision_transformer import DinoVisionTransformer


def tiny_vit(registers=0, seed=0):
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4,
                                  init_values=1.0, block_chunks=0, num_register_tokens=registers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights: peaked attention, nothing hides behind ~uniform maps
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def planted_grids(seed=0, dim=16):
    """Two images; a blob that does not touch the border is foreground, with 3 directions of
    variation inside it; the background is one other vector plus tiny noise."""
    rng = np.random.default_rng(seed)
    fg_dir, bg = rng.normal(size=dim) * 5, rng.normal(size=dim) * 5
    inner = rng.normal(size=(3, dim))
    grids, truth = [], []
    for h, w, box in ((6, 7, (1, 4, 2, 6)), (5, 5, (2, 4, 1, 3))):
        g = bg + 0.01 * rng.normal(size=(h, w, dim))
        m = np.zeros((h, w), dtype=bool)
        m[box[0] : box[1], box[2] : box[3]] = True
        g[m] = fg_dir + rng.normal(size=(m.sum(), 3)) @ inner
        grids.append(g)
        truth.append(m)
    return grids, truth


@pytest.mark.parametrize("flip", [False, True])
def test_background_removal_finds_the_planted_object(flip):
    grids, truth = planted_grids()
    if flip:  # the PCA sign is arbitrary; orientation must not depend on it
        grids = [-g for g in grids]
    masks, _ = foreground_mask(grids)
    for m, t in zip(masks, truth):
        np.testing.assert_array_equal(m, t)
    rgbs, fg = pca_rgb(grids)
    for rgb, t in zip(rgbs, truth):
        assert rgb.shape == t.shape + (3,)
        assert (rgb[~t] == 0).all()  # background is black
        assert rgb[t].std(axis=0).min() > 0.05  # three components vary over the object
        assert rgb.min() >= 0 and rgb.max() <= 1


def test_without_background_removal_every_patch_is_coloured():
    grids, _ = planted_grids(1)
    rgbs, masks = pca_rgb(grids, remove_background=False)
    assert all(m.all() for m in masks)
    assert np.concatenate([r.reshape(-1, 3) for r in rgbs]).max(axis=0).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("registers", [0, 2])
def test_class_attention_equals_what_the_model_computes(registers):
    """Independent check: attention weights x values must equal the class token's
    attention output that the model's own kernel hands to ``attn.proj``."""
    model = tiny_vit(registers)
    last = model.blocks[-1]
    seen = {}
    h1 = last.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = last.attn.proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0]))
    x = torch.randn(1, 3, 42, 28)
    with torch.inference_mode():
        model.forward_features(x)
        h1.remove(), h2.remove()
        normed = last.norm1(seen["x"])
        att = cls_attention_from_qkv(normed, last.attn.qkv, 4, last.attn.scale)  # [1, H, N]
        n = normed.shape[1]
        v = last.attn.qkv(normed).reshape(1, n, 3, 4, 8)[:, :, 2]  # [1, N, H, hd]
        cls_out = torch.einsum("bhn,bnhd->bhd", att, v).reshape(-1)
    torch.testing.assert_close(cls_out, seen["out"].reshape(1, n, -1)[0, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(att.sum(-1), torch.ones(1, 4))
    maps = patch_features_and_attention(model, x)
    assert maps.attention.shape == (4, 3, 2) and maps.patch_grid.shape == (3, 2, 32)
    # the per-patch maps are the patch part of the full attention row (class + registers dropped)
    np.testing.assert_allclose(maps.attention.reshape(4, -1), att[0, :, 1 + registers :].numpy(), rtol=1e-5)


def test_visualize_writes_pngs_of_the_right_size(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    model = tiny_vit()
    res = visualize(model, [str(tmp_path / "wide.png"), "skimage:chelsea"], str(tmp_path / "out"), img_size=28,
                    progress=False)
    assert [im["image"] for im in res["images"]] == ["wide", "chelsea"]
    wide = res["images"][0]
    assert wide["size"] == [56, 28]  # short side 28, long side 56 (a multiple of the patch)
    assert set(wide["files"]) == {"pca", "overview"} | {f"attn_head{i}" for i in range(4)}
    pca = Image.open(wide["files"]["pca"])
    assert pca.size == (56 * 16, 28 * 16) and pca.mode == "RGB"  # enlarged 16 times: short side 448
    assert np.asarray(pca).std() > 0  # not a constant picture
    # one crisp square per patch: 14 px patches enlarged 16 times are 224 px blocks of one colour
    block = np.asarray(pca)[:224, :224]
    assert (block == block[0, 0]).all()
    head = np.asarray(Image.open(wide["files"]["attn_head0"]))
    assert head.shape == (448, 896, 3) and head.std() > 0
    overview = Image.open(wide["files"]["overview"])
    assert overview.size[0] > 896 * 6 and overview.size[1] > 448  # input, PCA, 4 heads; titles and caption
    assert not model.training


def test_visualize_bad_inputs(tmp_path):
    model = tiny_vit()
    from dinov2.eval.data import DataError

    with pytest.raises(DataError, match="image not found"):
        visualize(model, [str(tmp_path / "missing.png")], str(tmp_path), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder contains no images"):
        visualize(model, [str(tmp_path / "empty")], str(tmp_path), progress=False)
    with pytest.raises(DataError, match="skimage.data has no image"):
        visualize(model, ["skimage:nope"], str(tmp_path), progress=False)


def test_overview_is_labelled_and_captioned(tmp_path):
    """The title strips and the caption hold text (dark pixels on white) above each panel; the panels
    themselves are the enlarged maps (compared pixel for pixel with the single files)."""
    model = tiny_vit()
    res = visualize(model, ["skimage:chelsea"], str(tmp_path), img_size=28, progress=False, label="tiny backbone")
    files = res["images"][0]["files"]
    overview = np.asarray(Image.open(files["overview"]).convert("L"))
    pca = np.asarray(Image.open(files["pca"]).convert("L"))
    height, width = pca.shape
    # Find the PCA panel in the overview: the single file is one panel of it.
    top = overview.shape[0] - height
    found = [x for x in range(0, overview.shape[1] - width + 1) if (overview[top:, x:x + width] == pca).all()]
    assert found, "the PCA panel is not in the overview"
    assert (overview[:top] < 100).any()  # text (caption and titles) above the panels
    assert res["backbones"] == ["tiny backbone"]


def test_comparison_puts_two_backbones_in_labelled_rows(tmp_path):
    from dinov2.eval.visualize import Entry, visualize_comparison

    entries = [Entry("first", tiny_vit(seed=0), img_size=28, short="A"),
               Entry("second", tiny_vit(seed=1), img_size=56, short="B")]
    res = visualize_comparison(entries, ["skimage:chelsea"], str(tmp_path), progress=False, max_heads=2)
    image = res["images"][0]
    assert res["backbones"] == ["first", "second"] and [b["size"] for b in image["backbones"]] == [[42, 28], [84, 56]]
    compare = Image.open(image["files"]["compare"])
    one = Image.open(image["files"]["chelsea_a_pca"])
    assert one.size == (672, 448) and Image.open(image["files"]["chelsea_b_pca"]).size == (672, 448)
    assert compare.size[1] > 2 * 448 and compare.size[0] > 4 * 672  # two rows of input, PCA, 2 heads
    a, b = (np.asarray(Image.open(image["files"][f"chelsea_{r}_attn_head0"])) for r in "ab")
    assert not np.array_equal(a, b)

