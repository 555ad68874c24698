"""Distillation of a frozen teacher (dinov2/train/distillation.py) on tiny models: the paper's recipe
(frozen teacher, unmasked student without stochastic depth, iBOT on every global-crop patch, a student
EMA as the final model), the three teacher sources, bitwise resume, export, and the errors before training."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.checkpoint.export import export_backbone, read_backbone, read_tensors, resolve_checkpoint
from dinov2.configs import ConfigError, load_config
from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription
from dinov2.logging import read_metrics
from dinov2.train.build import build_train_loader
from dinov2.train.distillation import DistillationMetaArch, every_patch
from dinov2.train.teacher_heads import PrototypeHead, spherical_kmeans
from dinov2.cli.train import main
from dinov2.train.train import Trainer
from gloo_ranks import write_dataset
from tiny import TINY

STUDENT = ["student.embed_dim=16", "student.depth=1", "student.num_heads=2", "distillation.kmeans_images=32"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny trained run (the teacher: dim 32, depth 2, patch 7) and its exported backbone."""
    root = tmp_path_factory.mktemp("teacher")
    data = write_dataset(root / "images.npy", n=48)
    Trainer(load_config(None, TINY + [data, "train.max_steps=2"]), root / "run").fit()
    export_backbone(root / "run", root / "teacher.safetensors")
    return {"run": root / "run", "file": root / "teacher.safetensors", "data": data}


def cfg_for(teacher_run, *extra):
    return load_config(None, TINY + STUDENT + [teacher_run["data"], *extra])


def test_recipe_frozen_teacher_student_ema_and_same_start_as_scratch(teacher_run, tmp_path):
    trainer = Trainer(cfg_for(teacher_run, f"distillation.teacher={teacher_run['run']}", "train.max_steps=3"),
                      tmp_path / "distill")
    model = trainer.model
    assert isinstance(model, DistillationMetaArch) and model.head_method == "trained"
    assert model.cfg.student.drop_path_rate == 0  # TINY asks for 0.2: the recipe trains without it
    # The teacher is the run's EMA teacher, heads and loss centers included; the student starts from the
    # weights a from-scratch run with this seed has, and its EMA from the student.
    saved = read_tensors(resolve_checkpoint(teacher_run["run"]), "model.")
    for key in ("teacher.backbone.blocks.1.mlp.fc2.weight", "teacher.dino_head.last_layer.parametrizations.weight.original1",
                "dino_loss.center", "ibot_patch_loss.center"):
        assert torch.equal(model.state_dict()[key], saved[f"model.{key}"]), key
    scratch = Trainer(cfg_for(teacher_run, "student.drop_path_rate=0"), tmp_path / "scratch").model
    assert all(torch.equal(v, model.student.state_dict()[k]) for k, v in scratch.student.state_dict().items())
    assert all(torch.equal(v, model.student.state_dict()[k]) for k, v in model.student_ema.state_dict().items())

    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    ema_before = {k: v.clone() for k, v in model.student_ema.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())  # frozen
    ema, student = model.student_ema.state_dict(), model.student.state_dict()
    weight = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(ema[weight], ema_before[weight]) and not torch.equal(ema[weight], student[weight])
    assert all(not p.requires_grad for p in [*model.teacher.parameters(), *model.student_ema.parameters()])
    assert [m["step"] for m in read_metrics(tmp_path / "distill")] == [1, 2, 3]


def test_student_ema_follows_the_student_by_the_momentum(teacher_run, tmp_path):
    model = Trainer(cfg_for(teacher_run, f"distillation.teacher={teacher_run['run']}"), tmp_path).model
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    ema = {k: v.clone() for k, v in model.student_ema.named_parameters()}
    model.update_teacher(0.9)
    for name, value in model.student_ema.named_parameters():
        torch.testing.assert_close(value, 0.9 * ema[name] + 0.1 * dict(model.student.named_parameters())[name])


