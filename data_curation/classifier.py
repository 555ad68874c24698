"""A user's classifier head over embeddings (e.g. an NSFW head), read from a file, applied in numpy.

Nothing is downloaded or bundled: the user gives the file. Accepted formats: a torch
checkpoint (``.pt``/``.pth``, read with ``weights_only=True``; a state dict, or a dict holding
one under ``state_dict``/``model``/``head``), ``.npz`` or ``.safetensors``. The head is one or
more linear layers: every ``<prefix>weight`` [out, in] with its ``<prefix>bias`` [out], taken
in the natural order of their prefixes (``0.``, ``2.`` of an ``nn.Sequential``; ``fc1.``,
``fc2.``; a bare ``weight`` for one layer), with a ReLU between layers.

Score of a row: ``sigmoid(logit)`` for a head with one output; otherwise the softmax
probability of the ``positive`` classes (summed). A row is removed when its score exceeds the
threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import CurationInputError


@dataclass
class ClassifierHead:
    layers: list[tuple[np.ndarray, np.ndarray]]  # (weight [out, in], bias [out]) per layer
    source: str = ""

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def num_outputs(self) -> int:
        return int(self.layers[-1][0].shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        for number, (weight, bias) in enumerate(self.layers):
            h = h @ weight.T + bias
            if number < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h

    def scores(self, x: np.ndarray, positive: list[int] | None = None) -> np.ndarray:
        """Probability of the positive class(es) per row, in [0, 1]."""
        logits = self.logits(x).astype(np.float64)
        if self.num_outputs == 1:
            return (1.0 / (1.0 + np.exp(-logits[:, 0]))).astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities[:, self.positive_classes(positive)].sum(axis=1).astype(np.float32)

    def positive_classes(self, positive: list[int] | None) -> list[int]:
        if self.num_outputs == 1:
            return [0]
        if not positive:
            if self.num_outputs == 2:
                return [1]
            raise CurationInputError(
                f"classifier {self.source} has {self.num_outputs} outputs: say which classes count as positive "
                "(--positive-class 3 --positive-class 5)"
            )
        bad = [c for c in positive if not 0 <= int(c) < self.num_outputs]
        if bad:
            raise CurationInputError(f"positive classes {bad} are outside [0, {self.num_outputs}) for classifier {self.source}")
        return [int(c) for c in positive]

    def check_input(self, dim: int, what: str) -> None:
        if dim != self.input_dim:
            raise CurationInputError(
                f"classifier {self.source} takes {self.input_dim}-dimensional input but {what} have dimension {dim}; "
                "train the head on embeddings of the same backbone"
            )


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: np.asarray(data[key]) for key in data.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except CurationInputError:
        raise
    except Exception as exc:
        raise CurationInputError(f"cannot read classifier file {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model", "head"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CurationInputError(f"classifier file {path} holds a {type(state).__name__}, expected a state dict of tensors")
    return {key: value.detach().cpu().numpy() for key, value in state.items() if hasattr(value, "detach")}


def load_classifier(path: str | Path) -> ClassifierHead:
    path = Path(path)
    if not path.is_file():
        raise CurationInputError(f"classifier file not found: {path} (a .pt/.pth state dict, .npz or .safetensors)")
    tensors = _read_tensors(path)
    prefixes = sorted((key[: -len("weight")] for key in tensors if key.endswith("weight")), key=_natural_key)
    layers = []
    for prefix in prefixes:
        weight = np.asarray(tensors[prefix + "weight"], dtype=np.float32)
        if weight.ndim != 2:
            raise CurationInputError(f"classifier {path}: {prefix}weight has shape {weight.shape}, expected [out, in]")
        bias = np.asarray(tensors.get(prefix + "bias", np.zeros(weight.shape[0])), dtype=np.float32)
        if bias.shape != (weight.shape[0],):
            raise CurationInputError(f"classifier {path}: {prefix}bias has shape {bias.shape}, expected ({weight.shape[0]},)")
        if layers and layers[-1][0].shape[0] != weight.shape[1]:
            raise CurationInputError(
                f"classifier {path}: layer {prefix}weight takes {weight.shape[1]} inputs but the layer before "
                f"gives {layers[-1][0].shape[0]}"
            )
        layers.append((weight, bias))
    if not layers:
        raise CurationInputError(f"classifier file {path} has no '<layer>.weight' entries (keys: {sorted(tensors)[:8]})")
    return ClassifierHead(layers, str(path))
