"""``ray job submit --working-dir . -- python jobs/generative.py CONFIG``: train a generative
model (a config whose ``model.name`` is ``cdvae``) on Ray Train.

Then ``matsci-ray generate CHECKPOINT -n N --out FILE.extxyz`` samples it and
``matsci-ray reconstruct CHECKPOINT --split test --out FILE`` scores its reconstructions.
Runs on the cluster the job is submitted to, or on a local Ray when run directly.
"""

from __future__ import annotations

import sys

from matsci_ray.cli.main import main


def refuse_predictive(argv: list[str]) -> None:
    """One line (exit 2) for a config of a predictive model: that is jobs/single_task.py's."""
    from matsci_ray.config import load_config
    from matsci_ray.errors import MatSciError
    from matsci_ray.models.registry import is_generative

    try:
        config = load_config(argv[0])
    except MatSciError as error:
        print(f"jobs/generative.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if not is_generative(config.model.name):
        print(
            f"jobs/generative.py: {argv[0]}: model {config.model.name} is predictive; "
            "use jobs/single_task.py",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    if sys.argv[1:] and not sys.argv[1].startswith("-"):
        refuse_predictive(sys.argv[1:])
    sys.exit(main(["train", *sys.argv[1:]]))
