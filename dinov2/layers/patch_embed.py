from typing import Callable

from torch import Tensor, nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` -> patch tokens ``[B, H/p * W/p, D]`` by a strided convolution."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for inputs the convolution would silently crop or reject."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        _, channels, height, width = x.shape
        if channels != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {channels} (shape {tuple(x.shape)})")
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
                f"resize or crop to e.g. {height // ph * ph}x{width // pw * pw}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.proj(x)
        height, width = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        if not self.flatten_embedding:
            x = x.reshape(-1, height, width, self.embed_dim)
        return x
