"""`make bench`: run every benchmark script and collect the markdown tables into results/README.md.

    python -m benchmarks.run_all [--quick] [--only attention,train,...]
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.common import RESULTS_DIR

BENCHMARKS = {
    "attention": "benchmarks.bench_attention",
    "train": "benchmarks.bench_train",
    "features": "benchmarks.bench_features",
    "distributed": "benchmarks.bench_distributed",
    "curation": "benchmarks.bench_curation",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    failures = []
    for name in chosen:
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(BENCHMARKS[name]).main(["--quick"] if args.quick else [])
        except Exception as error:  # noqa: BLE001 - report and continue with the others
            failures.append(f"{name}: {type(error).__name__}: {error}")
            print(f"!! {failures[-1]}", flush=True)
    tables = sorted(RESULTS_DIR.glob("*.md"))
    (RESULTS_DIR / "README.md").write_text(
        "# Benchmark results\n\n" + "\n".join(p.read_text() for p in tables if p.name != "README.md")
    )
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
