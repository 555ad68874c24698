"""How a failed load is named in one line, for the weights loader (dinov2/hub/weights.py) and the
checkpoint reader (dinov2/checkpoint/metadata.py) alike: the exception's type and first line, and what
torch's weights-only unpickler refused."""

from __future__ import annotations

import re


def weights_only_refusal(error: BaseException) -> str | None:
    """What a ``torch.load(weights_only=True)`` refused (``"it names exec"``), or None when ``error``
    is another failure. torch's own text goes on to suggest allow-listing the global: not passed on."""
    text = str(error)
    if "Weights only load failed" not in text and "Unsupported" not in text:
        return None
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if named:
        return f"it names {named.group(1)}"
    lines = [line.strip() for line in text.splitlines() if "Unsupported" in line]
    return (lines[0] if lines else text.splitlines()[0]).split(". Please")[0]


def describe(error: BaseException) -> str:
    """``"TypeName: first line of the message"`` (DCP and torch messages can run over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0][:500] if lines else ""
    return text if text.startswith(type(error).__name__) else f"{type(error).__name__}" + (f": {text}" if text else "")
