"""`dinov2-curate`: build a pretraining set from an uncurated image pool.

    dinov2-curate hash-dedup --images DIR|LIST --output-dir D [--bits 64 --radius 10]
    dinov2-curate filter    --embeddings E.npy --classifier head.pth --threshold 0.5 --output-dir D
    dinov2-curate blur-faces --images DIR|LIST|manifest.txt --output-dir D
    dinov2-curate embed     --images DIR|LIST --backbone dinov2_vits14 --output-dir D [--shards N --launcher local|slurm]
    dinov2-curate embed     --images DIR|LIST --output-dir D --shard i/n      (one shard; then embed-merge)
    dinov2-curate embed-merge --output-dir D [--shards N]
    dinov2-curate dedup     --embeddings E.npy --k K --threshold T --output-dir D [--index-shards S --launcher local]
    dinov2-curate dedup     --embeddings E.npy --against R.npy --threshold T --output-dir D
    dinov2-curate retrieve  --embeddings E.npy --queries Q.npy --k K --output-dir D
    dinov2-curate kmeans    --embeddings E.npy --levels 3 --clusters 10000,1000,100 --output-dir D
    dinov2-curate sample    --clusters-dir D --target N --output-dir D2
    dinov2-curate manifest  --paths paths.txt --select selected.npy [--select keep.npy] --output M
    dinov2-curate run       --config configs/curation/default.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .arrays import CurationInputError
from .choices import EmbeddingDtype, FaissDevice, GroupRule, KMeansDtype, KMeansInit, PickStrategy, ShardLauncher

PROG = "dinov2-curate"


def _cluster_list(text: str) -> list:
    """10000,1000,100 or 0.01x,0.001x (fractions of the rows clustered), see cluster_counts.py."""
    from .cluster_counts import parse_cluster_counts

    try:
        return parse_cluster_counts([part for part in text.split(",") if part.strip()])
    except CurationInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard(text: str) -> tuple[int, int]:
    from .embed import parse_shard

    try:
        return parse_shard(text)
    except CurationInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_index_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FAISS index")
    group.add_argument("--factory", default="Flat", help="FAISS factory string: Flat (exact, default), IVF4096,Flat, HNSW32, IVF4096,PQ32 ...")
    group.add_argument("--search-params", default="", help='e.g. "nprobe=16" (IVF) or "efSearch=128" (HNSW)')
    group.add_argument("--device", default=FaissDevice.auto.value, choices=FaissDevice.values(), help="GPU when faiss-gpu and a GPU are present (auto)")
    group.add_argument("--train-size", type=int, default=200_000, help="rows used to train IVF/PQ indexes")
    group.add_argument("--recall-sample", type=int, default=1000, help="queries for the recall-vs-exact report of approximate indexes (0: skip)")
    group.add_argument("--chunk-rows", type=int, default=65536, help="rows per chunk (memory bound, resume granularity)")
    group.add_argument("--seed", type=int, default=0)


def _add_launch_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(f"job array ({what}: one job per shard, through submitit)")
    group.add_argument("--launcher", choices=ShardLauncher.values(), help="local: one process per shard on this machine "
                       "(GPU i mod #GPUs); slurm: a job array, one task (and --gpus-per-job GPUs) per shard")
    group.add_argument("--parallel", type=int, help="at most this many shards at once (default: all)")
    group.add_argument("--partition", help="slurm partition")
    group.add_argument("--time-min", type=int, default=24 * 60, help="time limit per shard job, minutes")
    group.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs per shard job")
    group.add_argument("--cpus-per-job", type=int, default=8, help="slurm: CPUs per shard job")
    group.add_argument("--slurm", action="append", default=[], metavar="KEY[=VALUE]", help="extra #SBATCH option (repeatable)")
    group.add_argument("--setup", action="append", default=[], metavar="CMD", help="shell line run before each job (repeatable)")
    group.add_argument("--logs", help="submitit folder for logs (default OUTPUT_DIR/submitit)")
    group.add_argument("--no-wait", action="store_true", help="slurm: submit and return (merge later)")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script (slurm) or the plan; start nothing")


def _launch_options(args):
    from .launch import LaunchOptions

    if args.launcher is None:
        return None
    return LaunchOptions(
        launcher=args.launcher, folder=args.logs, parallelism=args.parallel, timeout_min=args.time_min,
        partition=args.partition, gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
        slurm=tuple(args.slurm), setup=tuple(args.setup), wait=not args.no_wait,
    )


def _index_options(args):
    from .index import IndexOptions  # here, not at the top: faiss would slow down --help

    return IndexOptions(
        factory=args.factory, search_params=args.search_params, device=args.device, train_size=args.train_size,
        recall_sample=args.recall_sample, seed=args.seed, chunk_rows=args.chunk_rows,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("hash-dedup", help="raw pool: near-exact copies by PCA hash -> kept_paths.txt, report.csv")
    p.add_argument("--images", required=True, help="folder of images (recursive) or list file (one path a line)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--bits", type=int, default=64, help="code length (multiple of 8; 64 or 128)")
    p.add_argument("--radius", type=int, default=10, help="Hamming radius: codes at most this many bits apart are copies")
    p.add_argument("--thumb-size", type=int, default=16, help="side of the grayscale thumbnail the hash is computed on")
    p.add_argument("--factory", default="BFlat", help="FAISS binary index: BFlat (exact), BHash4x16 (exact, large pools), BIVF1024")
    p.add_argument("--search-params", default="", help='e.g. "nprobe=16" for BIVF')
    p.add_argument("--rule", choices=GroupRule.values(), default=GroupRule.representative.value,
                   help="representative (default): a copy is removed only if it is within the radius of the kept image; "
                   "connected: connected components (chains merge)")
    p.add_argument("--basis", help="PCA basis .npz of an earlier run (default: fitted on a sample of this pool)")
    p.add_argument("--fit-sample", type=int, default=100_000, help="images the PCA basis is fitted on")
    p.add_argument("--part-size", type=int, default=4096, help="images per resumable part")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("filter", help="drop rows whose classifier score exceeds a threshold -> keep.npy, scores.npy, report.csv")
    p.add_argument("--embeddings", required=True, help="embeddings.npy (paths.txt beside it names the rows in the report)")
    p.add_argument("--classifier", required=True, help="head file: .pt/.pth state dict, .npz or .safetensors (linear or MLP)")
    p.add_argument("--threshold", type=float, required=True, help="remove rows whose score (a probability) is above it")
    p.add_argument("--positive-class", type=int, action="append", help="class index that counts as positive (repeatable; "
                   "default: the only output, or class 1 of two)")
    p.add_argument("--output-dir", required=True)

    p = sub.add_parser("blur-faces", help="blurred copies of images with faces -> manifest.txt, faces.csv")
    p.add_argument("--images", required=True, help="folder, list file or manifest (one path a line)")
    p.add_argument("--output-dir", required=True, help="blurred copies go to OUTPUT_DIR/blurred/ (never in place)")
    p.add_argument("--cascade", default="haarcascade_frontalface_default.xml", help="OpenCV Haar cascade name or XML path")
    p.add_argument("--scale-factor", type=float, default=1.1)
    p.add_argument("--min-neighbors", type=int, default=5)
    p.add_argument("--min-size", type=int, default=24, help="smallest face side in pixels")
    p.add_argument("--margin", type=float, default=0.1, help="box enlarged by this fraction on each side")
    p.add_argument("--strength", type=float, default=0.25, help="blur sigma as a fraction of the box side")
    p.add_argument("--part-size", type=int, default=256)

    p = sub.add_parser("embed", help="embed images with a backbone -> embeddings.npy, paths.txt, errors.txt")
    p.add_argument("--images", required=True, help="folder of images (recursive) or list file (one path a line); "
                   "folder:DIR / manifest:LIST as in dinov2-train")
    p.add_argument("--backbone", default="dinov2_vits14", help="hub backbone name (default dinov2_vits14), or a "
                   "backbone file from dinov2-export (it describes its architecture and input; no --weights)")
    p.add_argument("--weights", default="LVD142M", help="LVD142M (released), a local .pth, a file:// URL, or 'random'")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--shard", type=_shard, default=None, help="embed only shard i of n (e.g. 0/4) into "
                   "OUTPUT_DIR/shards/; merge with embed-merge once all n are done")
    p.add_argument("--shards", type=int, help="embed as N shard jobs (see --launcher; only unfinished shards start), "
                   "then check and merge them")
    p.add_argument("--image-size", type=int, default=224, help="center-crop size (multiple of 14)")
    p.add_argument("--resize-size", type=int, default=256, help="shorter side before the crop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--dtype", choices=EmbeddingDtype.values(), default=EmbeddingDtype.float32.value)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--part-size", type=int, default=4096, help="images per resumable part")
    _add_launch_options(p, "--shards")

    p = sub.add_parser("embed-merge", help="check that every shard of `embed --shard i/n` finished, then merge them "
                       "into OUTPUT_DIR/embeddings.npy, paths.txt, errors.txt")
    p.add_argument("--output-dir", required=True, help="the --output-dir the shards were embedded with")
    p.add_argument("--shards", type=int, help="number of shards n (default: the one n found under OUTPUT_DIR/shards)")

    p = sub.add_parser("dedup", help="self-dedup (--k) or relative dedup (--against) -> keep.npy")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--threshold", type=float, required=True, help="cosine similarity in [-1, 1]")
    p.add_argument("--k", type=int, help="self-dedup: neighbours per row in the similarity graph")
    p.add_argument("--against", action="append", help="relative dedup: reference embeddings .npy (repeatable)")
    p.add_argument("--rule", choices=GroupRule.values(), default=GroupRule.representative.value,
                   help="self-dedup groups: representative (default, no chaining) or connected components")
    p.add_argument("--index-shards", type=int, default=1, help="self-dedup: search S index shards (1/S of the "
                   "pool each) and merge their neighbours; exact (Flat) gives the same pairs as one index")
    p.add_argument("--search-shard", type=int, help="self-dedup: search only index shard s of --index-shards and "
                   "stop (your own job array); rerun without it to merge")
    p.add_argument("--output-dir", required=True)
    _add_index_options(p)
    _add_launch_options(p, "--index-shards")

    p = sub.add_parser("retrieve", help="pool rows nearest to curated queries -> neighbors/similarities/selected.npy")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--k", type=int, help="sample-based: nearest pool rows per query")
    p.add_argument("--clusters", type=int, help="cluster-based: k-means clusters of the pool")
    p.add_argument("--per-cluster", type=int, help="cluster-based: rows taken from each cluster holding a query")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (cluster-based)")
    p.add_argument("--output-dir", required=True)
    _add_index_options(p)

    p = sub.add_parser("kmeans", help="hierarchical k-means with resampling -> level{l}_{centroids,assignment,distances}.npy")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--clusters", type=_cluster_list, required=True, help="clusters per level, level 1 first: 10000,1000,100; "
                   "or relative to the rows clustered: 0.01x,0.001x,0.0001x (0.01x = one cluster per 100 rows)")
    p.add_argument("--levels", type=int, help="number of levels (must match --clusters)")
    p.add_argument("--rows", help="cluster only these rows (.npy of row indices, e.g. dedup keep.npy)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--resampling-steps", type=int, default=5)
    p.add_argument("--sample-size", type=int, default=10, help="points per cluster kept by a resampling step")
    p.add_argument("--strategy", choices=PickStrategy.values(), default=PickStrategy.closest.value, help="how resampling picks points")
    p.add_argument("--init", choices=KMeansInit.values(), default=KMeansInit.auto.value)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=FaissDevice.auto.value, choices=FaissDevice.values())
    p.add_argument("--distributed", action="store_true", help="torch.distributed implementation: start one process per "
                   "GPU/CPU shard with torchrun or srun (gloo on CPU, NCCL on GPUs); same clusters for any process count")
    p.add_argument("--dtype", choices=KMeansDtype.values(), default=KMeansDtype.float32.value, help="--distributed: distance precision")

    p = sub.add_parser("sample", help="balanced hierarchical sampling -> selected.npy")
    p.add_argument("--clusters-dir", required=True, help="output folder of `kmeans`")
    p.add_argument("--target", type=int, required=True, help="rows to select")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--strategy", choices=PickStrategy.values(), default=PickStrategy.random.value)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("manifest", help="paths of the selected rows -> manifest (one path a line)")
    p.add_argument("--paths", required=True, help="paths.txt from `embed`")
    p.add_argument("--select", action="append", required=True, help="row-index .npy (repeatable: rows in all of them)")
    p.add_argument("--output", required=True)

    p = sub.add_parser("run", help="the whole chain from one YAML config")
    p.add_argument("--config", required=True, help="YAML file, or the name of a shipped one (default)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. embed.images=/data self_dedup.threshold=0.95")
    return parser


def _dispatch(args) -> str:
    from . import stages  # imported here so that --help answers at once

    progress = not args.quiet
    if args.command == "hash-dedup":
        from .hash_dedup import hash_dedup_stage

        result = hash_dedup_stage(
            args.images, args.output_dir, bits=args.bits, radius=args.radius, thumb_size=args.thumb_size,
            factory=args.factory, search_params=args.search_params, rule=args.rule, basis=args.basis,
            fit_sample=args.fit_sample, part_size=args.part_size, seed=args.seed, progress=progress,
        )
    elif args.command == "filter":
        from .filter_stage import filter_stage

        result = filter_stage(args.embeddings, args.classifier, args.output_dir, threshold=args.threshold,
                              positive=args.positive_class, progress=progress)
    elif args.command == "blur-faces":
        from .blur_faces import blur_faces_stage

        result = blur_faces_stage(
            args.images, args.output_dir, cascade=args.cascade, scale_factor=args.scale_factor,
            min_neighbors=args.min_neighbors, min_size=args.min_size, margin=args.margin, strength=args.strength,
            part_size=args.part_size, progress=progress,
        )
    elif args.command == "embed":
        options = dict(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                       resize_size=args.resize_size, batch_size=args.batch_size, num_workers=args.num_workers,
                       device=args.device, dtype=args.dtype, part_size=args.part_size)
        if args.shards is not None:
            from .launch import LaunchOptions
            from .shards import embed_sharded

            if args.shard is not None:
                raise CurationInputError("give --shard i/n (one shard) or --shards N (all of them), not both")
            result = embed_sharded(args.images, args.output_dir, shards=args.shards,
                                   launch=_launch_options(args) or LaunchOptions(), dry_run=args.dry_run, **options)
            if isinstance(result, str):  # dry run, or submitted without waiting
                return result
        else:
            if args.launcher or args.dry_run or args.no_wait:
                raise CurationInputError("--launcher/--dry-run/--no-wait go with --shards N")
            result = stages.embed_stage(args.images, args.output_dir, shard=args.shard, progress=progress, **options)
            if args.shard is not None:
                return (result.describe() + f"\nwhen all {args.shard[1]} shards are done: "
                        f"dinov2-curate embed-merge --output-dir {args.output_dir} --shards {args.shard[1]}")
    elif args.command == "embed-merge":
        from .shards import merge_embed_shards

        result = merge_embed_shards(args.output_dir, args.shards)
    elif args.command == "dedup":
        if (args.k is None) == (args.against is None):
            raise CurationInputError("dedup needs either --k K (self-dedup) or --against R.npy (relative dedup)")
        if args.k is not None:
            if args.dry_run or args.no_wait:
                raise CurationInputError("dedup --index-shards runs its shard jobs and merges them: no --dry-run/--no-wait")
            result = stages.self_dedup_stage(
                args.embeddings, args.output_dir, k=args.k, threshold=args.threshold, index=_index_options(args),
                progress=progress, rule=args.rule, index_shards=args.index_shards, launch=_launch_options(args),
                only_shard=args.search_shard,
            )
        else:
            if args.index_shards != 1 or args.search_shard is not None or args.launcher:
                raise CurationInputError("--index-shards/--search-shard/--launcher are for self-dedup (--k), not --against")
            result = stages.relative_dedup_stage(
                args.embeddings, args.against, args.output_dir, threshold=args.threshold, index=_index_options(args),
                progress=progress,
            )
    elif args.command == "retrieve":
        result = stages.retrieve_stage(
            args.embeddings, args.queries, args.output_dir, k=args.k, clusters=args.clusters,
            per_cluster=args.per_cluster, niter=args.niter, index=_index_options(args), progress=progress,
        )
    elif args.command == "kmeans" and args.distributed:
        from .distributed_stages import distributed_kmeans_stage

        if args.levels is not None and args.levels != len(args.clusters):
            raise CurationInputError(f"--levels {args.levels} but --clusters lists {len(args.clusters)} counts")
        result = distributed_kmeans_stage(
            args.embeddings, args.output_dir, clusters=args.clusters, rows_path=args.rows, niter=args.niter,
            resampling_steps=args.resampling_steps, sample_size=args.sample_size, strategy=args.strategy,
            seed=args.seed, dtype=args.dtype, device={"gpu": "cuda"}.get(args.device, args.device),
        )
    elif args.command == "kmeans":
        result = stages.kmeans_stage(
            args.embeddings, args.output_dir, clusters=args.clusters, levels=args.levels, rows_path=args.rows,
            niter=args.niter, resampling_steps=args.resampling_steps,
            sample_sizes=[args.sample_size] * len(args.clusters), strategy=args.strategy, init=args.init,
            seed=args.seed, device=args.device, progress=progress,
        )
    elif args.command == "sample":
        result = stages.sample_stage(args.clusters_dir, args.output_dir, target=args.target, strategy=args.strategy, seed=args.seed)
    elif args.command == "manifest":
        result = stages.manifest_stage(args.paths, args.select, args.output)
    else:  # run
        from .config import load_config
        from .pipeline import run_pipeline

        cfg = load_config(args.config, args.overrides)
        if args.quiet:
            cfg.progress = False
        summary = run_pipeline(cfg)
        return f"run: manifest written to {summary['manifest']}\n" + json.dumps(summary["stages"], indent=2)
    return result.describe()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        print(_dispatch(args))
    except CurationInputError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
