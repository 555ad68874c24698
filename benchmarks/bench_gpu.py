"""Everything issue 14 measures on a GPU, in ONE run of under 8 minutes, one JSON line per result.

Each result is printed (and appended to ``--out``) as soon as it exists, most important first, so a
run cut short still returns data; items that would not fit the remaining ``--budget-s`` are reported
as skipped. Items:

1. ``env``: hardware, torch, which attention kernels pass a forward+backward probe in bf16;
2. ``attention_check``: every usable kernel against ``math`` (values and gradients) on the device;
3. ``train_step``: the real ``Trainer.train_step`` (ms/step, images/s, peak GiB) for the recipe
   workloads -- ViT-L/14 batch 32 (2x224 + 8x98, drop path 0.4 with compute skipped, Sinkhorn, 131,072
   prototypes, separate iBOT head, SwiGLU), eager and compiled, then each attention kernel; ViT-g/14
   batch 12; ViT-S/14 batch 64;
4. ``plain_backbone``: the same architecture and crops, forward+backward only, eager and compiled: the
   bound the step is compared with, measured in the same process;
5. ``sync_sites``: the host-device synchronisations of one step (``torch.cuda.set_sync_debug_mode``);
   ``kernels``: folded Sinkhorn vs the official loop (2450 x 131,072), in-place vs out-of-place
   stochastic-depth adds over a ViT-L token stream;
6. ``input_pipeline``: the multi-crop loader with N workers on real JPEGs (scikit-image photos at 500x375).

``--quick`` runs the same code on tiny sizes (and on CPU, where CUDA-only items report skipped).

On the GPU machine (no omegaconf / iopath / portalocker there: carry them):
    pip install --target pydeps omegaconf iopath portalocker   # on a machine with the package index
    PYTHONPATH=pydeps python -m benchmarks.bench_gpu --out benchmarks/results/gpu_h200.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from benchmarks.bench_train import QUICK
from benchmarks.common import (
    RESULTS_DIR, JsonLines, build_trainer, hardware, plain_backbone_ms, prefetch_batches, synchronize,
    time_train_steps, write_results,
)
from dinov2.layers.attention_backends import (
    CONCRETE_BACKENDS, attention, math_attention, probe_backend, varlen_available,
)
from dinov2.layers.packing import PackLayout

REPO = Path(__file__).resolve().parent.parent
# (name, recipe, batch, extra overrides): the workloads of the issue, the official recipes' FFNs.
WORKLOADS = {
    "vitl14": ("train/vitl14.yaml", 32, ["student.ffn_layer=swiglufused"]),
    "vitg14": ("train/vitg14.yaml", 12, ["student.ffn_layer=swiglufused"]),
    "vits14": ("train/vits14.yaml", 64, []),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new items after this long")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per train-step item")
    parser.add_argument("--workers", type=int, default=None, help="input pipeline workers (default: cores, max 16)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (runs on CPU in seconds)")
    parser.add_argument("--only", default="attention,kernels,train,input",
                        help="comma-separated subset of: attention, kernels, train, input")
    parser.add_argument("--out", default=None, help="JSON lines file (default results/gpu_<device>.jsonl)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ items
def attention_check(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    layout = PackLayout(((2, 17), (4, 5))) if quick else PackLayout(((8, 257), (32, 50)))
    generator = torch.Generator().manual_seed(0)
    base = [torch.randn(layout.total_tokens, 2 if quick else 16, 64, generator=generator) for _ in range(3)]
    results = {}
    reference = None
    for name in ("math", *[b for b in CONCRETE_BACKENDS if b not in ("math", "sdpa_masked")]):
        probe = probe_backend(name, device, dtype)
        if not probe.ok:
            results[name] = {"probe": probe.error}
            continue
        inputs = [t.to(device, dtype, copy=True).requires_grad_() for t in base]  # fresh leaves per kernel
        out = attention(*inputs, layout, name)
        out.float().square().mean().backward()
        values = [out.detach().float()] + [t.grad.float().clone() for t in inputs]
        if reference is None:
            reference = values
        results[name] = {"probe": "ok", "max_abs_err_vs_math": [float((a - b).abs().max()) for a, b in
                                                                  zip(values, reference)]}
    return {"dtype": str(dtype), "layout": layout.groups, "backends": results}


def _official_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The official unfused loop (baseline): Q normalised in place ~9 full passes per round."""
    Q = torch.exp(logits.float() / temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def _old_subset_residual(x, layout, residual_fn, drop_prob):
    """Baseline: per-token scale tensors and an out-of-place index_add copying the whole stream."""
    kept_images, scales = [], []
    for batch, tokens in layout.groups:
        kept = max(int(batch * (1.0 - drop_prob)), 1)
        kept_images.append(torch.randperm(batch, device=x.device)[:kept])
        scales.append(torch.full((kept * tokens,), batch / kept, device=x.device, dtype=x.dtype))
    token_index, subset_layout = layout.token_indices_of_images(kept_images)
    residual = residual_fn(x[token_index], subset_layout)
    return torch.index_add(x, 0, token_index, residual.to(x.dtype) * torch.cat(scales)[:, None])


def kernels(device: torch.device, quick: bool, repeats: int = 5) -> dict:
    """Folded Sinkhorn vs the official loop at iBOT scale; in-place vs out-of-place stochastic-depth adds
    over a ViT-L student's token stream (two residual branches per block, the branch itself excluded)."""
    from benchmarks.common import time_call
    from dinov2.layers.drop_path import add_residual_on_kept_subset
    from dinov2.loss.centering import sinkhorn_knopp

    m, k = (64, 1024) if quick else ((2450, 131072) if device.type == "cuda" else (490, 16384))
    logits = torch.rand(m, k, device=device) * 2 - 1  # cosine-like, as the weight-normalised head gives
    folded = time_call(lambda: sinkhorn_knopp(logits, 0.07), device, repeats=repeats)
    official = time_call(lambda: _official_sinkhorn(logits, 0.07), device, repeats=repeats)
    error = float((sinkhorn_knopp(logits, 0.07) - _official_sinkhorn(logits, 0.07)).abs().max())
    batch, dim = (2, 64) if quick else ((32, 1024) if device.type == "cuda" else (4, 1024))
    layout = PackLayout(((2 * batch, 257), (8 * batch, 50)))
    x = torch.randn(layout.total_tokens, dim, device=device)

    def new_block():
        y = add_residual_on_kept_subset(x, layout, lambda t, lay: t, 0.4)
        return add_residual_on_kept_subset(y, layout, lambda t, lay: t, 0.4, inplace=True)

    def old_block():
        return _old_subset_residual(_old_subset_residual(x, layout, lambda t, lay: t, 0.4), layout,
                                    lambda t, lay: t, 0.4)

    new_ms, old_ms = time_call(new_block, device, repeats=repeats), time_call(old_block, device, repeats=repeats)
    return {"sinkhorn_shape": [m, k], "sinkhorn_folded_ms": folded, "sinkhorn_official_ms": official,
            "sinkhorn_speedup": official / folded, "sinkhorn_max_abs_diff": error,
            "drop_path_stream": [layout.total_tokens, dim], "drop_path_inplace_ms": new_ms,
            "drop_path_out_of_place_ms": old_ms, "drop_path_speedup": old_ms / new_ms}


def sync_sites(trainer, batch) -> dict:
    """File:line of every synchronising CUDA call during one train step."""
    if trainer.device.type != "cuda":
        return {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
    trainer.train_step([batch])  # warm (lazy inits)
    synchronize(trainer.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step([batch])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = Counter(f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"count": sum(sites.values()), "sites": dict(sites.most_common())}


def input_pipeline(workers: int, batch: int, batches: int, quick: bool) -> dict:
    from PIL import Image
    from skimage import data as photos

    from dinov2.configs import load_config
    from dinov2.train.build import build_dataset, build_train_loader

    size = (100, 75) if quick else (500, 375)
    sources = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.rocket()]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(64):
            image = Image.fromarray(sources[i % len(sources)]).resize(size)
            (image.transpose(Image.FLIP_LEFT_RIGHT) if i % 8 >= 4 else image).save(f"{tmp}/{i:03d}.jpg", quality=90)
        overrides = [f"data.dataset=folder:{tmp}", f"data.num_workers={workers}", f"train.batch_size_per_gpu={batch}"]
        cfg = load_config("train/vitl14.yaml", overrides + (QUICK[:3] if quick else []))
        loader = iter(build_train_loader(cfg, build_dataset(cfg.data.dataset, 3), start=0))
        next(loader)  # workers started
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        seconds = time.perf_counter() - start
        del loader
    images = batches * batch
    return {"workers": workers, "images_per_s": images / seconds, "images_per_s_per_worker": images / seconds / max(workers, 1),
            "image_size": size, "batch": batch}


def _train_item(out, name, device, steps, quick, compile=False, backend=None, bound=False, sync=False) -> None:
    recipe, batch, extra = WORKLOADS[name]
    overrides = [f"train.batch_size_per_gpu={2 if quick else batch}", *extra, f"compute.compile={str(compile).lower()}"]
    overrides += QUICK if quick else []
    if backend:
        overrides.append(f"student.attention_backend={backend}")
    if device.type == "cpu":
        overrides += ["compute.precision=fp32", "data.num_workers=0"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(recipe, overrides, Path(tmp), str(device))
        try:
            batches = prefetch_batches(trainer, 4)
            started = time.perf_counter()
            result = time_train_steps(trainer, batches, steps, warmup=1 if quick else 2)
            chosen = trainer.model.student.backbone.attention_backend
            out.emit("train_step", workload=name, batch=trainer.cfg.train.batch_size_per_gpu, compiled=compile,
                     attention=chosen, requested_attention=backend or "auto", seconds=time.perf_counter() - started,
                     **result)
            if bound:
                out.emit("plain_backbone", workload=name, attention=chosen,
                         **plain_backbone_ms(trainer, batches, steps, compile=compile, warmup=1 if quick else 2),
                         step_ms=result["ms_per_step"])
            if sync:
                out.emit("sync_sites", workload=name, **sync_sites(trainer, batches[0]))
        finally:
            trainer.close()
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def plan(args, device: torch.device, usable: list[str]) -> list[tuple[str, float, dict]]:
    """(item, rough seconds on a GPU, kwargs), most important first."""
    steps = 2 if args.quick else args.steps
    common = dict(device=device, steps=steps, quick=args.quick)
    items = [("vitl14 eager", 40, dict(name="vitl14", bound=True, sync=True, **common))]
    items += [("vitl14 compiled", 150, dict(name="vitl14", compile=True, bound=True, **common))]
    items += [(f"vitl14 eager {b}", 30, dict(name="vitl14", backend=b, **common)) for b in usable]
    items += [("vitg14 eager", 50, dict(name="vitg14", bound=True, **common)),
              ("vits14 eager", 25, dict(name="vits14", bound=True, **common)),
              ("vitg14 compiled", 150, dict(name="vitg14", compile=True, **common))]
    if args.quick:  # every code path once, tiny: one workload, no compile (minutes on a CPU)
        items = [item for item in items if item[2]["name"] == "vitl14" and not item[2].get("compile")][:2]
    elif device.type != "cuda":
        items = [item for item in items if not item[2].get("compile")]
    return items


def _already_measured(records: list[dict], kwargs: dict) -> bool:
    """A per-kernel item whose kernel ``auto`` already picked for the same eager workload."""
    return bool(kwargs.get("backend")) and any(
        r["kind"] == "train_step" and r["workload"] == kwargs["name"] and not r["compiled"]
        and r["attention"] == kwargs["backend"] for r in records)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = JsonLines(Path(args.out) if args.out else RESULTS_DIR / f"gpu_{device.type}{'_quick' if args.quick else ''}.jsonl")
    deadline = time.monotonic() + args.budget_s
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    probes = {name: probe_backend(name, device, dtype) for name in ("sdpa", "varlen", "xformers")}
    env = hardware()
    if device.type == "cuda":
        env["capability"] = torch.cuda.get_device_capability(device)
    out.emit("env", **env, device=str(device), varlen_in_torch=varlen_available(),
             probes={k: "ok" if p.ok else p.error for k, p in probes.items()})
    only = {item.strip() for item in args.only.split(",")}
    if "attention" in only:
        out.emit("attention_check", **attention_check(device, dtype, args.quick))
    if "kernels" in only:
        out.emit("kernels", **kernels(device, args.quick))
    usable = [name for name, p in probes.items() if p.ok]
    for label, seconds, kwargs in plan(args, device, usable) if "train" in only else []:
        if _already_measured(out.records, kwargs) and not args.quick:
            continue
        if not args.quick and time.monotonic() + seconds > deadline:
            out.emit("skipped", item=label, reason=f"needs ~{seconds:.0f} s, {deadline - time.monotonic():.0f} s left")
            continue
        try:
            _train_item(out, **kwargs)
        except Exception as error:  # noqa: BLE001 - report and go on with the next item
            out.emit("error", item=label, error=f"{type(error).__name__}: {error}"[:500])
    workers = args.workers if args.workers is not None else (0 if args.quick else min(os.cpu_count() or 1, 16))
    if "input" not in only:
        pass
    elif args.quick or time.monotonic() + 60 < deadline:
        try:
            out.emit("input_pipeline", **input_pipeline(workers, 2 if args.quick else 32, 2 if args.quick else 12,
                                                        args.quick))
        except Exception as error:  # noqa: BLE001
            out.emit("error", item="input_pipeline", error=f"{type(error).__name__}: {error}"[:500])
    else:
        out.emit("skipped", item="input_pipeline", reason="out of time")
    out.emit("done", seconds=args.budget_s - (deadline - time.monotonic()))
    write_summary(out, device)
    return out.records


def write_summary(out: JsonLines, device: torch.device) -> None:
    """The JSON lines as one markdown table next to them (results/<stem>.md)."""
    rows = []
    for r in out.records:
        if r["kind"] == "train_step":
            rows.append({"item": f"train_step {r['workload']} b{r['batch']} {'compiled' if r['compiled'] else 'eager'} "
                                 f"{r['attention']}", "ms": r["ms_per_step"], "images/s": r["images_per_s"],
                         "peak GiB": r.get("peak_gib", "")})
        elif r["kind"] == "plain_backbone":
            rows.append({"item": f"plain backbone {r['workload']} {'compiled' if r['compiled'] else 'eager'}",
                         "ms": r["ms_fwd_bwd"], "ratio": r["step_ms"] / r["ms_fwd_bwd"]})
        elif r["kind"] == "kernels":
            rows.append({"item": f"Sinkhorn {r['sinkhorn_shape']} folded / official", "ms": r["sinkhorn_folded_ms"],
                         "ratio": r["sinkhorn_speedup"]})
            rows.append({"item": f"drop-path adds {r['drop_path_stream']} in place / out of place",
                         "ms": r["drop_path_inplace_ms"], "ratio": r["drop_path_speedup"]})
        elif r["kind"] == "input_pipeline":
            rows.append({"item": f"input pipeline, {r['workers']} workers", "images/s": r["images_per_s"]})
        elif r["kind"] in ("sync_sites", "skipped", "error"):
            rows.append({"item": r["kind"], "ratio": json.dumps({k: v for k, v in r.items() if k != "kind"})[:200]})
    if out.path is not None and rows:
        title = f"bench_gpu on {device.type} ({out.path.name}; ratio: step / plain backbone, or speed-up)"
        write_results(out.path.stem, title, rows, ["item", "ms", "images/s", "peak GiB", "ratio"],
                      {"records": out.records}, directory=out.path.parent)


if __name__ == "__main__":
    main()