def test_student_sees_unmasked_crops_and_ibot_covers_every_patch(teacher_run, tmp_path):
    cfg = cfg_for(teacher_run, f"distillation.teacher={teacher_run['file']}", "ibot.mask_sample_probability=1.0")
    trainer = Trainer(cfg, tmp_path)
    # A batch with iBOT masks (the loader of the same run without a teacher draws them; distilling, none).
    batch = next(iter(build_train_loader(cfg_for(teacher_run, "ibot.mask_sample_probability=1.0"), trainer.dataset,
                                         start=0)))
    assert batch.masks.any()
    unmasked = dataclasses.replace(batch, masks=torch.zeros_like(batch.masks), mask_indices=batch.mask_indices[:0],
                                   masks_weight=batch.masks_weight[:0], n_masked_patches=torch.zeros_like(batch.n_masked_patches))
    centers = [c.clone() for c in trainer.model.loss_centers()]  # the forward pass moves them
    loss_masked, logs_masked = trainer.model(batch, teacher_temp=0.07)
    for center, before in zip(trainer.model.loss_centers(), centers):
        center.copy_(before)
    loss_unmasked, logs_unmasked = trainer.model(unmasked, teacher_temp=0.07)
    assert torch.equal(loss_masked, loss_unmasked)  # the loader's masks play no part
    assert logs_masked["ibot_loss"] > 0
    full = every_patch(batch)
    n_crops, n_tokens = batch.masks.shape
    assert full.masks.all() and full.mask_indices.tolist() == list(range(n_crops * n_tokens))
    assert torch.allclose(full.masks_weight.sum(), torch.tensor(float(n_crops)))  # each crop's patches weigh 1


def test_loader_draws_no_masks_when_distilling(teacher_run):
    from dinov2.data.mnist import MNISTDemoDataset

    dataset = MNISTDemoDataset()
    plain = next(iter(build_train_loader(cfg_for(teacher_run, "ibot.mask_sample_probability=1.0"), dataset, start=0)))
    distilled = next(iter(build_train_loader(cfg_for(teacher_run, f"distillation.teacher={teacher_run['file']}",
                                                     "ibot.mask_sample_probability=1.0"), dataset, start=0)))
    assert plain.masks.any()
    # The same crops and the same batch contract (shapes, dtypes), with no mask drawn.
    assert torch.equal(distilled.global_crops, plain.global_crops) and torch.equal(distilled.local_crops, plain.local_crops)
    assert distilled.masks.shape == plain.masks.shape and distilled.masks.dtype == torch.bool
    assert not distilled.masks.any() and distilled.mask_indices.numel() == 0 and distilled.masks_weight.numel() == 0
    assert distilled.n_masked_patches.tolist() == [0]


@pytest.mark.slow  # ~4 tiny runs: > 20 s on a loaded 2-core machine
def test_resume_of_a_distillation_run_is_bitwise(teacher_run, tmp_path):
    # An exported backbone: k-means heads fitted once before step 1; the resumed run reads them from the checkpoint.
    common = [f"distillation.teacher={teacher_run['file']}", "ibot.separate_head=true"]
    full_cfg = cfg_for(teacher_run, *common, "train.max_steps=5")
    Trainer(full_cfg, tmp_path / "full").fit()
    Trainer(cfg_for(teacher_run, *common, "train.max_steps=3"), tmp_path / "split").fit()
    resumed = Trainer(full_cfg, tmp_path / "split")
    assert resumed.step == 3
    resumed.fit()
    losses = lambda run: [(m["step"], m["total_loss"]) for m in read_metrics(run)]  # noqa: E731
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    full = Trainer(full_cfg, tmp_path / "full").model.state_dict()
    assert any(k.startswith("student_ema.") for k in full)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, full[key]), key
    heads = resumed.model.teacher
    assert isinstance(heads.dino_head, PrototypeHead) and isinstance(heads.ibot_head, PrototypeHead)
    assert heads.dino_head.prototypes.norm(dim=1).allclose(torch.ones(64))  # fitted, not the zero placeholder


