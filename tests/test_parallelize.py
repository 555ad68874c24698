"""The distribution policy (dinov2/distributed/parallelize.py): meta-device build + init equal to a plain
build, activation checkpointing equal to the plain gradients, compile without graph breaks, FSDP with
bf16 parameters computing what single-process autocast computes, precision checks."""

import pytest
import torch
import torch.distributed as dist

from dinov2.configs import ConfigError, load_config
from dinov2.distributed.parallelize import apply_activation_checkpointing, compile_blocks, validate_precision
from dinov2.distributed.setup import DistributedEnv, init_distributed
from dinov2.loss.centering import sinkhorn_knopp
from dinov2.train.model import build_training_model
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from gloo_ranks import DIST_TINY, run_ranks, write_dataset

SMALL = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=3", "student.num_heads=2",
    "student.patch_size=7", "student.in_chans=1", "student.drop_path_rate=0.3", "student.layerscale=0.1",
    "student.num_register_tokens=1", "student.ffn_layer=swiglufused",
    "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=2",
    "crops.mean=[0.13]", "crops.std=[0.31]",
    "dino.head_n_prototypes=48", "dino.head_hidden_dim=24", "dino.head_bottleneck_dim=8",
    "ibot.head_n_prototypes=40", "ibot.head_hidden_dim=24", "ibot.head_bottleneck_dim=8", "ibot.separate_head=true",
]
CPU = DistributedEnv.single(torch.device("cpu"))


def _plain_state(cfg) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    return model.state_dict(), torch.rand(4)  # the RNG state after the build, too


def test_meta_build_equals_plain_build_for_the_same_seed():
    cfg = load_config(None, SMALL)
    want, want_rng = _plain_state(cfg)
    torch.manual_seed(0)
    model = build_training_model(cfg, CPU)
    got_rng = torch.rand(4)
    assert all(not t.is_meta for t in model.state_dict().values())
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(got_rng, want_rng)
    assert model.training and not model.teacher.training


def _sharded_build(overrides):
    cfg = load_config(None, overrides)
    env = init_distributed(cfg.distributed, "cpu")
    try:
        torch.manual_seed(0)
        model = build_training_model(cfg, env)
        kinds = {type(p).__name__ for p in model.parameters()}
        full = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in model.state_dict().items()}
        return {"state": full, "kinds": kinds}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("block_chunks", [0, 1])
def test_sharded_meta_build_on_two_ranks_equals_plain_build(tmp_path, block_chunks):
    # 3 blocks of width 32 and heads of odd sizes (48, 40, 24, 8 rows) shard unevenly over 2 ranks;
    # block_chunks=1: the 3 blocks are one FSDP unit (torch >= 2.14), initialised one module at a time.
    overrides = SMALL + [o for o in DIST_TINY if o.startswith(("compute.", "distributed."))] + [
        f"student.block_chunks={block_chunks}"]
    want, _ = _plain_state(load_config(None, overrides))
    for result in run_ranks(_sharded_build, 2, tmp_path, overrides):
        assert result["kinds"] == {"DTensor"}
        assert result["state"].keys() == want.keys()
        for key in want:
            assert torch.equal(result["state"][key], want[key]), key


def _backbone(**kwargs) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, init_values=0.5,
                                 drop_path_rate=0.4, drop_path_uniform=True, **kwargs).train()


