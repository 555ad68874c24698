"""Weight initialisation as an ordered list of steps, so a model built on the meta device can be
initialised later, on its device (and, sharded, one module at a time), with the same random draws
as a plain build from the same seed.

A step is ``(module, fn)``: ``fn(module)`` initialises ALL of ``module``'s own (non-recursive)
parameters in place (a sharded build generates each of them whole for the step and keeps its slice). ``construction_steps`` replays what the constructors did (``reset_parameters`` of every
submodule in registration order, which is construction order in this code base); a model's own
``init_steps`` appends its explicit initialisation after it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

InitStep = tuple[nn.Module, Callable[[nn.Module], None]]


def post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Modules in the order ``nn.Module.apply`` visits them (children first)."""
    for child in module.children():
        yield from post_order(child)
    yield module


def _reset(module: nn.Module) -> None:
    module.reset_parameters()


def construction_steps(module: nn.Module) -> list[InitStep]:
    """``reset_parameters`` of every submodule that has one, in registration (= construction) order."""
    return [(m, _reset) for m in module.modules() if callable(getattr(m, "reset_parameters", None))]


@torch.no_grad()
def run_init_steps(steps: list[InitStep]) -> None:
    for module, fn in steps:
        fn(module)
