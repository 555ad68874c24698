"""Fault-injection and bad-input campaign against the real command-line tools.

    python -m benchmarks.fault_campaign [--kills 6] [--seed 0] [--quick]

Faults: a reference run of the demo recipe (tiny length) is interrupted by ``kill -9`` at random
moments (during steps and during checkpoint saves), SIGTERM, Ctrl-C, a damaged newest checkpoint
(truncated shard, deleted shard, truncated ``.metadata``), a full disk (RLIMIT_FSIZE) and a second
run in the same directory; each case is then resumed with the same command and must end with
the same metrics and the same final weights as the uninterrupted run ("nothing lost").
Bad inputs: configs, data and weights a new user gets wrong; each must exit non-zero (or succeed
where the input is legal) with a message and no traceback, within a time limit ("no hang").
Results: benchmarks/results/fault_campaign.json + .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STEPS = 12
RUN = [
    "--config", "train/demo_mnist.yaml", "optim.epochs=1", f"train.OFFICIAL_EPOCH_LENGTH={STEPS}",
    "train.batch_size_per_gpu=8", "data.num_workers=0", "evaluation.knn_every_n_steps=0", "logging.every_n_steps=1",
    "logging.tensorboard=false", "logging.progress_bar=false", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
]
TRAIN = [sys.executable, "-m", "dinov2.cli.train"]
LIMIT_S = 300


def train(run_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([*TRAIN, "--output-dir", str(run_dir), *RUN, *extra], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        return -999, err
    return process.returncode, err


def outcome(run_dir: Path) -> tuple[list, dict]:
    from dinov2.checkpoint.export import read_tensors, resolve_checkpoint
    from dinov2.logging import read_metrics

    losses = [(m["step"], m["total_loss"]) for m in read_metrics(run_dir)]
    return losses, read_tensors(resolve_checkpoint(run_dir), "model.")


def same(run_dir: Path, reference) -> bool:
    losses, tensors = outcome(run_dir)
    return losses == reference[0] and tensors.keys() == reference[1].keys() and all(
        torch.equal(tensors[k], reference[1][k]) for k in tensors)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(run_dir: Path, process: subprocess.Popen, n: int) -> None:
    end = time.monotonic() + LIMIT_S
    while logged_steps(run_dir) < n and process.poll() is None and time.monotonic() < end:
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------- faults
def fault_kill9(work: Path, reference, rng: random.Random, i: int) -> dict:
    run = work / f"kill9_{i}"
    process = train(run)
    wait_for_steps(run, process, rng.randint(1, STEPS - 2))
    time.sleep(rng.uniform(0.0, 0.6))  # lands inside a step or inside a checkpoint save
    process.kill()
    process.wait()
    code, err = finish(train(run))
    return {"fault": "kill -9", "resumed_rc": code, "nothing_lost": code == 0 and same(run, reference),
            "traceback": "Traceback" in err}


def fault_signal(work: Path, reference, signum: int) -> dict:
    run = work / f"signal_{signum}"
    process = train(run)
    wait_for_steps(run, process, 3)
    process.send_signal(signum)
    code, err = finish(process)
    code2, err2 = finish(train(run))
    return {"fault": signal.Signals(signum).name, "rc": code, "resumed_rc": code2,
            "nothing_lost": code == 128 + signum and code2 == 0 and same(run, reference),
            "traceback": "Traceback" in err + err2}


def fault_damaged(work: Path, reference, how: str) -> dict:
    run = work / f"damaged_{how.replace(' ', '_')}"
    finish(train(run, "train.max_steps=6"))
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    if how == "truncated shard":
        shard = next(latest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "deleted shard":
        next(latest.glob("*.distcp")).unlink()
    else:
        (latest / ".metadata").write_bytes((latest / ".metadata").read_bytes()[:64])
    code, err = finish(train(run))
    return {"fault": f"damaged checkpoint: {how}", "resumed_rc": code, "nothing_lost": code == 0 and same(run, reference),
            "traceback": "Traceback" in err}


def fault_disk_full(work: Path, reference) -> dict:
    run = work / "disk_full"
    finish(train(run, "train.max_steps=2"))
    shard = next(sorted((run / "checkpoints").glob("step_*"))[-1].glob("*.distcp")).stat().st_size

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (shard // 2, shard // 2))

    code, err = finish(train(run, preexec_fn=limit))
    clear = "could not write a checkpoint" in err
    code2, err2 = finish(train(run))
    return {"fault": "disk full during a save", "rc": code, "clear_error": clear, "resumed_rc": code2,
            "nothing_lost": code == 2 and clear and code2 == 0 and same(run, reference),
            "traceback": "Traceback" in err + err2}


def fault_two_runs(work: Path, reference) -> dict:
    # Both started at once: whichever takes the run directory first trains, the other must be refused
    # (started one after the other, the first may finish before the second even looks).
    run = work / "two_runs"
    runs = [train(run), train(run)]
    (code_a, err_a), (code_b, err_b) = finish(runs[0]), finish(runs[1])
    (winner_code, _), (loser_code, loser_err) = sorted([(code_a, err_a), (code_b, err_b)], key=lambda r: r[0])
    refused = loser_code == 2 and "in use by" in loser_err
    return {"fault": "second run in the same directory", "rcs": [code_a, code_b], "clear_error": refused,
            "nothing_lost": winner_code == 0 and refused and same(run, reference), "traceback": "Traceback" in err_a + err_b}


def fault_no_resume(work: Path, reference) -> dict:
    run = work / "no_resume"
    finish(train(run, "train.max_steps=4"))
    old = (run / "metrics.jsonl").read_text()
    code, err = finish(train(run, "--no-resume"))
    archived = list((run / "previous_runs").glob("*/metrics.jsonl"))
    kept = len(archived) == 1 and archived[0].read_text() == old
    return {"fault": "--no-resume over an old run", "rc": code, "nothing_lost": code == 0 and kept and same(run, reference),
            "traceback": "Traceback" in err}


# ---------------------------------------------------------------------------------------- bad inputs
def bad_inputs(work: Path) -> list[tuple[str, list[str], bool]]:
    """(name, command, should_succeed)."""
    folder_empty = work / "empty"
    folder_empty.mkdir()
    broken_yaml = work / "broken.yaml"
    broken_yaml.write_text("optim:\n  base_lr: [1, 2\n")
    bad_npy = work / "bad.npy"
    np.save(bad_npy, np.zeros((4, 5), dtype=np.int64))
    int_weights = work / "int.safetensors"
    from safetensors.torch import save_file

    save_file({"cls_token": torch.zeros(1, 1, 96, dtype=torch.int32)}, str(int_weights))
    corrupt_ckpt = work / "corrupt_ckpt"
    (corrupt_ckpt / "step_000000001").mkdir(parents=True)
    (corrupt_ckpt / "step_000000001" / ".metadata").write_bytes(b"\x80\x04garbage")
    out = str(work / "out")
    base = [*TRAIN, "--output-dir", out, *RUN, "train.max_steps=1"]
    cases = [(f"config {o}", base + [o], False) for o in [
        "checkpoint.every_n_steps=0", "logging.every_n_steps=0", "crops.local_crops_number=-2", "optim.base_lr=-1",
        "teacher.momentum_teacher=2.0", "student.drop_path_rate=2.0", "optim.epochs=abc", "optim.base_rl=1e-3",
        "crops.global_crops_size=30", "compute.device=cuda", "student.arch=vit_huge", "train.batch_size_per_gpu=0",
        "optim.epochs", f"data.dataset=folder:{folder_empty}", f"data.dataset=folder:{work / 'missing'}",
        f"data.dataset=npy:{bad_npy}", "data.dataset=nonsense", f"student.pretrained_weights={work / 'missing.pth'}",
        f"student.pretrained_weights={int_weights}",
    ]]
    cases += [
        ("config crops.local_crops_number=0 (legal)", base + ["crops.local_crops_number=0"], True),
        ("broken YAML file", [*TRAIN, "--output-dir", out, "--config", str(broken_yaml)], False),
        ("missing config file", [*TRAIN, "--output-dir", out, "--config", str(work / "nope.yaml")], False),
        ("export: a directory as the target", [sys.executable, "-m", "dinov2.cli.export",
                                               str(work / "reference"), str(work)], False),
        ("export: an unknown suffix", [sys.executable, "-m", "dinov2.cli.export", str(work / "reference"),
                                       str(work / "backbone.xyz")], False),
        ("export: corrupt checkpoint", [sys.executable, "-m", "dinov2.cli.export", str(corrupt_ckpt),
                                        str(work / "b.pth")], False),
        ("eval: missing backbone file", [sys.executable, "-m", "dinov2.cli.eval", "knn", "--backbone-file",
                                         str(work / "missing.pth"), "--data", "mnist"], False),
    ]
    return cases


def run_bad(name: str, command: list[str], should_succeed: bool) -> dict:
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        return {"input": name, "hang": True, "clear": False, "traceback": False}
    ok = done.returncode == 0 if should_succeed else done.returncode != 0
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return {"input": name, "rc": done.returncode, "hang": False, "traceback": "Traceback" in done.stderr,
            "clear": ok and (should_succeed or bool(message)), "message": message[:300]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6, help="random kill -9 cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 kills, no bad inputs (a smoke run)")
    parser.add_argument("--output", default=str(RESULTS / "fault_campaign"), help="results path without suffix")
    parser.add_argument("--only", default=None, help="run only the fault cases whose name contains this (no kills, "
                        "no bad inputs)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    faults, bad = [], []
    with tempfile.TemporaryDirectory(prefix="dinov2-faults-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        code, err = finish(train(work / "reference"))
        if code != 0:
            print(err, file=sys.stderr)
            return 1
        reference = outcome(work / "reference")
        for i in range(0 if args.only else 2 if args.quick else args.kills):
            faults.append(fault_kill9(work, reference, rng, i))
            print(faults[-1], flush=True)
        if not args.quick:
            cases = {
                "SIGTERM": lambda: fault_signal(work, reference, signal.SIGTERM),
                "SIGINT": lambda: fault_signal(work, reference, signal.SIGINT),
                **{f"damaged checkpoint: {how}": (lambda how=how: fault_damaged(work, reference, how))
                   for how in ("truncated shard", "deleted shard", "truncated metadata")},
                "disk full during a save": lambda: fault_disk_full(work, reference),
                "second run in the same directory": lambda: fault_two_runs(work, reference),
                "--no-resume over an old run": lambda: fault_no_resume(work, reference),
            }
            for name, case in cases.items():
                if args.only and args.only not in name:
                    continue
                faults.append(case())
                print(faults[-1], flush=True)
            for name, command, succeed in ([] if args.only else bad_inputs(work)):
                bad.append(run_bad(name, command, succeed))
                print(bad[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "faults": len(faults), "faults_nothing_lost": sum(f["nothing_lost"] for f in faults),
        "bad_inputs": len(bad), "bad_inputs_clear": sum(b["clear"] and not b["traceback"] for b in bad),
        "tracebacks": sum(f["traceback"] for f in faults) + sum(b["traceback"] for b in bad),
        "hangs": sum(b["hang"] for b in bad), "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__, "cores": os.cpu_count(),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"summary": summary, "faults": faults, "bad_inputs": bad}, indent=1))
    lines = [f"# Fault campaign ({summary['seconds']} s, torch {summary['torch']}, {summary['cores']} cores)", "",
             f"Faults survived with nothing lost: {summary['faults_nothing_lost']} / {summary['faults']}; "
             f"bad inputs with a clear error: {summary['bad_inputs_clear']} / {summary['bad_inputs']}; "
             f"raw tracebacks: {summary['tracebacks']}; hangs: {summary['hangs']}.", "",
             "| fault | nothing lost | traceback |", "|---|---|---|"]
    lines += [f"| {f['fault']} | {f['nothing_lost']} | {f['traceback']} |" for f in faults]
    lines += ["", "| bad input | rc | clear | message |", "|---|---|---|---|"]
    lines += [f"| {b['input']} | {b.get('rc')} | {b['clear'] and not b['traceback']} | "
              f"{b.get('message', '').replace('|', '/')} |" for b in bad]
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
