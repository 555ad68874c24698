"""``dinov2-export``: the trained backbone of a run, described, as .pth / .safetensors, a Hugging Face
directory, a timm state dict or ONNX.

    dinov2-export RUN OUT.safetensors [--which final|teacher|student|student_ema]    (or OUT.pth)
    dinov2-export RUN OUT_DIR --format hf        transformers.AutoModel.from_pretrained(OUT_DIR)
    dinov2-export RUN OUT.safetensors --format timm    timm.create_model(..., pretrained_cfg_overlay=...)
    dinov2-export RUN OUT.onnx                   onnxruntime, dynamic batch and image size

The command line only: the work is ``dinov2.checkpoint.export.export_backbone``. Every failure (no or a
corrupt checkpoint, a directory or unwritable target, a format's package missing) is one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.checkpoint.api import CheckpointException

from dinov2.checkpoint.export import ALL_FORMATS, WHICH, export_backbone


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-export", description="Export the teacher (or student) backbone of a training checkpoint, with "
        "its architecture and input written into the file, as a state dict in the released DINOv2 key layout "
        "(.pth / .safetensors), a Hugging Face transformers directory, a timm state dict, or ONNX.",
        epilog="Examples: dinov2-export runs/x teacher.safetensors; dinov2-export runs/x hf_dir --format hf; "
        "dinov2-export runs/x teacher_timm.safetensors --format timm; dinov2-export runs/x teacher.onnx",
    )
    parser.add_argument("checkpoint", help="a step_N checkpoint directory, a run / checkpoints directory (newest), "
                        "or a file written by dinov2-export (to convert it)")
    parser.add_argument("out", help="output: .pth/.pt or .safetensors (released layout), .onnx, a directory "
                        "(--format hf) or .safetensors/.pth (--format timm); written atomically")
    parser.add_argument("--which", choices=WHICH, default="final",
                        help="final (default): the run's final model, i.e. the EMA teacher (what DINOv2 releases) or, "
                        "after distillation, the student's EMA; or teacher, student, student_ema explicitly")
    parser.add_argument("--format", choices=ALL_FORMATS, default=None,
                        help="pth | safetensors | onnx (the suffix decides when omitted) | hf (transformers "
                        "directory) | timm (timm's key layout)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = export_backbone(args.checkpoint, args.out, which=args.which, fmt=args.format)
    except (OSError, ValueError, ImportError, CheckpointException) as error:  # one line, no traceback
        print(f"dinov2-export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {info['tensors']} tensors ({info['parameters'] / 1e6:.1f} M parameters) of the {info['which']} "
          f"backbone of {info['checkpoint']} to {info['out']} ({info['format']})")
    if info["hub"]:
        print(f"load with: {info['hub']}")
    if info["load"]:
        print(f"load with: {info['load']}")
    if info["description"] is None:
        print("note: no config.yaml next to the checkpoints, so the file does not describe its architecture; "
              "loading it needs the architecture flags", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
