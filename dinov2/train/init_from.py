"""``train.init_from``: start a new run from another run's model (DINOv3-style adaptation jobs).

``train.init_from=RUN_DIR`` (its newest good checkpoint), a ``checkpoints/`` directory or one
``step_N`` directory: the student, the teacher, their heads and the loss centers are loaded; the
optimizer, the step counter, the data position and the RNG start afresh, so the new run's schedules
(lr warmup, teacher momentum, temperature) start at their step 0. Position embeddings saved on another
grid (the source trained at another ``crops.global_crops_size``) are resampled to this run's grid
with the backbone's own resampling (``dinov2.hub.filters``); any other difference of keys or shapes is
one error naming the keys. Works on any world size (DCP reassembles the shards).

The trainer applies it only when its own output directory has no checkpoint: a requeued job resumes
from its own progress, not from the source again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from dinov2.checkpoint import CheckpointManager, read_metadata
from dinov2.checkpoint.manager import CheckpointMismatchError
from dinov2.configs import ConfigError
from dinov2.hub.filters import POS_EMBED, resample_pos_embed
from dinov2.state_dicts import key_mismatches

logger = logging.getLogger(__name__)

SECTION = "model."


def find_init_checkpoint(location: str | Path) -> Path:
    """The checkpoint ``train.init_from`` names: a ``step_N`` directory as given, else the newest good
    checkpoint of a run directory or a ``checkpoints/`` directory; a :class:`ConfigError` if there is none."""
    path = Path(location)
    if not path.exists():
        raise ConfigError(f"train.init_from={location}: no such directory")
    if (path / ".metadata").exists():
        return path
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            found = CheckpointManager(directory).latest_good()
            if found is not None:
                return found[1]
    raise ConfigError(
        f"train.init_from={location}: no complete checkpoint there (give a run directory with checkpoints/step_N, "
        f"its checkpoints/ directory or one step_N directory)"
    )


def _is_pos_embed(key: str) -> bool:
    return key.split(".")[-1] == POS_EMBED


def init_model_from(model: nn.Module, location: str | Path, *, process_group=None) -> Path:
    """Load the model section (student, teacher, heads, loss centers) of the checkpoint ``location`` names
    into ``model`` (an ``SSLMetaArch``, sharded or not; collective when distributed). Returns its path."""
    path = find_init_checkpoint(location)
    saved = {key[len(SECTION):]: meta for key, meta in read_metadata(path).state_dict_metadata.items()
             if key.startswith(SECTION) and isinstance(meta, TensorStorageMetadata)}
    state = get_model_state_dict(model)
    resample = {key for key, value in state.items()
                if _is_pos_embed(key) and key in saved and tuple(saved[key].size) != tuple(value.shape)}
    wanted = {k: v.shape for k, v in state.items() if k not in resample}
    found = {k: m.size for k, m in saved.items() if k not in resample}
    problems = key_mismatches(wanted, found, found_name="checkpoint", wanted_name="run")
    if problems:
        raise CheckpointMismatchError(
            f"train.init_from={location}: checkpoint {path} does not fit this run's model (architecture, heads or "
            f"losses differ): " + "; ".join(problems)
        )
    loading = {k: (torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype) if k in resample else v)
               for k, v in state.items()}
    CheckpointManager(path.parent, process_group=process_group).load({"model": loading}, path, strict_sections=())
    backbone = model.student.backbone
    for key in resample:
        target = state[key]
        full = resample_pos_embed(loading[key], target.shape, interpolate_offset=backbone.interpolate_offset,
                                  antialias=backbone.interpolate_antialias)
        if isinstance(target, DTensor):
            full = distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        loading[key] = full.to(device=target.device, dtype=target.dtype)
    set_model_state_dict(model, loading)
    logger.info("train.init_from: model (student, teacher, heads, loss centers) from %s; fresh optimizer and step "
                "counter%s", path, f"; resampled {', '.join(sorted(resample))}" if resample else "")
    return path
