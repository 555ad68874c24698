"""The backbone flags of ``dinov2-eval``: one hub name, exported file or run, resolved to a model; a
described backbone (``dinov2.hub.description``) fills in the input flags left out (image size, resize
ratio, mean, std), and names itself in results and figures."""

from __future__ import annotations

import argparse
import json
import os

import torch

from dinov2.compute import resolve_device

from dinov2.eval.backbone import ARCHS, BackboneError, model_in_chans, resolve_described

AUTOCAST = ("off", "bf16", "fp16")


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (a hub name, an exported file, or a training run)")
    g.add_argument("--backbone", metavar="NAME", help="hub entry point, e.g. dinov2_vits14, dinov2_vitb14_reg")
    g.add_argument("--weights", metavar="W", default=None,
                   help="with --backbone: LVD142M (released, the default), a .pth/.safetensors path, a file:// URL, "
                   "or 'random' for a randomly initialised backbone; with --backbone-file or --run only 'random': "
                   "the same architecture randomly initialised (a baseline)")
    g.add_argument("--backbone-file", metavar="FILE", help="backbone file (.pth/.safetensors) from dinov2-export: it "
                   "describes its architecture and input, no other flag needed (a plain released-layout state "
                   "dict needs --arch)")
    g.add_argument("--run", metavar="RUN_DIR", help="a training run (or checkpoint) directory: its newest checkpoint's "
                   "backbone, described by the run's config.yaml")
    g.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="with --run: the EMA teacher (default) or the student")
    g.add_argument("--arch", choices=ARCHS,
                   help="architecture of a plain --backbone-file that does not describe itself")
    g.add_argument("--patch-size", type=int, help="check against --backbone-file (read from the file otherwise)")
    g.add_argument("--num-register-tokens", type=int, help="check against --backbone-file (read from the file)")
    g.add_argument("--embed-dim", type=int, help="--backbone-file of a non-standard size: width (as student.embed_dim)")
    g.add_argument("--depth", type=int, help="--backbone-file of a non-standard size: blocks (as student.depth)")
    g.add_argument("--num-heads", type=int, help="--backbone-file of a non-standard size: heads (as student.num_heads)")
    n = p.add_argument_group("input normalisation")
    n.add_argument("--mean", type=float, nargs="+", help="per-channel mean (default: the described backbone's, else "
                   "ImageNet's for RGB backbones; required for other channel counts: the training crops.mean)")
    n.add_argument("--std", type=float, nargs="+", help="per-channel std (as --mean)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps (default auto)")
    r.add_argument("--autocast", choices=AUTOCAST, default="off", help="mixed precision for feature extraction")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    r.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")


def check_backbone_args(args) -> None:
    named = [flag for flag, value in (("--backbone", args.backbone), ("--backbone-file", args.backbone_file),
                                      ("--run", args.run)) if value is not None]
    if not named:
        raise BackboneError("name a backbone: --backbone dinov2_vits14 [--weights W], --backbone-file FILE "
                            "(from dinov2-export) or --run RUN_DIR")
    if len(named) > 1:
        raise BackboneError(f"give one of --backbone, --backbone-file and --run, not {' and '.join(named)}")
    if args.backbone is None and args.weights not in (None, "random"):
        raise BackboneError(f"--weights {args.weights}: with {named[0]} only --weights random (the same architecture "
                            "randomly initialised) is meaningful; the file or run holds the weights")


DEFAULT_IMG_SIZE, DEFAULT_RESIZE_RATIO = 224, 256 / 224


def load_backbone(args) -> torch.nn.Module:
    """The backbone; a described one (exported file or run) also fills in the input flags left out."""
    random_init = args.weights == "random"
    if args.backbone is not None:
        weights = None if random_init else (args.weights or "LVD142M")
    else:
        weights = None
    model, description = resolve_described(
        name=args.backbone, weights=weights, backbone_file=args.backbone_file, run=args.run, which=args.which,
        random_init=random_init and args.backbone is None, arch=args.arch, patch_size=args.patch_size,
        num_register_tokens=args.num_register_tokens, embed_dim=args.embed_dim, depth=args.depth,
        num_heads=args.num_heads, device=resolve_device(args.device),
    )
    args.description = description
    if description is not None:
        for flag, value in (("mean", description.mean), ("std", description.std)):
            if getattr(args, flag) is None:
                setattr(args, flag, list(value))
    if getattr(args, "img_size", "absent") is None:
        args.img_size = description.img_size if description is not None else DEFAULT_IMG_SIZE
    if getattr(args, "resize_ratio", "absent") is None:
        args.resize_ratio = description.resize_ratio if description is not None else DEFAULT_RESIZE_RATIO
    return model


def describe_backbone(args, model) -> dict:
    description = getattr(args, "description", None)
    return {
        "backbone": args.backbone, "weights": (args.weights or "LVD142M") if args.backbone else args.weights,
        "backbone_file": args.backbone_file, "run": args.run, "which": args.which if args.run else None,
        "arch": description.arch if description is not None else args.arch,
        "description": json.loads(description.to_json()) if description is not None else None,
        "embed_dim": int(model.embed_dim), "patch_size": int(model.patch_size),
        "num_register_tokens": int(getattr(model, "num_register_tokens", 0)),
        "in_chans": model_in_chans(model), "mean": args.mean, "std": args.std,
    }


def backbone_label(args, description) -> str:
    """How a figure names the backbone: what was given, its weights, and its architecture if described."""
    if args.backbone is not None:
        text = f"{args.backbone}, weights {'random init' if args.weights == 'random' else args.weights or 'LVD142M'}"
    else:
        source = args.backbone_file or f"run {args.run} ({args.which})"
        text = f"{source}{', random init' if args.weights == 'random' else ''}"
    if description is not None:
        d = description
        step = d.source.get("step")
        text += (f" [{d.arch} {d.embed_dim}/{d.depth}/{d.num_heads}, patch {d.patch_size}, trained at {d.img_size} px"
                 f"{f', step {step}' if step is not None else ''}]")
    return text


def compare_args(args, spec: str):
    """A copy of ``args`` naming one backbone of --compare (file, run directory or hub name)."""
    one = argparse.Namespace(**vars(args))
    random_init = spec.startswith("random:")
    spec = spec.removeprefix("random:")
    one.backbone = one.backbone_file = one.run = None
    if os.path.isfile(spec):
        one.backbone_file = spec
    elif os.path.isdir(spec):
        one.run = spec
    else:
        one.backbone = spec
    if random_init:
        one.weights = "random"
    elif one.backbone is None:
        one.weights = None
    check_backbone_args(one)
    return one
