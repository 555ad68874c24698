"""dinov2-export --format timm | hf | onnx: each loads in its own library and gives our features.

References are the libraries themselves: timm's own ``checkpoint_filter_fn`` and
``timm.create_model``, ``transformers.AutoModel.from_pretrained``, ``onnxruntime``, and
``torch.nn.functional.interpolate`` for the exportable position-embedding resampling. Where a
library resamples position embeddings by another rule than the backbone was trained with, the
sizes that agree are tested and the ones that do not are shown to differ (as documented).
"""

import json
import sys

import pytest
import torch

from conftest import randomize_
from dinov2.cli.export import main as export_main
from dinov2.export.pos_embed import resample_for_export
from dinov2.hub.description import BackboneDescription
from dinov2.models.pos_embed import resample_patch_pos_embed
from dinov2.models.vision_transformer import build_vit
from export_helpers import train_tiny_run


def description(**changes) -> BackboneDescription:
    fields = dict(arch="vit_small", embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=56, in_chans=3,
                  mlp_ratio=4.0, ffn_layer="mlp", num_register_tokens=0, init_values=1.0, qkv_bias=True,
                  proj_bias=True, ffn_bias=True, interpolate_offset=0.1, interpolate_antialias=False,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return BackboneDescription(**{**fields, **changes})


PLAIN = dict()  # the released recipe: offset 0.1, no antialias
REGISTERS = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)  # the _reg recipe
SWIGLU_REG = dict(REGISTERS, ffn_layer="swiglufused", init_values=None)


