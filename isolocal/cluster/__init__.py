"""Runs on a cluster: Slurm batch scripts that save, requeue and resume (`isolocal submit`)."""
