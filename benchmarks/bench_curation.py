"""Curation benchmark: self-dedup, retrieval and hierarchical k-means at scale on the CPU.

    python -m benchmarks.bench_curation              # 100k and 1M rows x 384 (tens of minutes on 2 cores)
    python -m benchmarks.bench_curation --quick      # 20k rows, about a minute

Data: planted embeddings (data_curation.synthetic): a mixture of concepts (one per 1000 rows,
pairwise cosine ~0.4 inside a concept) plus near-duplicate groups (pairwise cosine ~0.97)
and chains, so the pairs above the threshold are known.
Each measurement runs in its own subprocess so its peak memory (max RSS) is its own.

Reported per index: wall time, peak RSS, and the recall of the planted duplicate pairs above
the threshold (an edge between every such pair in the k-NN graph, exact reference = all
planted pairs whose true cosine is >= threshold); for retrieval, recall@k against exact
search on a sample. Flat at 1M is too slow for 2 cores: its time is extrapolated from a
timed fraction of the queries (marked "estimated").

Writes benchmarks/results/curation.json and curation.md.
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
THRESHOLD = 0.9
K = 10
DIM = 384


# ----------------------------------------------------------------------------- data


def make_pool(num_rows: int, dim: int, seed: int = 0):
    """Planted pool: one concept per 1000 rows (pairwise cosine ~0.4 inside a concept, as in
    real embeddings), ~3% of rows in near-duplicate groups of 2-5, and a few chains."""
    from data_curation.synthetic import planted_pool

    rng = np.random.default_rng(seed)
    planted_rows = max(num_rows // 30, 20)
    groups = []
    while sum(groups) < planted_rows:
        groups.append(int(rng.integers(2, 6)))
    chains = [4] * max(num_rows // 10000, 2)
    background = num_rows - sum(groups) - sum(chains)
    return planted_pool(background, dim, groups, chain_lengths=chains, group_cosine=0.97,
                        num_concepts=max(num_rows // 1000, 10), concept_cosine=0.4, seed=seed)


def planted_pairs_above(embeddings: np.ndarray, components: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """All (i, j), i < j, in one planted group with true cosine >= threshold."""
    sizes = np.bincount(components)
    rows = np.flatnonzero(sizes[components] > 1)
    order = rows[np.argsort(components[rows], kind="stable")]
    pairs = set()
    start = 0
    while start < order.size:
        stop = start
        while stop < order.size and components[order[stop]] == components[order[start]]:
            stop += 1
        members = order[start:stop]
        sims = embeddings[members] @ embeddings[members].T
        for a in range(members.size):
            for b in range(a + 1, members.size):
                if sims[a, b] >= threshold:
                    pairs.add((min(members[a], members[b]), max(members[a], members[b])))
        start = stop
    return pairs


# ----------------------------------------------------------------------------- workers (subprocesses)


def _peak_rss_mib() -> float:
    """Peak resident memory of this worker (VmHWM). Not ru_maxrss: on Linux that keeps the
    parent's peak across fork+exec, and the parent held the generated pool."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    """User + system CPU time of this worker: on a shared machine, cpu_s / cores is the
    wall time the same work takes on idle cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_dedup(data_dir: Path, factory: str, search_params: str, query_fraction: float) -> dict:
    from data_curation.dedup import components_of, similarity_graph
    from data_curation.index import build_index, measure_recall, search

    embeddings = np.load(data_dir / "embeddings.npy", mmap_mode="r")
    n = embeddings.shape[0]
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    index = build_index(embeddings, factory, search_params=search_params, device="cpu", progress=False)
    built = time.perf_counter()
    n_queries = max(int(n * query_fraction), 1)
    sims, ids = search(index, embeddings[:n_queries], K + 1, progress=False)
    searched = time.perf_counter()
    result = {"factory": factory, "search_params": search_params, "build_s": built - start}
    if n_queries < n:  # extrapolated: only a fraction of the queries was timed
        result["estimated"] = True
        result["search_s"] = (searched - built) * n / n_queries
        result["total_s"] = result["build_s"] + result["search_s"]
        result["cpu_s"] = (_cpu_seconds() - cpu_start) * n / n_queries  # build time is negligible for Flat
    else:
        graph = similarity_graph(ids, sims, THRESHOLD, n)
        components = components_of(graph)
        done = time.perf_counter()
        result["search_s"] = searched - built
        result["graph_s"] = done - searched
        result["total_s"] = done - start
        result["cpu_s"] = _cpu_seconds() - cpu_start
        edges = {(min(i, j), max(i, j)) for i, j in zip(*graph.nonzero())}
        truth = {tuple(p) for p in np.load(data_dir / "pairs.npy").tolist()}
        result["pair_recall"] = len(truth & edges) / len(truth)
        planted = np.load(data_dir / "components.npy")
        result["components_exact"] = bool(np.array_equal(components, planted))
        result["kept"] = int(np.unique(components).size)
    if factory != "Flat":
        report = measure_recall(index, embeddings, K, sample_size=1000, threshold=THRESHOLD, exclude_self=True)
        result["recall_at_10_sample"] = report["recall_at_k"]
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def worker_retrieval(data_dir: Path, factory: str, search_params: str, num_queries: int) -> dict:
    from data_curation.index import build_index, measure_recall, search

    embeddings = np.load(data_dir / "embeddings.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    queries = np.asarray(embeddings[rng.choice(embeddings.shape[0], num_queries, replace=False)])
    queries = queries + 0.05 * rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(queries.shape[1])
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    index = build_index(embeddings, factory, search_params=search_params, device="cpu", progress=False)
    built = time.perf_counter()
    search(index, queries, K, progress=False)
    searched = time.perf_counter()
    cpu = _cpu_seconds() - cpu_start
    report = measure_recall(index, embeddings, K, queries=queries, sample_size=1000)
    return {
        "factory": factory, "search_params": search_params, "queries": num_queries, "build_s": built - start,
        "search_s": searched - built, "total_s": searched - start, "recall_at_10": report["recall_at_k"],
        "peak_rss_mib": _peak_rss_mib(), "cpu_s": cpu,
    }


def worker_kmeans(data_dir: Path, clusters: list[int], niter: int, resampling_steps: int) -> dict:
    from data_curation.kmeans import hierarchical_kmeans, rows_to_level

    embeddings = np.load(data_dir / "embeddings.npy")
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    levels = hierarchical_kmeans(
        embeddings, clusters, niter=niter, resampling_steps=resampling_steps, sample_sizes=[10] * len(clusters),
        device="cpu", progress=False,
    )
    elapsed = time.perf_counter() - start
    top = np.bincount(rows_to_level(levels, len(clusters)), minlength=clusters[-1])
    return {
        "clusters": clusters, "niter": niter, "resampling_steps": resampling_steps, "total_s": elapsed,
        "top_level_sizes_min_max": [int(top.min()), int(top.max())], "peak_rss_mib": _peak_rss_mib(),
        "cpu_s": _cpu_seconds() - cpu_start,
    }


WORKERS = {"dedup": worker_dedup, "retrieval": worker_retrieval, "kmeans": worker_kmeans}


def run_in_subprocess(kind: str, data_dir: Path, **kwargs) -> dict:
    spec = json.dumps({"kind": kind, "data_dir": str(data_dir), "kwargs": kwargs})
    print(f"  {kind} {kwargs} ...", flush=True)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_curation", "--worker", spec],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"    -> {result}", flush=True)
    return result


# ----------------------------------------------------------------------------- plans


def plan(num_rows: int, quick: bool) -> dict:
    """Index configurations per pool size (IVF cells ~ 4 sqrt(n))."""
    cells = int(4 * np.sqrt(num_rows))
    cells = 1 << int(np.round(np.log2(cells)))
    dedup = [("Flat", "", 1.0 if num_rows <= 200_000 else 0.01)]
    dedup.append((f"IVF{cells},Flat", "nprobe=8", 1.0))
    if num_rows <= 200_000:
        dedup.append(("HNSW32", "efSearch=64", 1.0))
    retrieval = [("Flat", ""), (f"IVF{cells},Flat", "nprobe=8")]
    kmeans = None
    if quick:
        kmeans = ([200, 20], 10, 2)
    elif num_rows >= 1_000_000:
        kmeans = ([2000, 200, 20], 10, 2)
    return {"dedup": dedup, "retrieval": retrieval, "kmeans": kmeans}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss(result: dict) -> str:
    return "-" if result.get("peak_rss_mib") is None else f"{result['peak_rss_mib']:.0f}"


def _half_cpu(result: dict) -> str:
    if "cpu_s" not in result:
        return "-"
    return f"{result['cpu_s'] / 2:.1f}" + (" (estimated)" if result.get("estimated") else "")


def merge_results(old: dict, new: dict) -> dict:
    """Replace, in ``old``, the measurements that ``new`` repeats (same rows, kind, index)."""
    by_rows = {entry["rows"]: entry for entry in old["sizes"]}
    for entry in new["sizes"]:
        target = by_rows.setdefault(entry["rows"], {"rows": entry["rows"], "dedup": [], "retrieval": []})
        for kind in ("dedup", "retrieval"):
            for result in entry.get(kind, []):
                key = (result["factory"], result["search_params"])
                target[kind] = [r for r in target.get(kind, []) if (r["factory"], r["search_params"]) != key] + [result]
        if "kmeans" in entry:
            target["kmeans"] = entry["kmeans"]
        if "planted_pairs_above_threshold" in entry:
            target["planted_pairs_above_threshold"] = entry["planted_pairs_above_threshold"]
    merged = dict(old)
    merged["sizes"] = [by_rows[rows] for rows in sorted(by_rows)]
    merged.setdefault("remeasured", []).append(new["environment"])
    return merged


def to_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Curation benchmark",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores ({env['faiss_threads']} FAISS threads), faiss {env['faiss']}, "
        f"load average at start {env['load_average_start']} (shared machine). Embeddings: planted, dim {env['dim']}; "
        f"self-dedup k={K}, threshold {THRESHOLD}.",
        "",
        "## Self-dedup",
        "",
        "Wall seconds are measured on a machine shared with other jobs; `CPU s / 2` is the wall",
        "time of the same work on 2 idle cores.",
        "",
        *([f"Note: {results['peak_rss_note']}.", ""] if results.get("peak_rss_note") else []),
        "| rows | index | search params | build s | search s | total s | CPU s / 2 | peak RSS MiB | pair recall (planted, >= T) | components exact |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size in results["sizes"]:
        for r in size["dedup"]:
            est = " (estimated)" if r.get("estimated") else ""
            recall = f"{r['pair_recall']:.4f}" if "pair_recall" in r else "-"
            exact = str(r.get("components_exact", "-"))
            lines.append(
                f"| {size['rows']:,} | {r['factory']} | {r['search_params'] or '-'} | {r['build_s']:.1f} | "
                f"{r['search_s']:.1f}{est} | {r['total_s']:.1f}{est} | {_half_cpu(r)} | {_rss(r)} | {recall} | {exact} |"
            )
    lines += ["", "## Retrieval (k = 10)", "",
              "| rows | index | search params | queries | build s | search s | CPU s / 2 | peak RSS MiB | recall@10 |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for size in results["sizes"]:
        for r in size["retrieval"]:
            lines.append(
                f"| {size['rows']:,} | {r['factory']} | {r['search_params'] or '-'} | {r['queries']:,} | "
                f"{r['build_s']:.1f} | {r['search_s']:.1f} | {_half_cpu(r)} | {_rss(r)} | {r['recall_at_10']:.4f} |"
            )
    kmeans_rows = [(s["rows"], s["kmeans"]) for s in results["sizes"] if s.get("kmeans")]
    if kmeans_rows:
        lines += ["", "## Hierarchical k-means with resampling", "",
                  "| rows | clusters per level | iterations | resampling steps | total s | CPU s / 2 | peak RSS MiB | top-level cluster sizes (min, max) |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for rows, r in kmeans_rows:
            lines.append(
                f"| {rows:,} | {','.join(map(str, r['clusters']))} | {r['niter']} | {r['resampling_steps']} | "
                f"{r['total_s']:.1f} | {_half_cpu(r)} | {_rss(r)} | {r['top_level_sizes_min_max']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_curation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small pool (20k rows) instead of 100k and 1M")
    parser.add_argument("--sizes", default=None, help="comma-separated pool sizes (default 100000,1000000)")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--only", default=None,
                        help="comma-separated subset to (re)measure: dedup, retrieval, kmeans; "
                             "the new numbers are merged into the existing results")
    parser.add_argument("--skip-flat", action="store_true", help="skip the exact (Flat) baselines")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](Path(spec["data_dir"]), **spec["kwargs"])))
        return 0

    import faiss

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([20_000] if args.quick else [100_000, 1_000_000])
    only = set(args.only.split(",")) if args.only else {"dedup", "retrieval", "kmeans"}
    if not only <= {"dedup", "retrieval", "kmeans"}:
        parser.error(f"--only takes dedup, retrieval, kmeans; got {args.only}")
    results = {
        "environment": {
            "cpu": cpu_name(), "cores": os.cpu_count(), "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "numpy": np.__version__, "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()], "dim": args.dim,
            "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick,
        },
        "threshold": THRESHOLD, "k": K, "sizes": [],
    }
    for num_rows in sizes:
        print(f"pool of {num_rows:,} rows x {args.dim}", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp:
            data_dir = Path(tmp)
            pool = make_pool(num_rows, args.dim)
            np.save(data_dir / "embeddings.npy", pool.embeddings)
            np.save(data_dir / "components.npy", pool.components)
            pairs = planted_pairs_above(pool.embeddings, pool.components, THRESHOLD)
            np.save(data_dir / "pairs.npy", np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2))
            del pool
            steps = plan(num_rows, args.quick)
            entry = {"rows": num_rows, "planted_pairs_above_threshold": len(pairs), "dedup": [], "retrieval": []}
            for factory, params, fraction in steps["dedup"] if "dedup" in only else []:
                if args.skip_flat and factory == "Flat":
                    continue
                entry["dedup"].append(run_in_subprocess("dedup", data_dir, factory=factory, search_params=params, query_fraction=fraction))
            for factory, params in steps["retrieval"] if "retrieval" in only else []:
                if args.skip_flat and factory == "Flat":
                    continue
                entry["retrieval"].append(run_in_subprocess("retrieval", data_dir, factory=factory, search_params=params, num_queries=min(10_000, num_rows // 2)))
            if steps["kmeans"] is not None and "kmeans" in only:
                clusters, niter, resampling = steps["kmeans"]
                entry["kmeans"] = run_in_subprocess("kmeans", data_dir, clusters=clusters, niter=niter, resampling_steps=resampling)
            results["sizes"].append(entry)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "curation_quick" if args.quick else "curation"
    from data_curation.arrays import write_text_atomic

    if args.only and (out / f"{name}.json").is_file():
        results = merge_results(json.loads((out / f"{name}.json").read_text()), results)
    write_text_atomic(out / f"{name}.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / f"{name}.md", to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
