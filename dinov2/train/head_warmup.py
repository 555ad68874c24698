"""``train.freeze_backbone_steps``: a head warm-up before the backbone joins.

Training on from a backbone without its heads (the released DINOv2 weights come without them) starts
with random DINO/iBOT heads whose gradients, flowing back into the backbone at full lr, undo the
pretrained features within a few hundred steps. During the first ``freeze_backbone_steps`` steps only
the heads learn: after backward the student backbone's gradients are dropped (``grad = None``), so
AdamW leaves its weights untouched and keeps no moments for them (they start fresh when it joins);
the teacher's heads follow the student's by EMA as usual, and its backbone, equal to the student's
at the start, stays equal to it. The loss and the schedules run as in any step.
"""

from __future__ import annotations

from torch import nn


def backbone_frozen(step: int, freeze_backbone_steps: int) -> bool:
    """Whether step ``step`` (0-based) trains the heads only."""
    return step < freeze_backbone_steps


def drop_backbone_grads(student: nn.ModuleDict) -> None:
    """Forget the student backbone's gradients of this step (sharded ones too)."""
    for parameter in student["backbone"].parameters():
        parameter.grad = None


def drop_unsaved_optimizer_state(optimizer_state: dict, saved_keys) -> list[str]:
    """Remove from ``optimizer_state`` (``get_state_dict``'s, about to be filled from a checkpoint) the
    parameters that had no optimizer state when the checkpoint was written (a backbone frozen by the
    head warm-up), so that loading leaves them without state as in the uninterrupted run (DCP would
    otherwise miss their keys). ``saved_keys``: the checkpoint's flattened keys. Returns the names."""
    missing = [name for name in optimizer_state.get("state", {})
               if not any(key.startswith(f"optimizer.state.{name}.") for key in saved_keys)]
    for name in missing:
        del optimizer_state["state"][name]
    return missing
