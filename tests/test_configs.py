"""Typed, strict configs: recipes load, unknown keys name the closest valid key, bad values fail."""

import json
import re
import subprocess
import sys
import typing
from enum import Enum

import pytest
from omegaconf import OmegaConf

from dinov2.configs import (
    CONFIG_DIR, Arch, AttentionBackend, ConfigError, FfnLayer, Launcher, Precision, SSLConfig, load_config, save_config,
)
from dinov2.configs.ranges import range_violations, ranged_fields


@pytest.mark.parametrize("recipe", sorted(p.name for p in (CONFIG_DIR / "train").glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(f"train/{recipe}")
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0


def test_released_recipe_values():
    cfg = load_config("train/vitl14.yaml")
    assert (cfg.student.arch, cfg.train.centering, cfg.dino.head_n_prototypes, cfg.ibot.separate_head) == (
        "vit_large", "sinkhorn_knopp", 131072, True)
    assert load_config("train/vitg14.yaml").student.ffn_layer == "swiglufused"
    assert load_config("train/vitl14.yaml").student.ffn_layer == "swiglufused"  # the official vitl14 training recipe


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.base_rl=1", "did you mean 'optim.base_lr'"),
        ("studnet.arch=vit_small", "did you mean 'student'"),
        ("optim.epochs=many", "optim.epochs"),
        ("compute.precision=fp8", "fp32, bf16, fp16"),
        ("train.centering=softmax", "sinkhorn_knopp"),
        ("crops.global_crops_size=225", "multiples of student.patch_size"),
        ("ibot.mask_ratio_min_max=[0.6,0.2]", "mask_ratio_min_max"),
        ("novalue", "key=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"optim.warmup_epoch' in .*recipe.yaml; did you mean 'optim.warmup_epochs'"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("train/nope.yaml")


def test_override_order_and_types():
    cfg = load_config("train/vits14.yaml", ["optim.base_lr=0.5", "student.depth=3"])
    assert cfg.optim.base_lr == 0.5 and cfg.student.depth == 3 and isinstance(cfg.student.depth, int)


# --- ranges (declared next to each key in the schema), enums, YAML errors ---------------------------

@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.every_n_steps=0", r"checkpoint.every_n_steps=0 is out of range: must be >= 1$"),
        ("logging.every_n_steps=0", r"logging.every_n_steps=0 is out of range: must be >= 1$"),
        ("crops.local_crops_number=-2", r"crops.local_crops_number=-2 is out of range: must be >= 0$"),
        ("optim.base_lr=-1", r"optim.base_lr=-1.0 is out of range: must be > 0$"),
        ("teacher.momentum_teacher=2.0", r"teacher.momentum_teacher=2.0 is out of range: must be in \[0, 1\]$"),
        ("student.drop_path_rate=2.0", r"student.drop_path_rate=2.0 is out of range: must be in \[0, 1\)$"),
        ("student.drop_path_rate=1.0", r"must be in \[0, 1\)$"),
        ("compute.num_threads=0", r"compute.num_threads=0 is out of range: must be >= 1 \(or null\)$"),
        ("teacher.teacher_temp=0", r"teacher.teacher_temp=0.0 is out of range: must be > 0$"),
        ("crops.flip_p=1.5", r"crops.flip_p=1.5 is out of range: must be in \[0, 1\]$"),
        ("crops.rotation_degrees=200", r"crops.rotation_degrees=200.0 is out of range: must be in \[0, 180\]$"),
        ("crops.global_crops_scale=[0.5,0.2]", r"crops.global_crops_scale=\[0.5, 0.2\] .* non-decreasing"),
        ("crops.local_crops_scale=[0.0,0.3]", r"crops.local_crops_scale=\[0.0, 0.3\] .* each in \(0, 1\]"),
        ("crops.global_crops_scale=[0.3]", r"must be 2 values"),
        ("crops.blur_p=[1.0,0.1]", r"crops.blur_p=\[1.0, 0.1\] is out of range: must be 3 values"),
        ("evaluation.ks=[]", r"evaluation.ks=\[\] is out of range: must be at least 1 value"),
        ("optim.base_lr=.inf", r"optim.base_lr=inf is out of range: must be a finite number > 0"),
        ("optim.base_lr=.nan", r"optim.base_lr=nan is out of range"),
        ("distributed.master_port=70000", r"must be in \[1, 65535\] \(or null\)"),
        ("optim.warmup_epochs=200", r"optim.warmup_epochs=200 must be <= optim.epochs=100"),
        ("crops.color_jitter=[0.4,0.4,0.2,0.7]", r"hue"),
        ("student.embed_dim=100", None),  # valid alone: the arch's own heads are checked by the model
    ],
)
def test_out_of_range_values_name_key_value_and_range(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    ["crops.local_crops_number=0", "student.drop_path_rate=0.0", "teacher.momentum_teacher=1.0",
     "compute.num_threads=null", "compute.num_threads=1", "optim.warmup_epochs=100", "optim.freeze_last_layer_epochs=0",
     "ibot.mask_ratio_min_max=[0.3,0.3]", "crops.global_crops_scale=[1.0,1.0]", "distributed.master_port=65535"],
)
def test_boundary_values_are_valid(override):
    load_config(None, [override])  # no local crops (0) is a supported recipe


def _schema_numeric_fields():
    for key, hint, spec in ranged_fields(SSLConfig):
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        base = typing.get_origin(inner[0]) or inner[0]
        item = typing.get_args(inner[0])[0] if base is list else base
        if item in (int, float) and not issubclass(base, Enum):
            yield key, hint, spec


def test_every_numeric_key_declares_its_range():
    missing = [key for key, _, spec in _schema_numeric_fields() if spec is None]
    assert not missing, f"numeric keys without a range in schema.py: {missing}"
    assert len(list(_schema_numeric_fields())) > 70


def _violating_values(spec, hint):
    """A value just outside each declared bound (as a YAML literal)."""
    if spec.ge is not None:
        yield spec.ge - 1
    if spec.gt is not None:
        yield spec.gt
    if spec.le is not None:
        yield spec.le + 1
    if spec.lt is not None:
        yield spec.lt


@pytest.mark.parametrize("key, hint, spec", list(_schema_numeric_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_declared_bound_is_enforced(key, hint, spec):
    # On the schema's own dataclasses (fast); load_config runs the same walk (cases above).
    is_list = typing.get_origin(hint) is list
    is_int = int in (typing.get_args(hint) or (hint,)) or (is_list and typing.get_args(hint)[0] is int)
    assert range_violations(SSLConfig(), SSLConfig) == []  # every default is valid
    for bad in _violating_values(spec, hint):
        bad = int(bad) if is_int else float(bad)
        cfg = SSLConfig()
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, [bad] * (spec.length or max(spec.min_length, 1)) if is_list else bad)
        problems = range_violations(cfg, SSLConfig)
        assert len(problems) == 1 and problems[0].startswith(f"{key}=") and " is out of range: must be " in problems[0]


def test_choices_are_enums_that_behave_as_strings(tmp_path):
    cfg = load_config("train/vitl14.yaml", ["distributed.param_dtype=bf16"])
    assert cfg.compute.precision is Precision.bf16 and cfg.compute.precision == "bf16"
    assert cfg.train.centering == "sinkhorn_knopp" and f"{cfg.student.arch}" == "vit_large"
    assert {"bf16": 1}[cfg.distributed.param_dtype] == 1  # hashes as its value (dtype maps keep working)
    assert repr(cfg.student.ffn_layer) == "'swiglufused'" and json.dumps(cfg.compute.precision) == '"bf16"'
    with pytest.raises(ConfigError, match=r"student.attention_backend: Invalid value 'flash', expected one of"):
        load_config(None, ["student.attention_backend=flash"])
    # The saved config reloads to the same values (members are written as their plain names).
    save_config(cfg, tmp_path / "config.yaml")
    assert "precision: bf16" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == cfg


def test_choice_lists_elsewhere_are_the_schema_enums():
    from dinov2.distributed.launch import LAUNCHERS
    from dinov2.eval.backbone import ARCHS
    from dinov2.layers.attention_backends import BACKENDS
    from dinov2.models.vision_transformer import FFN_LAYERS

    assert (LAUNCHERS, ARCHS, FFN_LAYERS) == (Launcher.values(), Arch.values(), FfnLayer.values())
    assert BACKENDS == AttentionBackend.values()


@pytest.mark.parametrize(
    "text, where",
    [
        ("optim:\n  base_lr: [1, 2\n", "line 3, column 1"),
        ("optim:\n  base_lr: 1\n epochs: 3\n", "line 3, column 2"),
        ("optim:\n  base_lr: 1\n  base_lr: 2\n", "line 3, column 3: found duplicate key"),
        ("\toptim: 1\n", "line 1, column 1"),
    ],
)
def test_broken_yaml_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"invalid YAML in {re.escape(str(path))} at {where}"):
        load_config(path)


def test_yaml_that_is_not_a_mapping_or_not_readable(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must be a mapping of config keys"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory
    with pytest.raises(ConfigError, match=r"invalid YAML in override 'optim.base_lr=\[1,'"):
        load_config(None, ["optim.base_lr=[1,"])


def test_no_default_yaml_repeats_the_schema():
    # The schema is the one source of defaults: no YAML of defaults beside it.
    assert not (CONFIG_DIR / "ssl_default_config.yaml").exists()
    assert load_config(None) == OmegaConf.structured(SSLConfig)


def test_schema_and_enums_import_without_omegaconf():
    code = "import sys, dinov2.configs.schema, dinov2.configs.choices; print('omegaconf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
