import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and keys) that upcasts low-precision parameters to a float32 input.

    Under FSDP2 with ``param_dtype=bf16`` the weights arrive in bf16 while the residual stream stays
    float32 (as in a single process under autocast): the norm then runs in float32 in both paths. CUDA
    autocast does this on its own; CPU autocast rejects the mix. Otherwise it is ``nn.LayerNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight is not None and self.weight.dtype != torch.float32:
            bias = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x, self.normalized_shape, self.weight.float(), bias, self.eps)
        return super().forward(x)
