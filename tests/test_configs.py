"""Typed, strict configs: recipes load, unknown keys name the closest valid key, bad values fail."""

import pytest

from dinov2.configs import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("recipe", sorted(p.name for p in (CONFIG_DIR / "train").glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(f"train/{recipe}")
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0


def test_released_recipe_values():
    cfg = load_config("train/vitl14.yaml")
    assert (cfg.student.arch, cfg.train.centering, cfg.dino.head_n_prototypes, cfg.ibot.separate_head) == (
        "vit_large", "sinkhorn_knopp", 131072, True)
    assert load_config("train/vitg14.yaml").student.ffn_layer == "swiglufused"


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
