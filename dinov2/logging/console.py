"""Console logging of the command-line tools: one format, and third-party loggers kept quiet.

``faiss.loader`` logs at INFO every optional SIMD build it fails to import ("Could not load library
with AVX2 support due to: ModuleNotFoundError(...)") before it loads the generic one: harmless, but
with the trainer's INFO level it lands in the middle of progress bars the first time kNN or
curation imports faiss. Those loggers are raised to WARNING; real faiss failures still show.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = {"faiss.loader": logging.WARNING}


def setup_logging(level: int = logging.INFO, fmt: str = FORMAT) -> None:
    logging.basicConfig(level=level, format=fmt)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
