"""FSDP units of the backbone (dinov2/distributed/fsdp.py), on 2 real gloo processes: ``block_chunks`` groups
consecutive blocks into one unit (torch >= 2.14) and changes no key, no gradient and no output, also after
the shards were updated in place (as the EMA teacher's are)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from dinov2.distributed.fsdp import GROUPED_UNITS, block_units, shard_backbone
from dinov2.models.vision_transformer import DinoVisionTransformer
from gloo_ranks import run_ranks

DEPTH = 4


def _backbone(block_chunks: int) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=DEPTH, num_heads=2, init_values=0.5,
                                 num_register_tokens=1, block_chunks=block_chunks).train()


def _loss(model, crops):
    outs = model.forward_features(crops, [None, None])
    return sum((o["x_norm_patchtokens"] * torch.linspace(-1, 1, o["x_norm_patchtokens"].shape[-1])).sum()
               + o["x_norm_clstoken"].pow(2).sum() for o in outs)


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sharded_against_plain(block_chunks: int) -> dict:
    """The sharded backbone's FSDP unit count, and its gradients and outputs next to the plain model's."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plain = _backbone(block_chunks)
    sharded = copy.deepcopy(plain)
    shard_backbone(sharded, mesh, MixedPrecisionPolicy(), reshard_after_forward=True)
    units = len({id(block._get_fsdp_state()) for block in sharded.blocks})
    generator = torch.Generator().manual_seed(1)  # the same batch on both ranks: averaged grads = plain grads
    crops = [torch.randn(2, 3, 28, 28, generator=generator), torch.randn(3, 3, 14, 14, generator=generator)]
    _loss(plain, crops).backward()
    _loss(sharded, crops).backward()
    grads = {name: (p.grad.full_tensor(), dict(plain.named_parameters())[name].grad)
             for name, p in sharded.named_parameters() if p.grad is not None}
    # Intermediate layers (every block runs), an EMA-like update of the local shards (as the teacher's),
    # then a forward: it must see the updated weights.
    images = torch.randn(2, 3, 28, 28, generator=generator)
    with torch.no_grad():
        intermediate = (torch.cat(sharded.get_intermediate_layers(images, n=[1, 3])),
                        torch.cat(plain.get_intermediate_layers(images, n=[1, 3])))
        for p, q in zip(sharded.parameters(), plain.parameters()):
            _local(p).mul_(0.5)
            q.mul_(0.5)
        after = (sharded(images), plain(images))
    return {"units": units, "grads": grads, "intermediate": intermediate, "after": after}


def _ranks(chunk_values) -> dict:
    dist.init_process_group("gloo")
    try:
        return {chunks: _sharded_against_plain(chunks) for chunks in chunk_values}
    finally:
        dist.destroy_process_group()


def test_block_units():
    blocks = list(range(6))
    assert block_units(blocks, 0) == [[b] for b in blocks]
    assert block_units(blocks, 2) == ([[0, 1, 2], [3, 4, 5]] if GROUPED_UNITS else [[b] for b in blocks])
    with pytest.raises(ValueError, match="block_chunks=4 must be 0 or divide the number of blocks"):
        block_units(blocks, 4)


def test_grouped_units_shard_and_compute_as_per_block_units(tmp_path):
    for result in run_ranks(_ranks, 2, tmp_path, (0, 2)):
        assert result[0]["units"] == DEPTH
        assert result[2]["units"] == (2 if GROUPED_UNITS else DEPTH)
        for chunks, outcome in result.items():
            assert len(outcome["grads"]) == len(dict(_backbone(chunks).named_parameters())) - 1  # no mask token
            for name, (got, want) in outcome["grads"].items():
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"block_chunks={chunks}: {name}")
            for got, want in (outcome["intermediate"], outcome["after"]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"block_chunks={chunks}")
