"""DINOHead: structure, init, a float64 hand-computed forward, weight-norm and FSDP2."""

import os
from datetime import timedelta
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.special import erf
from torch import nn
from torch.distributed.fsdp import fully_shard

from dinov2.layers.dino_head import DINOHead
from dinov2.layers.initialization import run_init_steps

# fork reuses the already imported torch (spawn re-imports it: ~10 s per process on a
# loaded 2-core machine); the workers run single-threaded, which keeps fork safe on Linux.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def linears(head):
    return [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]


def g_and_v(head):
    w = head.last_layer.parametrizations.weight
    return w.original0, w.original1


def reference_forward(head, x):
    """float64 numpy: Linear / exact-erf GELU stack, L2 normalise, then z @ (g v / ||v||).T."""
    h = x.detach().double().numpy()
    layers = linears(head)
    for i, lin in enumerate(layers):
        h = h @ lin.weight.detach().double().numpy().T
        if lin.bias is not None:
            h = h + lin.bias.detach().double().numpy()
        if i < len(layers) - 1:
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    z = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    g, v = (p.detach().double().numpy() for p in g_and_v(head))
    w = g * v / np.linalg.norm(v, axis=1, keepdims=True)
    return z @ w.T


@pytest.mark.parametrize("nlayers, n_linear", [(0, 1), (1, 1), (2, 2), (3, 3), (4, 4)])
def test_structure_and_forward_match_hand_computation(nlayers, n_linear):
    torch.manual_seed(0)
    head = DINOHead(10, 13, nlayers=nlayers, hidden_dim=12, bottleneck_dim=6)
    lins = linears(head)
    assert len(lins) == n_linear
    assert lins[0].in_features == 10 and lins[-1].out_features == 6
    assert all(lin.in_features == 12 for lin in lins[1:])
    with torch.no_grad():  # non-trivial magnitudes so a wrong g would show
        g_and_v(head)[0].uniform_(0.5, 2.0)
    x = torch.randn(5, 10)
    out = head(x)
    assert out.shape == (5, 13) and out.dtype == torch.float32
    np.testing.assert_allclose(out.detach().numpy(), reference_forward(head, x), rtol=1e-4, atol=1e-6)


def test_leading_dims_are_kept():
    head = DINOHead(8, 11, hidden_dim=16, bottleneck_dim=4)
    assert head(torch.randn(2, 3, 8)).shape == (2, 3, 11)


def test_initialisation():
    torch.manual_seed(0)
    head = DINOHead(64, 50, hidden_dim=256, bottleneck_dim=32)
    for lin in linears(head):
        assert torch.all(lin.bias == 0)
    w = linears(head)[0].weight
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and w.mean().abs().item() < 1e-3
    g, v = g_and_v(head)
    assert g.shape == (50, 1) and torch.all(g == 1)
    assert v.shape == (50, 32) and v.abs().max() <= 1 / np.sqrt(32)  # nn.Linear default init
    # g = 1: the effective prototypes are unit vectors, so |logit| <= 1 for a unit input.
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    assert head.last_layer.bias is None


def test_options_batchnorm_and_no_mlp_bias():
    head = DINOHead(8, 5, use_bn=True, nlayers=3, hidden_dim=16, bottleneck_dim=4, mlp_bias=False)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 2
    assert all(lin.bias is None for lin in linears(head))
    assert head(torch.randn(6, 8)).shape == (6, 5)


def test_float16_zero_embedding_stays_finite():
    head = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        linears(head)[-1].weight.zero_()
    out = head.half()(torch.randn(3, 8, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_gradients_reach_g_and_v_and_freeze_by_name():
    torch.manual_seed(0)
    head = DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4)
    names = [n for n, _ in head.named_parameters() if "last_layer" in n]
    assert len(names) == 2
    head(torch.randn(4, 8)).pow(2).sum().backward()
    params = dict(head.named_parameters())
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names)
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        if "last_layer" in n:
            p.grad.zero_()
    with torch.no_grad():  # plain SGD step
        for p in head.parameters():
            p -= 0.1 * p.grad
    for n, p in params.items():
        assert torch.equal(p, before[n]) == ("last_layer" in n), n


def test_loads_deprecated_weight_g_weight_v_keys():
    head = DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4)
    sd = head.state_dict()
    v = torch.randn(6, 4)
    sd.pop("last_layer.parametrizations.weight.original0")
    sd.pop("last_layer.parametrizations.weight.original1")
    sd["last_layer.weight_g"] = torch.full((6, 1), 2.0)
    sd["last_layer.weight_v"] = v
    fresh = DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.last_layer.weight, 2.0 * v / v.norm(dim=1, keepdim=True))


def test_meta_device_build_then_init_steps():
    """The path of a meta-device training build (dinov2.distributed.parallelize.materialize_)."""
    with torch.device("meta"):
        head = DINOHead(8, 6, hidden_dim=16, bottleneck_dim=4)
    head = head.to_empty(device="cpu")
    run_init_steps(head.init_steps())
    assert torch.all(g_and_v(head)[0] == 1)
    assert all(torch.all(lin.bias == 0) for lin in linears(head))
    assert torch.isfinite(head(torch.randn(3, 8))).all()


# ------------------------------------------------------------------ FSDP2, 2 processes (gloo)
def _fsdp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        ref = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=6)
        sharded = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=6)
        sharded.load_state_dict(ref.state_dict())
        fully_shard(sharded)
        inputs = torch.randn(world_size, 4, 8, generator=torch.Generator().manual_seed(1))

        out = sharded(inputs[rank])
        out.pow(2).sum().backward()  # FSDP2 averages gradients over processes
        # Reference: the mean of the per-process losses on the unsharded copy.
        ref_outs = [ref(inputs[r]) for r in range(world_size)]
        (sum(o.pow(2).sum() for o in ref_outs) / world_size).backward()

        res = {"out": out.detach(), "ref_out": ref_outs[rank].detach(), "names": [], "max_grad_err": 0.0}
        ref_params = dict(ref.named_parameters())
        for n, p in sharded.named_parameters():
            res["names"].append(n)
            err = (p.grad.full_tensor() - ref_params[n].grad).abs().max().item()
            res["max_grad_err"] = max(res["max_grad_err"], err)

        # freeze the last layer by name, take a step, gather full parameters
        before = {n: p.full_tensor().clone() for n, p in sharded.named_parameters()}
        for n, p in sharded.named_parameters():
            if "last_layer" in n:
                p.grad = None
        torch.optim.SGD(sharded.parameters(), lr=0.5).step()
        res["changed"] = {n: not torch.equal(p.full_tensor(), before[n]) for n, p in sharded.named_parameters()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fully_shard_matches_unsharded_and_freezes_last_layer(tmp_path):
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_fsdp_worker, args=args, nprocs=2, join=True, start_method=START_METHOD)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(res["out"], res["ref_out"], rtol=1e-5, atol=1e-6)
        assert res["max_grad_err"] < 1e-5
        assert sum("last_layer" in n for n in res["names"]) == 2
        for n, changed in res["changed"].items():
            assert changed != ("last_layer" in n), n