def test_export_takes_the_student_ema_by_default(teacher_run, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(cfg_for(teacher_run, f"distillation.teacher={teacher_run['run']}", "train.max_steps=1"), run)
    trainer.fit()
    info = export_backbone(run, tmp_path / "student.safetensors")
    assert info["which"] == "student_ema"
    state, description, _ = read_backbone(tmp_path / "student.safetensors")
    assert description.embed_dim == 16
    for key, value in trainer.model.student_ema.backbone.state_dict().items():
        assert torch.equal(state[key], value), key
    assert export_backbone(teacher_run["run"], tmp_path / "t.pth")["which"] == "teacher"  # an undistilled run: its EMA teacher
    with pytest.raises(ValueError, match="distillation run.*student_ema"):
        export_backbone(run, tmp_path / "bad.pth", which="teacher")


@pytest.mark.parametrize("source", ["run", "file"])
def test_teacher_is_built_on_the_meta_device_and_equals_a_cpu_build(teacher_run, source):
    from dinov2.distributed import DistributedEnv
    from dinov2.train.model import build_training_model, builds_on_meta

    states = {}
    for meta in (True, False):
        cfg = cfg_for(teacher_run, f"distillation.teacher={teacher_run[source]}", f"compute.meta_init={meta}")
        assert builds_on_meta(cfg) == meta
        torch.manual_seed(0)
        model = build_training_model(cfg, DistributedEnv.single(torch.device("cpu")))
        states[meta] = (model.state_dict(), torch.rand(3))  # the RNG ends where a plain build leaves it
    (meta_state, meta_draw), (cpu_state, cpu_draw) = states[True], states[False]
    assert meta_state.keys() == cpu_state.keys() and torch.equal(meta_draw, cpu_draw)
    for key, value in cpu_state.items():
        assert torch.equal(meta_state[key], value), key
    saved = read_tensors(resolve_checkpoint(teacher_run["run"]), "model.teacher.backbone.")
    for key, value in saved.items():  # the frozen teacher holds its source's weights
        assert torch.equal(meta_state[key[len("model."):]], value), key
    if source == "run":  # trained heads: the run's loss centers too
        assert torch.equal(meta_state["dino_loss.center"],
                           read_tensors(resolve_checkpoint(teacher_run["run"]), "model.dino_loss.")["model.dino_loss.center"])


def test_kmeans_features_do_not_depend_on_the_batch_size(teacher_run):
    # A 2-rank run with batch B per rank and a 1-process run with batch 2B fit the same teacher heads.
    from dinov2.data.mnist import MNISTDemoDataset
    from dinov2.train.distillation import teacher_features

    dataset = MNISTDemoDataset()
    features = []
    for batch in (8, 3):  # 20 images: 3 batches of 8 (4 images of the last unused), 7 of 3
        cfg = cfg_for(teacher_run, f"distillation.teacher={teacher_run['file']}", "distillation.kmeans_images=20",
                      f"train.batch_size_per_gpu={batch}")
        torch.manual_seed(0)
        features.append(teacher_features(DistillationMetaArch(cfg), cfg, dataset, torch.device("cpu")))
    assert features[0]["cls"].shape == (40, 32) and features[0]["patch"].shape == (160, 32)  # 2 crops x 4 patches
    for role in ("cls", "patch"):
        torch.testing.assert_close(features[1][role], features[0][role], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # builds ViT-S/14 three times
def test_hub_teacher_with_local_weights_gets_kmeans_heads(tmp_path):
    from dinov2.hub.backbones import dinov2_vits14

    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_vits14(pretrained=False, depth=1).state_dict(), weights)  # hub layout; depth cut for speed
    # A released-style file without description must match the entry point's full depth: refused, keys named.
    data = tmp_path / "rgb.npy"
    np.save(data, np.random.RandomState(0).randint(0, 256, (64, 3, 28, 28)).astype(np.uint8))
    with pytest.raises(ConfigError, match=r"distillation.teacher=dinov2_vits14.*keys missing from the file: blocks.1"):
        Trainer(load_config(None, TINY + _rgb_student(weights, data)), tmp_path / "bad")
    torch.save(dinov2_vits14(pretrained=False).state_dict(), weights)
    trainer = Trainer(load_config(None, TINY + _rgb_student(weights, data) + ["train.max_steps=1"]), tmp_path / "run")
    model = trainer.model
    assert model.head_method == "kmeans" and model.teacher.backbone.embed_dim == 384
    # Student crops normalised with 0.5 / 0.25 are re-normalised for the teacher with ImageNet's statistics.
    pixels = torch.rand(2, 3, 28, 28)
    student_input = (pixels - 0.5) / 0.25
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.teacher_input(student_input), imagenet)
    trainer.fit()
    assert read_metrics(tmp_path / "run")[-1]["step"] == 1


def _rgb_student(weights, data):
    return STUDENT + ["student.patch_size=14", "student.in_chans=3", "crops.mean=[0.5,0.5,0.5]", "crops.std=[0.25,0.25,0.25]",
                      "distillation.teacher=dinov2_vits14", f"distillation.teacher_weights={weights}",
                      "crops.local_crops_number=0", "distillation.kmeans_images=64", f"data.dataset=npy:{data}"]


