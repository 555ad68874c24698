"""What the trainer feeds the model: uint8 crops normalised by the model on the device (equal to the
float crops of the official pipeline), and ``crops.local_crops_number=0`` (global crops only)."""

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.data import make_ssl_data_loader
from dinov2.train.build import build_dataset, build_mask_generator, build_train_loader, build_transform
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import Trainer

SMALL = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=7", "student.in_chans=1", "student.layerscale=0.1", "student.drop_path_rate=0.0",
    "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.mean=[0.13]", "crops.std=[0.31]",
    "crops.color_jitter_p=0.0", "crops.grayscale_p=0.0",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1", "optim.warmup_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0", "optim.freeze_last_layer_epochs=0", "data.num_workers=0",
    "logging.every_n_steps=1", "logging.tensorboard=false", "logging.progress_bar=false",
    "compute.fused_optimizer=false", "compute.device=cpu",
]


@pytest.fixture(scope="module")
def dataset_arg(tmp_path_factory):
    path = tmp_path_factory.mktemp("npy") / "images.npy"
    np.save(path, np.random.RandomState(0).randint(0, 256, (16, 1, 28, 28)).astype(np.uint8))
    return f"data.dataset=npy:{path}"


def _cfg(dataset_arg, *extra):
    return load_config(None, SMALL + [dataset_arg, *extra])


def test_uint8_batches_normalised_by_the_model_equal_the_float_pipeline(dataset_arg):
    cfg = _cfg(dataset_arg, "crops.local_crops_number=2", "crops.blur_p=[1.0,0.5,0.5]")
    dataset = build_dataset(cfg.data.dataset, 1)
    ours = list(itertools.islice(iter(build_train_loader(cfg, dataset, start=4)), 2))
    # The same loader with the transform normalising each crop on the CPU, as the official pipeline does.
    mask_generator, n_tokens = build_mask_generator(cfg)
    transform = build_transform(cfg)
    float_transform = copy.copy(transform)
    float_transform.normalize = True
    reference = list(itertools.islice(iter(make_ssl_data_loader(
        dataset, float_transform, batch_size_per_rank=4, num_workers=0, seed=cfg.train.seed, start=4,
        mask_generator=mask_generator, n_tokens=n_tokens)), 2))
    model = SSLMetaArch(cfg)
    for batch, expected in zip(ours, reference):
        assert batch.global_crops.dtype == torch.uint8 and batch.local_crops.dtype == torch.uint8
        assert expected.global_crops.dtype == torch.float32
        normalised = model.normalized(batch)
        assert torch.equal(normalised.global_crops, expected.global_crops)
        assert torch.equal(normalised.local_crops, expected.local_crops)
        assert torch.equal(normalised.masks, expected.masks)


def test_loader_gives_no_local_crops(dataset_arg):
    cfg = _cfg(dataset_arg, "crops.local_crops_number=0")
    batch = next(iter(build_train_loader(cfg, build_dataset(cfg.data.dataset, 1), start=0)))
    assert batch.global_crops.shape == (8, 1, 28, 28) and batch.local_crops.shape[0] == 0


def test_loss_without_local_crops_is_the_global_part_of_the_full_loss(dataset_arg):
    """Same weights, same batch less its local crops: iBOT and KoLeo terms are unchanged, and the
    global DINO term is renormalised from 2 + 2*2 loss terms to 2."""
    full_cfg, zero_cfg = _cfg(dataset_arg, "crops.local_crops_number=2"), _cfg(dataset_arg, "crops.local_crops_number=0")
    batch = next(iter(build_train_loader(full_cfg, build_dataset(full_cfg.data.dataset, 1), start=0)))
    torch.manual_seed(0)
    full = SSLMetaArch(full_cfg)
    zero = SSLMetaArch(zero_cfg)
    zero.load_state_dict(full.state_dict())
    _, full_logs = full(batch, teacher_temp=0.07)
    loss, zero_logs = zero(dataclasses.replace(batch, local_crops=batch.local_crops[:0]), teacher_temp=0.07)
    assert "dino_local_crops_loss" in full_logs and "dino_local_crops_loss" not in zero_logs
    torch.testing.assert_close(zero_logs["ibot_loss"], full_logs["ibot_loss"])
    torch.testing.assert_close(zero_logs["koleo_loss"], full_logs["koleo_loss"])
    torch.testing.assert_close(zero_logs["dino_global_crops_loss"], full_logs["dino_global_crops_loss"] * 3)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for name, p in zero.student.named_parameters() if "mask_token" not in name and "last_layer" not in name)


def test_training_steps_without_local_crops(dataset_arg, tmp_path):
    trainer = Trainer(_cfg(dataset_arg, "crops.local_crops_number=0", "train.max_steps=2"), tmp_path)
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.fit()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["total_loss"]) and "dino_local_crops_loss" not in m for m in metrics)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.student.state_dict().items())


def test_default_num_workers_share_the_cores_of_the_machine():
    from dinov2.train.build import default_num_workers, resolve_num_workers

    assert default_num_workers(16, 1) == 15  # one core left for the training process
    assert default_num_workers(96, 8) == 11  # 8 GPU ranks on a 96-core node
    assert default_num_workers(2, 4) == 1  # never fewer than one worker
    assert resolve_num_workers(3) == 3 and resolve_num_workers(-1) >= 1
