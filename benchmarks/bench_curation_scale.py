"""Scale-out curation benchmark: hierarchical k-means and self-dedup, 1 vs 2 processes.

    python -m benchmarks.bench_curation_scale [--kmeans-rows 50000] [--dedup-rows 100000] [--quick]

1. Distributed hierarchical k-means (torch.distributed over gloo, benchmarks.bench_curation_raw's
   runner): 1 process (2 threads) vs 2 processes (1 thread each), ``--kmeans-rows`` x 384 rows of a
   long-tailed mixture, clusters 1000,100,10, 10 iterations, 2 resampling steps.
2. Self-dedup (k = 10, cosine >= 0.9, ``IVF1024,Flat`` nprobe=8) of ``--dedup-rows`` x 384 rows
   with planted near-duplicate groups: one index in one process (2 threads) vs 2 index shards
   searched by 2 processes at once (1 thread each: ``dedup --index-shards 2 --search-shard s``),
   then the merge (one process). Kept rows compared between the two.
Every run is a separate process; its wall time and peak RSS (ru_maxrss) are recorded.
The machine is shared: the load average is recorded before and after.

Writes benchmarks/results/curation.scale.json and curation.scale.md.
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
REPO = Path(__file__).resolve().parents[1]
DEDUP = dict(k=10, threshold=0.9, factory="IVF1024,Flat", search_params="nprobe=8")


def dedup_worker(spec: str) -> None:
    """One process: the self-dedup stage (or one index shard of it); writes its timing json."""
    args = json.loads(spec)
    import faiss

    faiss.omp_set_num_threads(args["threads"])
    from data_curation.index import IndexOptions
    from data_curation.stages import self_dedup_stage

    start = time.perf_counter()
    self_dedup_stage(args["embeddings"], args["output_dir"], k=DEDUP["k"], threshold=DEDUP["threshold"],
                     index=IndexOptions(factory=DEDUP["factory"], search_params=DEDUP["search_params"], device="cpu"),
                     index_shards=args["shards"], only_shard=args.get("only_shard"), progress=False)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole process: imports and loading included
    Path(args["timing"]).write_text(json.dumps({"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
                                                "cpu_seconds": usage.ru_utime + usage.ru_stime}))


def _start(spec: dict) -> subprocess.Popen:
    code = f"from benchmarks.bench_curation_scale import dedup_worker; dedup_worker({json.dumps(spec)!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(spec["threads"])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timing: Path) -> dict:
    _, err = process.communicate()
    if process.returncode:
        raise RuntimeError(err[-3000:])
    return json.loads(timing.read_text())


def dedup_scaling(root: Path, rows: int) -> dict:
    from data_curation.synthetic import planted_pool

    groups = [int(s) for s in np.random.default_rng(0).integers(2, 6, rows // 100)]  # ~3.5 % of rows are copies
    planted = planted_pool(rows - sum(groups), 384, groups, num_concepts=200, seed=0)
    path = root / "dedup" / "embeddings.npy"
    path.parent.mkdir(parents=True)
    np.save(path, planted.embeddings)
    true_groups = np.unique(planted.components).size
    runs = []

    start = time.perf_counter()
    one = _finish(_start({"embeddings": str(path), "output_dir": str(root / "d1"), "shards": 1, "threads": 2,
                          "timing": str(root / "t1.json")}), root / "t1.json")
    runs.append({"processes": 1, "index_shards": 1, "threads_per_process": 2, "search_s": one["seconds"], "merge_s": 0.0,
                 "total_s": time.perf_counter() - start, "peak_rss_mib_per_process": one["peak_rss_mib"],
                 "cpu_s": [one["cpu_seconds"]]})
    print(json.dumps(runs[-1]), flush=True)

    start = time.perf_counter()
    shards = [_start({"embeddings": str(path), "output_dir": str(root / "d2"), "shards": 2, "only_shard": s,
                      "threads": 1, "timing": str(root / f"t2_{s}.json")}) for s in range(2)]
    shard_timings = [_finish(p, root / f"t2_{s}.json") for s, p in enumerate(shards)]
    search_wall = time.perf_counter() - start
    merge = _finish(_start({"embeddings": str(path), "output_dir": str(root / "d2"), "shards": 2, "threads": 2,
                            "timing": str(root / "t2_merge.json")}), root / "t2_merge.json")
    runs.append({"processes": 2, "index_shards": 2, "threads_per_process": 1, "search_s": search_wall,
                 "merge_s": merge["seconds"], "total_s": time.perf_counter() - start,
                 "peak_rss_mib_per_process": max(t["peak_rss_mib"] for t in shard_timings),
                 "merge_peak_rss_mib": merge["peak_rss_mib"],
                 "cpu_s": [t["cpu_seconds"] for t in shard_timings] + [merge["cpu_seconds"]]})
    print(json.dumps(runs[-1]), flush=True)

    keep1, keep2 = np.load(root / "d1" / "keep.npy"), np.load(root / "d2" / "keep.npy")
    decided_alike = 1.0 - np.setxor1d(keep1, keep2).size / rows
    for run, keep, folder in ((runs[0], keep1, "d1"), (runs[1], keep2, "d2")):
        run["kept"] = int(keep.size)
        recall = root / folder / "recall.json"
        run["pair_recall_vs_exact"] = json.loads(recall.read_text())["pair_recall"] if recall.is_file() else None
    return {"rows": rows, "dim": 384, "planted_groups": len(groups), "rows_after_perfect_dedup": int(true_groups),
            **DEDUP, "same_decision_fraction": decided_alike, "runs": runs}


def kmeans_scaling(root: Path, rows: int, clusters: list[int]) -> list[dict]:
    from benchmarks.bench_curation_raw import kmeans_scaling as run

    return run(root, rows, clusters, 10, 2)


def idle_seconds(cpu_per_process: list[float], threads: int) -> float:
    """Wall time the measured CPU seconds would take on 2 idle cores: one process with 2 threads
    -> CPU / 2 (perfect threading: favours the single process); parallel processes -> the largest."""
    return cpu_per_process[0] / threads if len(cpu_per_process) == 1 else max(cpu_per_process)


def to_markdown(results: dict) -> str:
    lines = ["# Scale-out curation benchmark: 1 vs 2 processes", "",
             f"{results['machine']}; {results['date']}; load average after: {results['load_after']}.", "",
             "Wall seconds are measured on a machine shared with other jobs (see the load average), so the",
             "ratio of walls mostly shows the contention; `CPU s` is each process's user + system time and",
             "`idle 2-core s` the wall those CPU seconds give on 2 idle cores (1 process x 2 threads: CPU s / 2,",
             "i.e. perfect threading; 2 processes x 1 thread: the larger of the two).", ""]
    if results.get("kmeans"):
        r0 = results["kmeans"][0]
        idle = [idle_seconds(r["cpu_seconds_per_process"], 2) for r in results["kmeans"]]
        lines += [f"## Distributed hierarchical k-means, {r0['rows']:,} x 384, clusters {','.join(map(str, r0['clusters']))}, "
                  f"{r0['niter']} iterations, {r0['resampling_steps']} resampling steps (gloo, CPU)", "",
                  "| processes | stage wall s | wall ratio | CPU s per process | idle 2-core s | idle ratio | peak RSS MiB / process | same clusters as 1 process |",
                  "|---:|---:|---:|---|---:|---:|---:|---|"]
        for r, t in zip(results["kmeans"], idle):
            cpu = " / ".join(f"{c:.0f}" for c in r["cpu_seconds_per_process"])
            lines.append(f"| {r['processes']} | {r['stage_seconds']:.1f} | {r0['stage_seconds'] / r['stage_seconds']:.2f}x | "
                         f"{cpu} | {t:.1f} | {idle[0] / t:.2f}x | {r['peak_rss_mib_per_process']:.0f} | "
                         f"{r['same_clusters_as_1_process']} |")
    if results.get("dedup"):
        d = results["dedup"]
        r0 = d["runs"][0]
        idle = [idle_seconds(r0["cpu_s"], 2)]
        if len(d["runs"]) > 1:
            shards, merge = d["runs"][1]["cpu_s"][:-1], d["runs"][1]["cpu_s"][-1]
            idle.append(max(shards) + merge / 2)
        lines += ["", f"## Self-dedup, {d['rows']:,} x 384 ({d['planted_groups']:,} planted near-duplicate groups), "
                  f"k = {d['k']}, cosine >= {d['threshold']}, {d['factory']} {d['search_params']}", "",
                  "| processes | index shards | search s | merge + grouping s | total wall s | wall ratio | CPU s per process | idle 2-core s | idle ratio | peak RSS MiB / process | kept | pair recall vs exact |",
                  "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r, t in zip(d["runs"], idle):
            recall = f"{r['pair_recall_vs_exact']:.4f}" if r["pair_recall_vs_exact"] is not None else "-"
            cpu = " / ".join(f"{c:.0f}" for c in r["cpu_s"])
            lines.append(f"| {r['processes']} | {r['index_shards']} | {r['search_s']:.1f} | {r['merge_s']:.1f} | "
                         f"{r['total_s']:.1f} | {r0['total_s'] / r['total_s']:.2f}x | {cpu} | {t:.1f} | {idle[0] / t:.2f}x | "
                         f"{r['peak_rss_mib_per_process']:.0f} | {r['kept']:,} | {recall} |")
        lines += ["", "2 processes: the two index-shard searches run at once (CPU s of each, then of the merge "
                  "process: merge, grouping, recall check).",
                  f"Same keep/remove decision for {100 * d['same_decision_fraction']:.3f} % of the rows "
                  "(each IVF shard trains its own quantizer; with `Flat` the pairs are identical, see tests)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kmeans-rows", type=int, default=50_000)
    parser.add_argument("--dedup-rows", type=int, default=100_000)
    parser.add_argument("--skip", choices=["kmeans", "dedup"], action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="10k k-means rows, 20k dedup rows")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.quick:
        args.kmeans_rows, args.dedup_rows = 10_000, 20_000
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                          f"{[round(v, 2) for v in os.getloadavg()]} at start",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "kmeans" not in args.skip:
            (root / "km").mkdir()
            results["kmeans"] = kmeans_scaling(root / "km", args.kmeans_rows, [1000, 100, 10] if not args.quick else [200, 20, 5])
        if "dedup" not in args.skip:
            results["dedup"] = dedup_scaling(root, args.dedup_rows)
    results["load_after"] = [round(v, 2) for v in os.getloadavg()]
    from data_curation.arrays import write_text_atomic

    out = Path(args.output_dir)
    write_text_atomic(out / "curation.scale.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "curation.scale.md", to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
