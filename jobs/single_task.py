"""``ray job submit --working-dir . -- python jobs/single_task.py CONFIG``: one experiment.

Runs on whatever cluster the job is submitted to (RAY_ADDRESS is set by the job server) and,
run directly with python, on a local Ray started in-process.
"""

from __future__ import annotations

import sys

from matsci_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
