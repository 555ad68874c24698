"""Raw-pool and scale-out curation benchmark (a few minutes on 2 cores).

    python -m benchmarks.bench_curation_raw [--quick]

1. PCA-hash dedup on real photos with planted copies (data_curation.examples.planted_photos:
   the scikit-image photos and 13 disjoint crops of each as distinct images, plus re-encoded
   JPEG q30-95, rescaled 0.5-2x, 1-5 % border-cropped and combined copies): recall and
   precision of the planted pairs per Hamming radius and rule, recall per copy kind.
2. Speed: thumbnails per second (decode + resize, one process) and Hamming grouping of 64-bit
   codes at radius 10 with the two exact indexes (BFlat, BHash4x16), measured at ``--codes`` / 2
   and ``--codes`` codes; the per-million-codes figure extrapolates with the fitted exponent.
3. Distributed hierarchical k-means (torch.distributed, gloo): 1 vs 2 processes on this machine,
   wall time and peak RSS per process, on ``--kmeans-rows`` x 384 rows.

Writes benchmarks/results/curation.raw.json and curation.raw.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def hash_quality(root: Path, copies_per_kind: int) -> dict:
    from data_curation.examples.planted_photos import pair_scores, write_planted_photos
    from data_curation.hash_dedup import hash_dedup_stage

    planted = write_planted_photos(root / "images", copies_per_kind=copies_per_kind, seed=0)
    rows = []
    for bits, radii in ((64, (6, 8, 10, 12)), (128, (16, 20, 24))):
        for radius in radii:
            for rule in ("representative", "connected"):
                out = root / f"hash_{bits}_{radius}_{rule}"
                start = time.perf_counter()
                result = hash_dedup_stage(planted.root, out, bits=bits, radius=radius, rule=rule, progress=False)
                seconds = time.perf_counter() - start
                paths = (out / "paths.txt").read_text().splitlines()
                scores = pair_scores(paths, np.load(out / "groups.npy"), planted)
                rows.append({"bits": bits, "radius": radius, "rule": rule, "images": scores["images"],
                             "planted_pairs": scores["planted_pairs"], "recall": scores["recall"],
                             "precision": scores["precision"], "removed": result.summary["removed_near_copy"],
                             "per_kind_recall": {k: v["recall"] for k, v in scores["per_kind"].items()},
                             "stage_seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
    return {"distinct_images": len(planted.originals), "copies": len(planted.truth), "rows": rows}


def thumbnail_speed(root: Path) -> dict:
    from data_curation.images import read_thumbnail

    paths = sorted(str(p) for p in (root / "images").rglob("*") if p.suffix in (".png", ".jpg"))
    start = time.perf_counter()
    for path in paths:
        read_thumbnail(path, 16)
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}


def grouping_speed(num_codes: int) -> list[dict]:
    """Hamming grouping time at num_codes / 2 and num_codes codes; the per-million figure
    extrapolates with the exponent fitted on these two sizes (labelled as such)."""
    from data_curation.pca_hash import radius_pairs

    results = []
    for factory in ("BFlat", "BHash4x16"):
        timings = []
        for n in (num_codes // 2, num_codes):
            rng = np.random.default_rng(n)
            codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
            copies = rng.choice(n, n // 100, replace=False)  # 1 % planted near copies, 0-10 bits flipped
            bits = np.unpackbits(codes[copies], axis=1)
            flips = rng.random(bits.shape) < rng.uniform(0, 10 / 64, size=(copies.size, 1))
            codes[(copies + 1) % n] = np.packbits(bits ^ flips, axis=1)
            start = time.perf_counter()
            i, _, _ = radius_pairs(codes, 10, factory=factory, progress=False)
            timings.append((n, time.perf_counter() - start, int(i.size)))
        (n1, t1, _), (n2, t2, pairs) = timings
        exponent = float(np.log(t2 / t1) / np.log(n2 / n1))
        results.append({"factory": factory, "codes": n2, "radius": 10, "seconds": t2, "seconds_half": t1,
                        "pairs": pairs, "fitted_exponent": exponent,
                        "seconds_per_million_codes": t2 * (1e6 / n2) ** exponent if n2 < 1e6 else t2 * 1e6 / n2,
                        "per_million_is": "measured" if n2 >= 1e6 else f"extrapolated with n^{exponent:.2f}"})
        print(json.dumps(results[-1]), flush=True)
    return results


def kmeans_worker(path: str, clusters: list[int], niter: int, steps: int) -> None:
    """One rank (torchrun-style environment) or the single process."""
    import torch

    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 2)
    from data_curation.distributed_stages import distributed_kmeans_stage

    out = Path(path).parent / f"km_{os.environ.get('WORLD_SIZE', '1')}"
    start = time.perf_counter()
    distributed_kmeans_stage(path, out, clusters=clusters, niter=niter, resampling_steps=steps, sample_size=10, device="cpu")
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rank = int(os.environ.get("RANK", "0"))
    (out.parent / f"timing_{os.environ.get('WORLD_SIZE', '1')}_{rank}.json").write_text(
        json.dumps({"rank": rank, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
                    "cpu_seconds": usage.ru_utime + usage.ru_stime}))


def kmeans_scaling(root: Path, rows: int, clusters: list[int], niter: int, steps: int) -> list[dict]:
    from data_curation.synthetic import long_tailed_mixture

    sizes = list(np.maximum(1, (rows / np.arange(1, 501) ** 1.1 / np.sum(1 / np.arange(1, 501) ** 1.1)).astype(int)))
    x, _ = long_tailed_mixture(sizes, 384, spread=0.5, seed=0)
    np.save(root / "emb.npy", x)
    results = []
    for world in (1, 2):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        code = f"from benchmarks.bench_curation_raw import kmeans_worker; kmeans_worker({str(root / 'emb.npy')!r}, {clusters}, {niter}, {steps})"
        if world == 1:
            command = [sys.executable, "-c", code]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                       "--no-python", sys.executable, "-c", code]
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if completed.returncode:
            raise RuntimeError(completed.stderr[-3000:])
        ranks = [json.loads((root / f"timing_{world}_{rank}.json").read_text()) for rank in range(world)]
        results.append({"processes": world, "rows": int(x.shape[0]), "clusters": clusters, "niter": niter,
                        "resampling_steps": steps, "stage_seconds": max(r["seconds"] for r in ranks),
                        "launch_wall_seconds": wall, "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in ranks),
                        "cpu_seconds_per_process": [r.get("cpu_seconds") for r in ranks]})
        print(json.dumps(results[-1]), flush=True)
    same = all(np.array_equal(np.load(root / "km_1" / f), np.load(root / "km_2" / f))
               for f in ("level1_assignment.npy", "level2_assignment.npy"))
    for r in results:
        r["same_clusters_as_1_process"] = same
    return results


def to_markdown(results: dict) -> str:
    lines = ["# Raw-pool and scale-out curation benchmark", "",
             f"{results['machine']}; {results['date']}.", "",
             "## PCA-hash dedup on real photos with planted copies", "",
             f"{results['hash']['distinct_images']} distinct images (scikit-image photos + 13 disjoint crops of each), "
             f"{results['hash']['copies']} planted copies; thumbnail 16x16.", "",
             "| bits | radius | rule | recall | precision | jpeg | rescale | crop | combo |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["hash"]["rows"]:
        k = r["per_kind_recall"]
        lines.append(f"| {r['bits']} | {r['radius']} | {r['rule']} | {r['recall']:.3f} | {r['precision']:.3f} | "
                     f"{k['jpeg']:.2f} | {k['rescale']:.2f} | {k['crop']:.2f} | {k['combo']:.2f} |")
    t = results["thumbnails"]
    lines += ["", f"Thumbnails: {t['images_per_s']:.0f} images/s in one process ({t['images']} PNG/JPEG files, 100-1400 px).", "",
              "| index | codes | radius | seconds (half the codes) | seconds | pool of 1M codes, seconds |", "|---|---:|---:|---:|---:|---:|"]
    for r in results["grouping"]:
        lines.append(f"| {r['factory']} | {r['codes']:,} | {r['radius']} | {r['seconds_half']:.1f} | {r['seconds']:.1f} | "
                     f"{r['seconds_per_million_codes']:.0f} ({r['per_million_is']}) |")
    if results.get("kmeans"):
        lines += ["", "## Distributed hierarchical k-means (torch.distributed, gloo, CPU)", "",
                  "| processes | rows x 384 | clusters | iterations | resampling steps | stage s | peak RSS MiB / process | same clusters as 1 process |",
                  "|---:|---:|---|---:|---:|---:|---:|---|"]
        for r in results["kmeans"]:
            lines.append(f"| {r['processes']} | {r['rows']:,} | {','.join(map(str, r['clusters']))} | {r['niter']} | "
                         f"{r['resampling_steps']} | {r['stage_seconds']:.1f} | {r['peak_rss_mib_per_process']:.0f} | "
                         f"{r['same_clusters_as_1_process']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer copies, 50k codes, 20k k-means rows")
    parser.add_argument("--codes", type=int, default=200_000)
    parser.add_argument("--kmeans-rows", type=int, default=100_000)
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.quick:
        args.codes, args.kmeans_rows = 50_000, 20_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                              f"{[round(v, 2) for v in os.getloadavg()]} at start",
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        results["hash"] = hash_quality(root, 10 if args.quick else 30)
        results["thumbnails"] = thumbnail_speed(root)
        results["grouping"] = grouping_speed(args.codes)
        results["kmeans"] = kmeans_scaling(root, args.kmeans_rows, [1000, 100, 10] if not args.quick else [200, 20],
                                           10, 2)
    from data_curation.arrays import write_text_atomic

    out = Path(args.output_dir)
    write_text_atomic(out / "curation.raw.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "curation.raw.md", to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
