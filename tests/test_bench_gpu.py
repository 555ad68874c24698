"""benchmarks/bench_gpu.py: the one-script GPU benchmark also runs on CPU with --quick, streaming JSON lines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_help_describes_the_items():
    result = _run("--help", timeout=120)
    assert result.returncode == 0
    assert "--quick" in result.stdout and "sync_sites" in result.stdout


@pytest.mark.slow
def test_quick_run_on_cpu_streams_every_item(tmp_path):
    out = tmp_path / "gpu.jsonl"
    result = _run("--quick", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written
    kinds = [r["kind"] for r in written]
    assert kinds[:2] == ["env", "attention_check"] and kinds[-1] == "done"
    assert "error" not in kinds, [r for r in written if r["kind"] == "error"]
    checks = written[1]["backends"]
    assert max(checks["sdpa"]["max_abs_err_vs_math"]) < 1e-5
    assert checks["varlen"]["probe"] != "ok"  # no CPU kernel: reported, not used
    steps = [r for r in written if r["kind"] == "train_step"]
    assert steps and all(r["ms_per_step"] > 0 and r["images_per_s"] > 0 for r in steps)
    assert {r["attention"] for r in steps} == {"sdpa"}
    bound = next(r for r in written if r["kind"] == "plain_backbone")
    assert bound["ms_fwd_bwd"] > 0
    assert next(r for r in written if r["kind"] == "sync_sites")["skipped"].startswith("needs CUDA")
    assert next(r for r in written if r["kind"] == "input_pipeline")["images_per_s"] > 0
