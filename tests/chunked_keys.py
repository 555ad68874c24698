"""Official training checkpoints (``block_chunks > 0``) name block ``i`` ``blocks.{chunk}.{i}``: the official
``BlockChunk`` containers pad with ``nn.Identity`` so the global index stays. Shared by the tests that load
such weights into our flat models."""

from __future__ import annotations


def chunk_block_keys(state_dict: dict, chunks: int, depth: int) -> dict:
    """``blocks.{i}.x`` -> ``blocks.{i // (depth / chunks)}.{i}.x``, as the official model with ``block_chunks=chunks``
    names its weights; other keys unchanged."""
    size = depth // chunks
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{int(index) // size}.{index}.{rest}"
        out[key] = value
    return out