def model_of(d: BackboneDescription, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(build_vit(d.arch, **d.builder_kwargs()), seed).eval()


def ours(model, images):
    with torch.no_grad():
        out = model.forward_features(images)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    trainer, run_dir = train_tiny_run(tmp)
    return trainer.model.teacher.backbone.eval(), run_dir


# ---------------------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_exportable_resampling_is_torch_interpolate(offset, antialias):
    side = 5
    grid = torch.randn(1, side * side, 3, generator=torch.Generator().manual_seed(0))
    for h in range(1, 12):
        for w in (1, 3, side, 11):
            expected = grid if (h, w) == (side, side) else resample_patch_pos_embed(
                grid, (h, w), interpolate_offset=offset, antialias=antialias)
            got = resample_for_export(grid, h, w, interpolate_offset=offset, antialias=antialias)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(resample_for_export(grid, side, side, interpolate_offset=offset, antialias=antialias), grid)


# ---------------------------------------------------------------------------- timm


@pytest.mark.parametrize("kind", [PLAIN, REGISTERS, SWIGLU_REG])
def test_timm_filter_matches_timms_own_and_features_agree(kind):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn

    from dinov2.export.timm_format import create_timm_model, dinov2_to_timm

    d = description(**kind)
    model = model_of(d)
    theirs = create_timm_model(d).eval()
    mapped = dinov2_to_timm(model.state_dict(), d.num_register_tokens)
    reference = checkpoint_filter_fn(dict(model.state_dict()), theirs)  # timm's own conversion
    assert mapped.keys() == reference.keys() and all(torch.equal(mapped[k], reference[k]) for k in mapped)
    theirs.load_state_dict(mapped, strict=True)
    r = d.num_register_tokens
    # Training size: equal for every recipe; other sizes: timm's antialiased resampling is the _reg rule.
    for size, agrees in [((56, 56), True), ((70, 42), bool(r))]:
        images = torch.randn(2, 3, *size)
        cls, patches = ours(model, images)
        with torch.no_grad():
            tokens = theirs.forward_features(images)
        close = torch.allclose(tokens[:, 0], cls, atol=1e-5) and torch.allclose(tokens[:, 1 + r:], patches, atol=1e-5)
        assert close == agrees, (size, kind)
    assert timm.__version__


def test_timm_export_loads_through_timm_create_model(run, tmp_path, capsys):
    pytest.importorskip("timm")
    import timm

    teacher, run_dir = run
    out = tmp_path / "timm.safetensors"
    assert export_main([str(run_dir), str(out), "--format", "timm"]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_small_patch14_dinov2', pretrained=True, pretrained_cfg_overlay=" in printed
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **json.loads(meta["timm_kwargs"])).eval()
    images = torch.randn(2, 1, 28, 28)
    cls, patches = ours(teacher, images)
    with torch.no_grad():
        tokens = model.forward_features(images)
    torch.testing.assert_close(tokens[:, 0], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], patches, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- Hugging Face


def _hf_features(directory, images):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModel.from_pretrained(str(directory), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        out = model.eval()(pixel_values=images)
    return type(model).__name__, out.pooler_output, out.last_hidden_state


@pytest.mark.parametrize("kind, other_sizes_agree", [
    (PLAIN, False),  # transformers resamples without the official 0.1 offset
    (dict(interpolate_offset=0.0), True),
    (REGISTERS, True),  # Dinov2WithRegistersModel: antialiased, by size: the _reg rule
    (SWIGLU_REG, True),
])
def test_hf_directory_loads_as_dinov2_model_with_our_features(kind, other_sizes_agree, tmp_path):
    pytest.importorskip("transformers")
    from dinov2.export.hf_format import write_hf

    d = description(**kind)
    model = model_of(d)
    write_hf(model.state_dict(), d, str(tmp_path))
    r = d.num_register_tokens
    for size, agrees in [((56, 56), True), ((70, 42), other_sizes_agree), ((84, 84), other_sizes_agree)]:
        images = torch.randn(2, 3, *size)
        cls, patches = ours(model, images)
        name, pooled, hidden = _hf_features(tmp_path, images)
        assert name == ("Dinov2WithRegistersModel" if r else "Dinov2Model")
        close = torch.allclose(pooled, cls, atol=1e-5) and torch.allclose(hidden[:, 1 + r:], patches, atol=1e-5)
        assert close == agrees, (size, kind)


def test_hf_export_from_a_run_with_its_preprocessing(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    teacher, run_dir = run
    out = tmp_path / "hf"
    assert export_main([str(run_dir), str(out), "--format", "hf"]) == 0
    assert f"transformers.AutoModel.from_pretrained('{out}')" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_channels"] == 1 and config["dinov2_backbone"]["mean"] == [0.13]
    images = torch.randn(3, 1, 28, 28)
    cls, patches = ours(teacher, images)
    _, pooled, hidden = _hf_features(out, images)
    torch.testing.assert_close(pooled, cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[:, 1:], patches, atol=1e-5, rtol=1e-5)
    assert transformers.__version__
    # Again into the same directory: replaced whole, nothing stale left beside it.
    assert export_main([str(run_dir), str(out), "--format", "hf"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_hf_preprocessor_matches_the_description(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dinov2.export.hf_format import write_hf

    d = description(resize_ratio=1.25)
    write_hf(model_of(d).state_dict(), d, str(tmp_path))
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    assert list(processor.image_mean) == list(d.mean) and list(processor.image_std) == list(d.std)
    assert processor.crop_size["height"] == 56 and processor.size["shortest_edge"] == 70


# ---------------------------------------------------------------------------- ONNX


def _onnx_session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", [PLAIN, REGISTERS])
def test_onnx_dynamic_batch_and_size_with_bicubic_pos_embed(kind, tmp_path):
    pytest.importorskip("onnxscript")
    from dinov2.export.onnx_format import read_onnx_description, write_onnx

    d = description(**kind)
    model = model_of(d)
    write_onnx(model, d, str(tmp_path / "m.onnx"))
    assert read_onnx_description(str(tmp_path / "m.onnx")) == d
    session = _onnx_session(tmp_path / "m.onnx")
    for batch, size in [(1, (56, 56)), (3, (70, 42)), (2, (98, 126))]:  # training grid, smaller, larger
        images = torch.randn(batch, 3, *size)
        cls, patches = ours(model, images)
        outputs = session.run(None, {"pixel_values": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(outputs[0]), cls, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(outputs[1]), patches, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_onnx_export_from_a_run(run, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    teacher, run_dir = run
    out = tmp_path / "teacher.onnx"
    assert export_main([str(run_dir), str(out)]) == 0
    assert "onnxruntime.InferenceSession" in capsys.readouterr().out
    session = _onnx_session(out)
    for size in [(28, 28), (42, 35)]:
        images = torch.randn(2, 1, *size)
        cls, patches = ours(teacher, images)
        got_cls, got_patches = session.run(None, {"pixel_values": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(got_cls), cls, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got_patches), patches, atol=1e-4, rtol=1e-4)


def test_formats_refuse_what_they_cannot_express():
    from dinov2.export.hf_format import hf_config
    from dinov2.export.timm_format import timm_model_args

    with pytest.raises(ValueError, match="student.proj_bias or student.ffn_bias false cannot be exported to hf"):
        hf_config(description(ffn_bias=False))
    with pytest.raises(ValueError, match="ffn_bias=false cannot be exported to timm"):
        timm_model_args(description(ffn_bias=False))
    assert sys.modules["dinov2.export.hf_format"]
