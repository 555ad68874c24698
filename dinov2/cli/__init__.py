"""Every ``dinov2-*`` command, in one place: argument parsing, messages and exit codes over library calls.

``train`` (dinov2-train; ``torchrun -m dinov2.cli.train``), ``submit`` (dinov2-submit: SLURM or local
jobs through submitit), ``eval`` (dinov2-eval, with ``backbone_args``), ``export`` (dinov2-export),
``plot`` (dinov2-plot), ``demo`` (dinov2-demo / ``make demo``). ``dinov2-curate`` is
``data_curation.cli``. Nothing below this package imports it.
"""
