"""The DINOv2 self-supervised objective: DINO (class token), iBOT (masked patches), KoLeo."""

from .centering import sinkhorn_knopp, softmax_center
from .dino_clstoken_loss import DINOLoss
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp", "softmax_center"]
