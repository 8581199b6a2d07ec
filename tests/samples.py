"""Where the shared sample data sets live (../shared/datasets beside the repository), and an
in-process ingest for tests that need shards but not Ray."""

from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def ingest_in_process(source: str, path: Path, root: Path) -> Path:
    """``source`` from ``path`` into ``root`` without Ray: plan, each unit, the manifest."""
    from matsci_ray.data.manifest import build_manifest, write_manifest
    from matsci_ray.data.readers import get_reader
    from matsci_ray.data.shards import IngestOptions, ingest_unit

    options = IngestOptions(source=source)
    reader = get_reader(source)
    sidecars = [ingest_unit(u, root / reader.dataset, options, "test") for u in reader.plan(path)]
    manifest = build_manifest(reader.dataset, options, [{"file": str(path)}], sidecars)
    write_manifest(root, reader.dataset, manifest)
    return root


# The tests' one tiny EGNN (smaller than the registry's small setting: many tests train it).
TINY_EGNN = {"hidden_dim": 16, "num_layers": 2, "mlp_dim": 32, "num_rbf": 8}


def tiny_model(name: str, root: Path, tasks: list[str]) -> tuple:
    """``(model, config)``: a seeded tiny EGNN whose heads are normalised on ``root``'s train
    statistics, as training would start it (no Ray, no steps)."""
    import torch

    from matsci_ray.config import ExperimentConfig
    from matsci_ray.data.manifest import read_manifest
    from matsci_ray.potential import MatSciModel

    config = ExperimentConfig.model_validate(
        {
            "name": name,
            "tasks": tasks,
            "data": {"root": str(root), "cutoff": 4.0},
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        }
    )
    torch.manual_seed(0)
    model = MatSciModel.from_config(config)
    model.fit_normalisation({d: read_manifest(root, d)["splits"]["train"] for d in config.datasets})
    return model, config
