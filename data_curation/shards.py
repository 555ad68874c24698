"""Embedding a pool as a shard set: N shard jobs, then one explicit, checked merge.

    dinov2-curate embed --images LIST --output-dir D --shards 64 --launcher slurm   # array + merge
    dinov2-curate embed --images LIST --output-dir D --shard 5/64                   # one shard (your own array)
    dinov2-curate embed-merge --output-dir D [--shards 64]                          # check, then merge

Shard ``i`` of ``n`` is the contiguous block :func:`data_curation.arrays.shard_slice` of the sorted
image list; it writes ``D/shards/iiiii-of-nnnnn/{embeddings.npy,paths.txt,errors.txt}`` and its
done-marker. The merge refuses, before reading anything, a shard set with a missing shard (no
folder), an incomplete one (folder without a finished marker: still running or killed) or shards
that disagree (another image list, backbone, resolution or dtype), naming the shard indices. It
then concatenates the shards in order into ``D/embeddings.npy``, ``D/paths.txt`` and
``D/errors.txt`` (the same files, row for row, as one unsharded run), which every later stage reads
as one pool. The merge is itself a stage: rerun with unchanged shards, it does nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import submitit

from .arrays import CurationInputError
from .choices import EmbeddingDtype, ShardLauncher
from .embed_stage import EMBED_OUTPUTS, embed_stage, publish_embeddings, read_lines_or_empty, shard_dir
from .launch import LaunchOptions, run_array, set_threads
from .stage_state import StageResult, StageState

SHARD_FOLDER = re.compile(r"^(\d{5})-of-(\d{5})$")
# Marker params that may differ between the shards of one set: they name the shard itself or
# do not change its rows (the part size only sets the resume granularity).
PER_SHARD_PARAMS = ("paths_sha256", "shard", "part_size")


def shard_counts_present(output_dir: str | Path) -> list[int]:
    folder = Path(output_dir) / "shards"
    found = {int(m.group(2)) for p in folder.iterdir() if (m := SHARD_FOLDER.match(p.name))} if folder.is_dir() else set()
    return sorted(found)


def resolve_shard_count(output_dir: str | Path, count: int | None) -> int:
    """``count`` when given, else the one shard count found under ``output_dir/shards``."""
    if count is not None:
        if count < 1:
            raise CurationInputError(f"--shards must be >= 1, got {count}")
        return count
    found = shard_counts_present(output_dir)
    if not found:
        raise CurationInputError(f"no shard folders (shards/iiiii-of-nnnnn) under {output_dir}; run `embed --shard i/n` first")
    if len(found) > 1:
        raise CurationInputError(f"{output_dir}/shards holds shard sets of several sizes {found}: pass --shards N")
    return found[0]


def shard_set_status(output_dir: str | Path, count: int) -> tuple[list[int], list[int], list[int]]:
    """(complete, incomplete, missing) shard indices of the set of ``count`` shards."""
    complete, incomplete, missing = [], [], []
    for index in range(count):
        folder = shard_dir(output_dir, index, count)
        if not folder.is_dir():
            missing.append(index)
        elif (folder / ".embed.done.json").is_file() and all((folder / name).is_file() for name in EMBED_OUTPUTS):
            complete.append(index)
        else:
            incomplete.append(index)
    return complete, incomplete, missing


def _compact(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            runs.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ", ".join(runs)


def check_shard_set(output_dir: str | Path, count: int) -> list[dict]:
    """Raise, naming the shard indices, unless all ``count`` shards finished with the same
    settings on the same image list; return their markers in shard order."""
    _, incomplete, missing = shard_set_status(output_dir, count)
    if missing or incomplete:
        problems = []
        if missing:
            problems.append(f"missing shards {_compact(missing)} (no folder)")
        if incomplete:
            problems.append(f"incomplete shards {_compact(incomplete)} (started, not finished: running or killed)")
        raise CurationInputError(
            f"shard set {Path(output_dir) / 'shards'} of {count} shards is not complete: {'; '.join(problems)}. "
            f"Run `dinov2-curate embed ... --shard i/{count}` for those indices (or `embed ... --shards {count}`, "
            "which runs only the unfinished ones), then merge.")
    markers = [json.loads((shard_dir(output_dir, i, count) / ".embed.done.json").read_text()) for i in range(count)]
    for index, marker in enumerate(markers):
        if marker["params"].get("shard", f"{index}/{count}") != f"{index}/{count}":
            raise CurationInputError(f"shard folder {shard_dir(output_dir, index, count)} holds shard "
                                     f"{marker['params']['shard']}, not {index}/{count}")
    shared = [{k: v for k, v in m["params"].items() if k not in PER_SHARD_PARAMS} for m in markers]
    for key in sorted(set().union(*shared)):
        values = {}
        for index, params in enumerate(shared):
            values.setdefault(json.dumps(params.get(key), sort_keys=True), []).append(index)
        if len(values) > 1:
            detail = "; ".join(f"shards {_compact(ix)}: {value}" for value, ix in values.items())
            what = "another image list" if key == "pool_sha256" else f"{key!r}"
            raise CurationInputError(f"the {count} shards under {Path(output_dir) / 'shards'} disagree on {what} "
                                     f"({detail}); re-embed the odd ones with the same options")
    return markers


def merge_embed_shards(output_dir: str | Path, count: int | None = None) -> StageResult:
    """Check the shard set (see :func:`check_shard_set`), then concatenate it into ``output_dir``."""
    output_dir = Path(output_dir)
    count = resolve_shard_count(output_dir, count)
    markers = check_shard_set(output_dir, count)
    folders = [shard_dir(output_dir, i, count) for i in range(count)]
    inputs = [folder / name for folder in folders for name in EMBED_OUTPUTS]
    state = StageState(output_dir, "embed-merge", {"shards": count}, inputs, EMBED_OUTPUTS)
    if state.is_complete():
        return state.skipped_result()
    state.begin()
    arrays = [np.load(folder / "embeddings.npy", mmap_mode="r") for folder in folders]
    paths = [line for folder in folders for line in read_lines_or_empty(folder / "paths.txt")]
    errors = [line for folder in folders for line in read_lines_or_empty(folder / "errors.txt")]
    summary = publish_embeddings(arrays, paths, errors, output_dir)
    summary.update(shards=count, images=sum(int(m["summary"].get("images", 0)) for m in markers))
    return state.complete(summary)


def shard_device(index: int, device: str, gpu_count: int) -> str:
    """Shard ``index``'s device: with ``auto`` and several visible GPUs, GPU ``index mod count``."""
    if device == "auto" and gpu_count > 1:
        return f"cuda:{index % gpu_count}"
    return device