def _grads(model, crops, seed=3):
    torch.manual_seed(seed)  # the same stochastic-depth draws in every run
    outs = model.forward_features(crops, [None, None])
    loss = sum((o["x_norm_patchtokens"] * torch.linspace(-1, 1, o["x_norm_patchtokens"].shape[-1])).sum()
               + o["x_norm_clstoken"].pow(2).sum() for o in outs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_plain_gradients(mode):
    crops = [torch.randn(4, 3, 28, 28), torch.randn(6, 3, 14, 14)]
    plain, checkpointed = _backbone(), _backbone()
    keys = list(plain.state_dict())
    apply_activation_checkpointing(checkpointed, mode)
    assert list(checkpointed.state_dict()) == keys  # checkpoints and exports keep their key names
    want_loss, want = _grads(plain, crops)
    got_loss, got = _grads(checkpointed, crops)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    assert len(got) == len(want) == len(keys) - 1  # every parameter but the mask token (no masks here)
    for (name, g), w in zip(got.items(), want.values()):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_backbone_and_sinkhorn_trace_without_graph_breaks():
    model = _backbone(num_register_tokens=1)
    crops, masks = [torch.randn(4, 3, 28, 28), torch.randn(6, 3, 14, 14)], [torch.rand(4, 16) > 0.5, None]
    explained = torch._dynamo.explain(model.forward_features)(crops, masks)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    explained = torch._dynamo.explain(sinkhorn_knopp)(torch.randn(12, 40), 0.05)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_checkpointed_blocks_match_eager():
    """Compile (dynamo + AOT autograd; the inductor code generation is exercised on GPU by bench_gpu)
    over activation-checkpointed blocks, without stochastic depth: the same loss and gradients."""
    crops = [torch.randn(4, 3, 28, 28), torch.randn(6, 3, 14, 14)]
    eager, compiled = _backbone(), _backbone()
    for model in (eager, compiled):
        for block in model.blocks:
            block.sample_drop_ratio = 0.0
    apply_activation_checkpointing(compiled, "selective")
    compile_blocks(compiled)
    for block in compiled.blocks:  # test-speed backend instead of inductor
        block._compiled_call_impl = torch.compile(block._call_impl, backend="aot_eager", fullgraph=True)
    want_loss, want = _grads(eager, crops)
    got_loss, got = _grads(compiled, crops)
    torch.testing.assert_close(got_loss, want_loss)
    for (name, g), w in zip(got.items(), want.values()):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_inductor_compiled_training_model_matches_eager():
    cfg = load_config(None, SMALL + ["student.drop_path_rate=0.0"])
    torch.manual_seed(0)
    eager = build_training_model(cfg, CPU)
    torch.manual_seed(0)
    compiled = build_training_model(load_config(None, SMALL + ["student.drop_path_rate=0.0", "compute.compile=true"]),
                                    CPU)
    crops = [torch.randn(4, 1, 28, 28), torch.randn(8, 1, 14, 14)]
    outs = [m.student.backbone.forward_features(crops, [None, None]) for m in (eager, compiled)]
    for a, b in zip(*outs):
        torch.testing.assert_close(b["x_prenorm"], a["x_prenorm"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    (["distributed.param_dtype=bf16"], "does not match compute.precision=fp32"),
    (["compute.precision=bf16", "distributed.param_dtype=fp16"], "does not match compute.precision=bf16"),
    (["compute.precision=bf16", "distributed.reduce_dtype=fp16"], "need the grad scaler"),
])
def test_precision_mismatch_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_precision(load_config(None, SMALL + overrides))


def test_valid_precision_pairs_pass():
    for overrides in ([], ["compute.precision=bf16", "distributed.param_dtype=bf16"],
                      ["compute.precision=bf16"], ["compute.precision=fp16", "distributed.param_dtype=fp16",
                                                   "distributed.reduce_dtype=fp16"]):
        validate_precision(load_config(None, SMALL + overrides))


def _bf16_forward(overrides):
    """Student backbone forward under bf16 autocast, sharded with bf16 parameters when a process group exists."""
    cfg = load_config(None, overrides)
    env = init_distributed(cfg.distributed, "cpu") if "distributed.launcher=torchrun" in overrides else CPU
    try:
        torch.manual_seed(0)
        model = build_training_model(cfg, env)
        generator = torch.Generator().manual_seed(5)
        crops = [torch.randn(2, 1, 28, 28, generator=generator), torch.randn(4, 1, 14, 14, generator=generator)]
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            outs = model.student.backbone.forward_features(crops, [None, None])
        return [o["x_prenorm"] for o in outs]
    finally:
        if env.is_distributed:
            dist.destroy_process_group()


def test_fsdp_bf16_params_compute_what_single_process_autocast_computes(tmp_path):
    common = SMALL + ["compute.precision=bf16", "compute.device=cpu"]
    single = _bf16_forward(common)
    (sharded,) = run_ranks(_bf16_forward, 1, tmp_path, common + [
        "distributed.launcher=torchrun", "distributed.param_dtype=bf16", "distributed.reduce_dtype=fp32"])
    for a, b in zip(single, sharded):
        assert a.dtype == b.dtype == torch.float32  # the residual stream stays float32 in both
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def _train_two_steps(tmp_path, name, overrides):
    from dinov2.train.build import build_train_loader
    from dinov2.train.train import Trainer

    cfg = load_config(None, SMALL + overrides + [
        write_dataset(tmp_path / "images.npy", n=16), "train.batch_size_per_gpu=4", "data.num_workers=0",
        "logging.tensorboard=false", "logging.progress_bar=false", "compute.fused_optimizer=false"])
    trainer = Trainer(cfg, tmp_path / name, resume=False)
    try:
        batches = iter(build_train_loader(cfg, trainer.dataset, start=0))
        torch.manual_seed(11)
        losses = []
        for _ in range(2):
            losses.append(float(trainer.train_step([next(batches)])["total_loss"]))
            trainer.step += 1
        return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()


def test_trainer_with_selective_checkpointing_follows_the_plain_run(tmp_path):
    """Two real train steps (stochastic depth, both losses, AdamW, EMA): the same losses and weights."""
    want_losses, want = _train_two_steps(tmp_path, "plain", [])
    got_losses, got = _train_two_steps(tmp_path, "ac", ["compute.activation_checkpointing=selective"])
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
