"""Launch training jobs on SLURM (or on this machine) through submitit; see launchers/submit.py."""
