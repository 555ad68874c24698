import os

import pytest
import torch

from dinov2.compute import intra_op_threads

# Two cores: keep intra-op threads bounded so parallel test processes do not thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_vit_kwargs():
    """A ViT small enough for fast CPU tests but with every feature of the real ones."""
    return dict(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4, init_values=1.0, block_chunks=0)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values so no mistake hides behind zeros or ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-image tests (thread start-up dominates; the machine is
    shared): ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with intra_op_threads(1):
        yield
