"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/sweep.py STUDY``.

A Ray Tune experiment whose trials are Ray Train runs; resubmitting resumes an interrupted
study. Runs on the cluster the job is submitted to, or on a local Ray when run directly.
"""

from __future__ import annotations

import sys

from matsci_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:], "--family", "sweep"]))
