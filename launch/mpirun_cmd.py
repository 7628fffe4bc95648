"""Kept for command lines written before `cke-dist launch` existed: the launcher is cke_dist/cli/launch.py.

    python launch/mpirun_cmd.py CLUSTER.toml [--exec | --slurm [--submit]] -- cke-dist train ...
"""
import sys

from cke_dist.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
