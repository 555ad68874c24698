"""torch.hub entry points: names, signatures, offline loading of saved weights, clear errors."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hubconf
from chunked_keys import chunk_block_keys
from dinov2.hub.weights import backbone_url, linear_head_url

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=28, depth=2)  # vit_small widths, fewer blocks and patches: fast but real keys

BACKBONES = ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"]
ALL_ENTRIES = BACKBONES + [f"{b}_reg" for b in BACKBONES]


@pytest.mark.parametrize("name", ALL_ENTRIES + [f"{n}_lc" for n in ALL_ENTRIES])
def test_entry_point_signature(name):
    fn = getattr(hubconf, name)
    params = inspect.signature(fn).parameters
    assert params["pretrained"].kind is inspect.Parameter.KEYWORD_ONLY and params["pretrained"].default is True
    assert "weights" in params and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_released_urls():
    assert backbone_url("vit_small", 14) == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert backbone_url("vit_giant2", 14, 4) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth")
    assert linear_head_url("vit_large", 14, 4) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_linear4_head.pth")
    assert linear_head_url("vit_base", 14, 1, 4).endswith("dinov2_vitb14/dinov2_vitb14_reg4_linear_head.pth")


def test_hubconf_imports_nothing_beyond_torch():
    code = (
        "import sys, hubconf\n"
        "heavy = {'numpy.linalg', 'omegaconf', 'fvcore', 'faiss', 'submitit', 'scipy', 'PIL', 'torchvision', "
        "'safetensors', 'xformers', 'iopath', 'sklearn'} & set(sys.modules)\n"
        "assert hubconf.dependencies == ['torch'], hubconf.dependencies\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("[]", "['numpy.linalg']"), out.stdout  # torch itself may import numpy


def test_reg_variants_use_antialiased_interpolation_without_offset():
    reg = hubconf.dinov2_vits14_reg(pretrained=False, **SMALL)
    plain = hubconf.dinov2_vits14(pretrained=False, **SMALL)
    assert (reg.num_register_tokens, reg.interpolate_antialias, reg.interpolate_offset) == (4, True, 0.0)
    assert (plain.num_register_tokens, plain.interpolate_antialias, plain.interpolate_offset) == (0, False, 0.1)
    assert plain.patch_size == 14 and plain.block_chunks == 0 and "blocks.1.norm1.weight" in plain.state_dict()
    assert plain.blocks[0].ls1.gamma.detach()[0].item() == 1.0  # init_values 1.0


def test_classifier_entries_build_the_released_backbones():
    """The ``*_lc`` entries share the backbones' released settings: SwiGLU for ViT-g, 4 registers for _reg."""
    with torch.device("meta"):
        giant = hubconf.dinov2_vitg14_reg_lc(pretrained=False, img_size=28, depth=1)
        small = hubconf.dinov2_vits14_lc(pretrained=False, layers=1, **SMALL)
    assert "blocks.0.mlp.w12.weight" in giant.backbone.state_dict() and giant.backbone.num_register_tokens == 4
    assert (giant.backbone.interpolate_antialias, giant.backbone.interpolate_offset) == (True, 0.0)
    assert "blocks.0.mlp.fc1.weight" in small.backbone.state_dict() and small.backbone.num_register_tokens == 0


@pytest.mark.parametrize("form", ["path", "file_url", "safetensors", "official_chunked"])
def test_weights_from_local_file_give_identical_features(tmp_path, form):
    """Also an official training checkpoint's layout (blocks.{chunk}.{i}): read as the flat blocks.{i}."""
    torch.manual_seed(0)
    source = hubconf.dinov2_vits14_reg(pretrained=False, **SMALL).eval()
    if form == "official_chunked":
        path = tmp_path / "w.pth"
        torch.save(chunk_block_keys(source.state_dict(), chunks=2, depth=2), path)
    elif form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save(source.state_dict(), path)
    weights = path.as_uri() if form == "file_url" else str(path)
    loaded = hubconf.dinov2_vits14_reg(weights=weights, **SMALL).eval()
    x = torch.randn(2, 3, 42, 28)
    torch.testing.assert_close(loaded.forward_features(x)["x_norm_patchtokens"], source.forward_features(x)["x_norm_patchtokens"])


def test_torch_hub_load_local(tmp_path):
    torch.manual_seed(0)
    source = hubconf.dinov2_vits14(pretrained=False, **SMALL).eval()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = torch.hub.load(str(REPO), "dinov2_vits14", source="local", weights=str(tmp_path / "w.pth"), **SMALL)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(model.eval()(x), source(x))


def test_linear_classifier_concatenates_four_class_tokens_and_mean_patch(tmp_path):
    torch.manual_seed(0)
    backbone = hubconf.dinov2_vits14(pretrained=False, img_size=28, depth=4).eval()
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    head = torch.nn.Linear(5 * 384, 1000)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    clf = hubconf.dinov2_vits14_lc(weights=str(tmp_path / "head.pth"), backbone_weights=str(tmp_path / "backbone.pth"),
                                   img_size=28, depth=4).eval()
    x = torch.randn(2, 3, 28, 28)
    outs = backbone.get_intermediate_layers(x, n=4, return_class_token=True)
    features = torch.cat([outs[i][1] for i in range(4)] + [outs[3][0].mean(1)], dim=1)
    torch.testing.assert_close(clf(x), head(features))
    one = hubconf.dinov2_vits14_lc(layers=1, pretrained=False, img_size=28, depth=4)
    assert one.linear_head.in_features == 2 * 384


def test_wrong_checkpoint_names_the_keys(tmp_path):
    torch.save(hubconf.dinov2_vits14(pretrained=False, **SMALL).state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="keys missing from the file: register_tokens"):
        hubconf.dinov2_vits14_reg(weights=str(tmp_path / "plain.pth"), **SMALL)
    with pytest.raises(ValueError, match=r"shape mismatches: .*pos_embed"):
        hubconf.dinov2_vits14(weights=str(tmp_path / "plain.pth"), img_size=42, depth=2)


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="not a released name .*'LVD142M'"):
        hubconf.dinov2_vits14(weights="LVD999M", **SMALL)
