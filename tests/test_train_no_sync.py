"""One train step makes no host-device synchronisation.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches every sync; on this CPU-only machine
the Python-level calls that synchronise on a GPU are made to raise during the step instead:
``.item()``, ``bool()/int()/float()`` of a tensor, ``.tolist()``, ``.numpy()``, ``nonzero`` (its
output size depends on the data) and tensors built from Python values with an explicit device.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dinov2.configs import load_config
from dinov2.train.build import build_train_loader
from dinov2.train.train import Trainer
from tiny import TINY


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def syncs_raise(monkeypatch):
    def refuse(name):
        def call(*args, **kwargs):
            raise HostSync(f"{name} during a train step (a host-device synchronisation on a GPU)")
        return call

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        patch.setattr(torch, "nonzero", refuse("torch.nonzero"))
        for factory in ("tensor", "as_tensor"):
            original = getattr(torch, factory)

            def checked(data, *args, _original=original, _name=factory, **kwargs):
                if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                    raise HostSync(f"torch.{_name}(python values, device=...) during a train step")
                return _original(data, *args, **kwargs)

            patch.setattr(torch, factory, checked)
        yield


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_a_train_step_makes_no_host_sync(tmp_path, monkeypatch, centering):
    # fused AdamW (the GPU default) decides a non-finite skip on the device; drop path 0.4 with compute
    # skipped, as in the recipes.
    cfg = load_config(None, TINY + [f"train.centering={centering}", "compute.fused_optimizer=true",
                                    "student.drop_path_rate=0.4", "ibot.separate_head=true"])
    trainer = Trainer(cfg, tmp_path)
    batches = iter(build_train_loader(cfg, trainer.dataset, start=0))
    trainer.train_step([next(batches)])  # first step: optimizer state is created lazily (not steady state)
    batch = next(batches)
    trainer.step = 2  # past the first warmup step, where the lr is 0
    before = trainer.model.student.backbone.cls_token.detach().clone()
    with syncs_raise(monkeypatch):
        logs = trainer.train_step([batch])
    assert int(logs["skipped"]) == 0
    assert not torch.equal(before, trainer.model.student.backbone.cls_token)  # the step did train
    trainer.close()


def test_the_sync_detector_catches_a_sync(monkeypatch):
    with syncs_raise(monkeypatch), pytest.raises(HostSync):
        if torch.ones(()) > 0:  # bool(tensor)
            pass
