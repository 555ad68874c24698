"""Crafted files whose unpickling would run code: each writes a marker file when loaded unsafely.
Shared by the security tests (tests/test_security_loading.py, tests/test_export.py).

The payload is ``exec("open(MARKER, 'w').write('ran')")``: harmless, and its only trace is the
marker, so a test can prove both that the file WOULD run code (plain ``pickle.load`` creates the
marker) and that our loaders do not (the marker stays absent).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class RunsCode:
    """Unpickles to ``exec(...)``: writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def write_crafted_pth(path: Path, marker: Path) -> Path:
    """A torch file with real tensors and one entry that runs code when unpickled."""
    torch.save({"cls_token": torch.zeros(1, 1, 4), "payload": RunsCode(marker)}, path)
    return path


def write_crafted_metadata(checkpoint: Path, marker: Path) -> Path:
    """Replace a DCP checkpoint's ``.metadata`` with a pickle that runs code."""
    path = checkpoint / ".metadata"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    return path


def class_tampering_pickle(module: str, name: str, attribute: str) -> bytes:
    """A pickle that fetches an allowed class and sets ``attribute`` on the class itself (BUILD with
    slot state on a class object), which a find_class allow-list alone does not stop."""
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL: the class object
            + b"N}V" + attribute.encode() + b"\nI1\ns\x86"  # (None, {attribute: 1})
            + b"b.")  # BUILD, STOP