class EmbedShardJob(submitit.helpers.Checkpointable):
    """What each array task runs: ``embed_stage`` on shard ``index`` of ``count`` (resumable, so a
    requeued task continues at its first unfinished part)."""

    def __init__(self, images: str, output_dir: str, count: int, options: dict, threads: int | None = None):
        self.images, self.output_dir, self.count = images, output_dir, count
        self.options, self.threads = dict(options), threads

    def __call__(self, index: int) -> dict:
        import torch

        set_threads(self.threads)
        options = dict(self.options)
        options["device"] = shard_device(index, options.get("device", "auto"), torch.cuda.device_count())
        result = embed_stage(self.images, self.output_dir, shard=(index, self.count), progress=False, **options)
        return result.summary


def embed_sharded(images, output_dir, *, shards: int, launch: LaunchOptions = LaunchOptions(),
                  dry_run: bool = False, **embed_options) -> StageResult | str:
    """Embed ``images`` as ``shards`` jobs (only the unfinished shards are started), then merge.
    ``embed_options`` are those of :func:`embed_stage` (not ``model``: a job rebuilds the backbone
    by name). Returns the merge's result, or with ``dry_run`` the sbatch script / a plan."""
    from . import embed
    from .embed_stage import validate_embed_options, validate_shard_count
    from .launch import sbatch_script

    if "model" in embed_options:
        raise CurationInputError("sharded embedding builds the backbone in every job: pass backbone= and weights=, not model=")
    if shards < 1:
        raise CurationInputError(f"--shards must be >= 1, got {shards}")
    launch.validate()
    validate_embed_options(*(embed_options.get(k, d) for k, d in (("image_size", 224), ("resize_size", 256),
                             ("dtype", EmbeddingDtype.float32), ("part_size", 4096), ("batch_size", 32))))
    validate_shard_count(shards, len(embed.list_images(images)))
    output_dir = Path(output_dir).resolve()
    folder = Path(launch.folder) if launch.folder else output_dir / "submitit"
    complete, _, _ = shard_set_status(output_dir, shards)
    todo = [i for i in range(shards) if i not in complete]
    if dry_run:
        if launch.launcher == ShardLauncher.slurm:
            return sbatch_script(launch, len(todo), folder, "dinov2-curate-embed")
        return f"would start {len(todo)} local processes for shards {_compact(todo) or 'none'} of {shards}, then merge"
    job = EmbedShardJob(str(Path(images).resolve()), str(output_dir), shards, embed_options,
                        launch.threads_per_job(max(len(todo), 1)))
    submitted = run_array(job, todo, launch, folder, "dinov2-curate-embed")
    if not launch.wait:
        ids = ", ".join(str(j.job_id) for j in submitted)
        return (f"submitted {len(submitted)} shard jobs ({ids}); logs in {folder}. When they are done: "
                f"dinov2-curate embed-merge --output-dir {output_dir} --shards {shards}")
    return merge_embed_shards(output_dir, shards)
