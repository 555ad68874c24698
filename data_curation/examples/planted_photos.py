"""A real image pool with known near-copies, for the raw-pool stages' tests, benchmark and example.

Distinct images: the photos that ship with scikit-image, plus disjoint crops of each (its four
quadrants and the nine cells of a 3 x 3 grid), so that many distinct images share a source photo
and a texture. Planted copies of a seeded subset of them, one transformation each:

- ``jpeg``: re-encoded as JPEG at a quality drawn from [30, 95];
- ``rescale``: resized by a factor drawn log-uniformly from [0.5, 2] (saved as JPEG at quality 90);
- ``crop``: 1-5 % of each border removed (saved as PNG);
- ``combo``: a crop, then a rescale, then a JPEG re-encode.

Distinct images are written as PNG (the originals); ``truth`` maps every copy to its original.

    python -m data_curation.examples.planted_photos --output-dir outputs/raw_pool_example

writes the pool (plus one corrupt file), runs `dinov2-curate hash-dedup` and `blur-faces` on
what it keeps, and prints the recall and precision of the planted pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data images that ship inside the package (no download needed); "cat" is "chelsea".
PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "rocket", "text", "retina",
)
KINDS = ("jpeg", "rescale", "crop", "combo")


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def disjoint_crops(image: Image.Image) -> list[Image.Image]:
    """The 2 x 2 quadrants and the 3 x 3 grid cells of ``image``."""
    w, h = image.size
    crops = []
    for grid in (2, 3):
        for row in range(grid):
            for col in range(grid):
                crops.append(image.crop((col * w // grid, row * h // grid, (col + 1) * w // grid, (row + 1) * h // grid)))
    return crops


def border_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    left, top, right, bottom = rng.uniform(0.01, 0.05, size=4)
    return image.crop((int(left * w), int(top * h), w - int(right * w), h - int(bottom * h)))


def rescale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    factor = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w, h = image.size
    return image.resize((max(8, round(w * factor)), max(8, round(h * factor))), Image.Resampling.BICUBIC)


def save_copy(image: Image.Image, kind: str, path_stem: Path, rng: np.random.Generator) -> Path:
    if kind == "jpeg":
        path = path_stem.with_suffix(".jpg")
        image.save(path, quality=int(rng.integers(30, 96)))
    elif kind == "rescale":
        path = path_stem.with_suffix(".jpg")
        rescale(image, rng).save(path, quality=90)
    elif kind == "crop":
        path = path_stem.with_suffix(".png")
        border_crop(image, rng).save(path)
    elif kind == "combo":
        path = path_stem.with_suffix(".jpg")
        rescale(border_crop(image, rng), rng).save(path, quality=int(rng.integers(30, 96)))
    else:
        raise ValueError(f"unknown copy kind {kind!r}; expected one of {KINDS}")
    return path


@dataclass
class PlantedPhotos:
    root: Path
    originals: list[str]  # absolute paths of the distinct images
    truth: dict[str, str] = field(default_factory=dict)  # copy path -> original path
    kind: dict[str, str] = field(default_factory=dict)  # copy path -> transformation

    def source_of(self, path: str) -> str:
        """The original a path belongs to (itself for an original)."""
        return self.truth.get(path, path)


def write_planted_photos(root: str | Path, *, copies_per_kind: int = 20, photos=PHOTOS, with_crops: bool = True,
                         seed: int = 0) -> PlantedPhotos:
    """originals/<photo>[_<crop>].png and copies/<kind>_<n>.<ext>; ``truth.json`` beside them."""
    root = Path(root).resolve()
    (root / "originals").mkdir(parents=True, exist_ok=True)
    (root / "copies").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    originals = []
    for name in photos:
        image = photo(name)
        variants = [image] + (disjoint_crops(image) if with_crops else [])
        for number, variant in enumerate(variants):
            path = root / "originals" / (f"{name}.png" if number == 0 else f"{name}_crop{number:02d}.png")
            variant.save(path)
            originals.append(str(path))
    planted = PlantedPhotos(root, originals)
    for kind in KINDS:
        sources = rng.choice(len(originals), min(copies_per_kind, len(originals)), replace=False)
        for number, source in enumerate(sorted(sources)):
            with Image.open(originals[source]) as image:
                path = save_copy(image.convert("RGB"), kind, root / "copies" / f"{kind}_{number:03d}", rng)
            planted.truth[str(path)] = originals[source]
            planted.kind[str(path)] = kind
    (root / "truth.json").write_text(json.dumps({"truth": planted.truth, "kind": planted.kind}, indent=1))
    return planted


def pair_scores(paths: list[str], groups: np.ndarray, planted: PlantedPhotos) -> dict:
    """Recall and precision of the planted pairs (two images with the same original) among the
    pairs of images put in one group, overall and per copy kind (recall of copy-original pairs)."""
    source = np.array([planted.source_of(p) for p in paths])
    _, source_id = np.unique(source, return_inverse=True)
    true_pairs, found_pairs = set(), set()
    for labels, pairs in ((source_id, true_pairs), (np.asarray(groups), found_pairs)):
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for members in np.split(order, bounds):
            members = np.sort(members)
            pairs.update((int(a), int(b)) for n, a in enumerate(members) for b in members[n + 1 :])
    hits = true_pairs & found_pairs
    row_of = {p: i for i, p in enumerate(paths)}
    per_kind = {}
    for kind in KINDS:
        copies = [(row_of[c], row_of[o]) for c, o in planted.truth.items() if planted.kind[c] == kind and c in row_of and o in row_of]
        found = sum(groups[c] == groups[o] for c, o in copies)
        per_kind[kind] = {"copies": len(copies), "recall": found / len(copies) if copies else float("nan")}
    return {
        "images": len(paths),
        "planted_pairs": len(true_pairs),
        "grouped_pairs": len(found_pairs),
        "recall": len(hits) / len(true_pairs) if true_pairs else float("nan"),
        "precision": len(hits) / len(found_pairs) if found_pairs else 1.0,
        "per_kind": per_kind,
    }


def run_example(output_dir: str | Path, *, radius: int = 10, copies_per_kind: int = 20) -> dict:
    from data_curation.cli import main as curate

    output_dir = Path(output_dir)
    planted = write_planted_photos(output_dir / "images", copies_per_kind=copies_per_kind)
    (output_dir / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    for argv in (["hash-dedup", "--images", str(output_dir / "images"), "--radius", str(radius),
                  "--output-dir", str(output_dir / "hash_dedup")],
                 ["blur-faces", "--images", str(output_dir / "hash_dedup" / "kept_paths.txt"),
                  "--output-dir", str(output_dir / "blur_faces")]):
        print("$ dinov2-curate", " ".join(argv), flush=True)
        if curate(["-q", *argv]) != 0:
            raise SystemExit(f"dinov2-curate {argv[0]} failed")
    paths = (output_dir / "hash_dedup" / "paths.txt").read_text().splitlines()
    scores = pair_scores(paths, np.load(output_dir / "hash_dedup" / "groups.npy"), planted)
    scores["errors"] = len((output_dir / "hash_dedup" / "errors.txt").read_text().splitlines())
    scores["faces_csv"] = str(output_dir / "blur_faces" / "faces.csv")
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/raw_pool_example")
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument("--copies-per-kind", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(run_example(args.output_dir, radius=args.radius, copies_per_kind=args.copies_per_kind), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