# ------------------------------------------------------------------ bad input: clear errors before training
def test_patch_size_mismatch(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher's patch size is 7.*student.patch_size=14.*set student.patch_size=7"):
        Trainer(cfg_for(teacher_run, f"distillation.teacher={teacher_run['file']}", "student.patch_size=14"), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_teacher_file_that_does_not_match_its_description(teacher_run, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    state = load_file(teacher_run["file"])
    with safe_open(teacher_run["file"], framework="pt") as handle:
        description = BackboneDescription.from_json(handle.metadata()[DESCRIPTION_KEY])
    lying = dataclasses.replace(description, depth=3)  # the file says 3 blocks, holds 2
    save_file(state, tmp_path / "lying.safetensors", metadata={DESCRIPTION_KEY: lying.to_json()})
    with pytest.raises(ConfigError, match=r"lying.safetensors.*keys missing from the file: blocks.2"):
        Trainer(cfg_for(teacher_run, f"distillation.teacher={tmp_path / 'lying.safetensors'}"), tmp_path / "run")


def test_other_bad_teachers(teacher_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="neither a run directory, a backbone file"):
        Trainer(cfg_for(teacher_run, f"distillation.teacher={tmp_path / 'missing'}"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"its heads have 64 prototypes.*set dino.head_n_prototypes=64"):
        Trainer(cfg_for(teacher_run, f"distillation.teacher={teacher_run['run']}", "dino.head_n_prototypes=32",
                        "ibot.separate_head=true"), tmp_path / "b")
    with pytest.raises(ConfigError, match="distillation.heads=trained: the teacher .* has no heads"):
        Trainer(cfg_for(teacher_run, f"distillation.teacher={teacher_run['file']}", "distillation.heads=trained"),
                tmp_path / "c")
    # Through the CLI: one line, exit code 2.
    assert main(["--output-dir", str(tmp_path / "d"), *TINY, *STUDENT, f"distillation.teacher={teacher_run['file']}",
                 "student.in_chans=3", "crops.mean=[0.1,0.1,0.1]", "crops.std=[0.3,0.3,0.3]"]) == 2
    assert "teacher takes 1 input channels, the student student.in_chans=3" in capsys.readouterr().err


# ------------------------------------------------------------------ k-means heads (pure maths)
def test_spherical_kmeans_recovers_separated_directions():
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    labels = torch.arange(600) % 6
    points = F.normalize(centres[labels] + 0.05 * torch.randn(600, 16, generator=generator), dim=-1)
    found = spherical_kmeans(points, 6, iterations=20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(found.norm(dim=1), torch.ones(6))
    similarity = found @ centres.t()
    assert (similarity.max(dim=0).values > 0.99).all()  # every true direction found ...
    assert sorted(similarity.argmax(dim=1).tolist()) == list(range(6))  # ... by exactly one centroid
    with pytest.raises(ValueError, match="at least 7 points"):
        spherical_kmeans(points[:5], 7, iterations=1, generator=generator)


def test_prototype_head_is_the_cosine_to_prototypes_of_centred_features():
    head = PrototypeHead(4, 3, ("cls",))
    with torch.no_grad():
        head.mean.copy_(torch.tensor([1.0, 0, 0, 0]))
        head.prototypes.copy_(torch.eye(3, 4) * 2)  # not unit: normalised in forward
    x = torch.tensor([[1.0, 3.0, 0, 4.0]])  # centred: (0, 3, 0, 4), norm 5
    torch.testing.assert_close(head(x), torch.tensor([[0.0, 0.6, 0.0]]))


def test_target_statistics_by_hand():
    from dinov2.train.teacher_heads import target_statistics

    ln2, ln4 = np.log(2), np.log(4)
    one_hot = torch.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])  # prototypes {0, 1} -> label 0, {2, 3} -> label 1
    stats = target_statistics(one_hot, labels)
    assert stats == pytest.approx({"entropy": 0, "marginal_entropy": ln4, "information": ln4,
                                   "label_information": ln2}, abs=1e-9)
    uniform = target_statistics(torch.full((8, 4), 0.25), labels)  # says nothing about the image
    assert uniform == pytest.approx({"entropy": ln4, "marginal_entropy": ln4, "information": 0,
                                     "label_information": 0}, abs=1e-9)
    half = target_statistics(torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))  # 1 bit of 2 about the image
    assert half == pytest.approx({"entropy": ln2, "marginal_entropy": ln4, "information": ln2}, abs=1e-9)
