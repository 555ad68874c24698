"""End-to-end curation of a tiny real image folder: the photos that ship with scikit-image
plus flipped and cropped copies of them as planted duplicates (and one corrupt file).

    python -m data_curation.examples.skimage_photos --output-dir outputs/curation_example

Runs every `dinov2-curate` command (embed, dedup, dedup --against, retrieve, kmeans,
sample, manifest, then `run` from a config) and checks that the planted duplicates are
found. No weights can be downloaded here, so the default backbone is the non-learned
``thumbnail`` descriptor; with a released checkpoint on disk use
``--backbone dinov2_vits14 --weights /path/to/dinov2_vits14_pretrain.pth``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data_curation.cli import main as curate

# skimage.data images that ship inside the package (no download needed).
PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "rocket", "text", "retina",
)


def mild_crop(image: Image.Image) -> Image.Image:
    """Remove a few percent of each border (as a re-upload with a slightly different frame would)."""
    w, h = image.size
    return image.crop((int(0.03 * w), int(0.02 * h), int(0.98 * w), int(0.97 * h)))


def write_image_folder(root: Path) -> dict[str, str]:
    """originals/<name>.png, copies/<name>_flip.png and <name>_crop.png, broken.png.
    Returns {copy path: original path}."""
    import skimage.data

    (root / "originals").mkdir(parents=True, exist_ok=True)
    (root / "copies").mkdir(parents=True, exist_ok=True)
    planted = {}
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        original = root / "originals" / f"{name}.png"
        image.save(original)
        for suffix, copy in (("flip", ImageOps.mirror(image)), ("crop", mild_crop(image))):
            path = root / "copies" / f"{name}_{suffix}.jpg"
            copy.save(path, quality=90)
            planted[str(path.resolve())] = str(original.resolve())
    (root / "broken.png").write_bytes(b"this is not an image")
    return planted


def run_example(output_dir: Path, backbone: str = "thumbnail", weights: str = "random", threshold: float = 0.94) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    planted = write_image_folder(output_dir / "images")

    def step(*argv: str) -> None:
        print("$ dinov2-curate", " ".join(argv), flush=True)
        code = curate(["-q", *argv])
        if code != 0:
            raise SystemExit(f"dinov2-curate {argv[0]} failed with exit code {code}")

    emb, work = output_dir / "embed", output_dir / "steps"
    step("embed", "--images", str(output_dir / "images"), "--backbone", backbone, "--weights", weights,
         "--image-size", "112", "--resize-size", "128", "--batch-size", "16", "--output-dir", str(emb))
    paths = (emb / "paths.txt").read_text().splitlines()
    embeddings = np.load(emb / "embeddings.npy")
    step("dedup", "--embeddings", str(emb / "embeddings.npy"), "--k", "5", "--threshold", str(threshold),
         "--output-dir", str(work / "dedup"))
    components = np.load(work / "dedup" / "components.npy")
    keep = np.load(work / "dedup" / "keep.npy")

    # Relative dedup against an "evaluation set" made of two of the originals.
    evaluation = [paths.index(str((output_dir / "images" / "originals" / f"{n}.png").resolve())) for n in ("astronaut", "rocket")]
    np.save(work / "evaluation.npy", embeddings[evaluation])
    step("dedup", "--embeddings", str(emb / "embeddings.npy"), "--against", str(work / "evaluation.npy"),
         "--threshold", str(threshold), "--output-dir", str(work / "dedup_relative"))
    relative_keep = np.load(work / "dedup_relative" / "keep.npy")

    # Retrieval: the nearest pool images of the coffee photo.
    coffee = paths.index(str((output_dir / "images" / "originals" / "coffee.png").resolve()))
    np.save(work / "queries.npy", embeddings[[coffee]])
    step("retrieve", "--embeddings", str(emb / "embeddings.npy"), "--queries", str(work / "queries.npy"), "--k", "3",
         "--output-dir", str(work / "retrieve"))
    retrieved = [Path(paths[i]).name for i in np.load(work / "retrieve" / "neighbors.npy")[0]]

    step("kmeans", "--embeddings", str(emb / "embeddings.npy"), "--levels", "2", "--clusters", "8,3",
         "--rows", str(work / "dedup" / "keep.npy"), "--resampling-steps", "2", "--sample-size", "2",
         "--output-dir", str(work / "kmeans"))
    step("sample", "--clusters-dir", str(work / "kmeans"), "--target", "12", "--output-dir", str(work / "sample"))
    step("manifest", "--paths", str(emb / "paths.txt"), "--select", str(work / "sample" / "selected.npy"),
         "--select", str(work / "dedup_relative" / "keep.npy"), "--output", str(output_dir / "manifest.txt"))

    config = output_dir / "example.yaml"
    config.write_text(
        f"output_dir: {output_dir / 'run'}\nprogress: false\n"
        f"embed:\n  images: {output_dir / 'images'}\n  backbone: {backbone}\n  weights: {weights}\n"
        "  image_size: 112\n  resize_size: 128\n"
        f"self_dedup:\n  k: 5\n  threshold: {threshold}\n"
        f"relative_dedup:\n  enabled: true\n  against: [{work / 'evaluation.npy'}]\n  threshold: {threshold}\n"
        "kmeans:\n  clusters: [8, 3]\n  resampling_steps: 2\n  sample_size: 2\n"
        "sampling:\n  target: 12\n"
    )
    step("run", "--config", str(config))

    row_of = {p: i for i, p in enumerate(paths)}
    found = sum(components[row_of[c]] == components[row_of[o]] for c, o in planted.items())
    originals = {row_of[o] for o in planted.values()}
    merged_distinct = len(originals) - len({int(components[r]) for r in originals})
    summary = {
        "images": len(paths) + 1,
        "errors": (emb / "errors.txt").read_text().count("\n"),
        "planted_copies": len(planted),
        "copies_in_their_original_component": int(found),
        "distinct_photos_merged": int(merged_distinct),
        "kept_after_self_dedup": int(keep.size),
        "kept_after_relative_dedup": int(relative_keep.size),
        "nearest_to_coffee": retrieved,
        "manifest_lines": len((output_dir / "manifest.txt").read_text().splitlines()),
        "run_manifest_lines": len((output_dir / "run" / "manifest.txt").read_text().splitlines()),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/curation_example")
    parser.add_argument("--backbone", default="thumbnail")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--threshold", type=float, default=0.94)
    args = parser.parse_args(argv)
    summary = run_example(Path(args.output_dir), args.backbone, args.weights, args.threshold)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
