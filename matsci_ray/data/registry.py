"""The one registry of data sets: adding one is its reader plus one :class:`DatasetSpec` here
(or, from another package, an entry point in the ``matsci_ray.datasets`` group naming one).

The ingest command's sources, the multi-data studies' energy tasks and pairs, and the demo's
sample list are read from here. Each data set is ingested by the source of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from matsci_ray.errors import ConfigError
from matsci_ray.plugins import Registry
from matsci_ray.tasks.registry import TASKS


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its reader and the facts the studies and the demo need about it."""

    name: str  # the SOURCE on the command line and the ``dataset`` column its reader writes
    reader: str  # "module:Class", a SourceReader whose ``name`` and ``dataset`` are ``name``
    energy_task: str | None  # its energy task (a TASKS name): the multi-data studies train it
    samples: tuple[str, ...] = ()  # its sample files or directories, under the samples dir
    id_split: str | None = None  # a directory of {train,val,test}.yml ids, under the samples dir
    pairs_with: tuple[str, ...] = ()  # the data sets the paper pairs it with (its Table 5)


def _check(spec: DatasetSpec, specs: dict[str, DatasetSpec]) -> None:
    task = TASKS.get(spec.energy_task) if spec.energy_task else None
    if spec.energy_task and (task is None or task.dataset != spec.name):
        raise ConfigError(
            f"data set {spec.name}: energy task {spec.energy_task!r} is not one of its tasks"
        )
    for other in spec.pairs_with:
        if other not in specs:
            raise ConfigError(f"data set {spec.name}: pairs with unknown data set {other!r}")


DATASETS: Registry[DatasetSpec] = Registry(
    "data set",
    "matsci_ray.datasets",
    DatasetSpec,
    [
        DatasetSpec(
            "oc20-s2ef",
            "matsci_ray.data.readers.oc20:S2EFReader",
            energy_task="s2ef-forces",
            samples=("oc20/trajectories",),
            pairs_with=("materials-project", "lips"),
        ),
        DatasetSpec(
            "oc20-is2re",
            "matsci_ray.data.readers.oc20:IS2REReader",
            energy_task="is2re",
            samples=("oc20/trajectories",),
            pairs_with=("materials-project",),
        ),
        DatasetSpec(
            "materials-project",
            "matsci_ray.data.readers.materials_project:MaterialsProjectReader",
            energy_task="mp-formation-energy",
            # the devset LMDB holds the same documents: ingesting both would count each twice
            samples=("materials_project/summary_docs.jsonl",),
            id_split="materials_project/splits",
            pairs_with=("lips",),
        ),
        DatasetSpec(
            "lips",
            "matsci_ray.data.readers.lips:LiPSReader",
            energy_task="lips-forces",
            samples=("lips/lips_devset.extxyz",),
        ),
        DatasetSpec(
            "oqmd",
            "matsci_ray.data.readers.oqmd:OQMDReader",
            energy_task="oqmd-formation-energy",
            samples=("matsciml-devsets/oqmd/data.lmdb",),
        ),
        DatasetSpec(
            "nomad",
            "matsci_ray.data.readers.nomad:NomadReader",
            energy_task="nomad-energy",
            samples=("matsciml-devsets/nomad/data.lmdb",),
        ),
        DatasetSpec(
            "carolina-db",
            "matsci_ray.data.readers.carolina:CarolinaReader",
            energy_task="cmd-formation-energy",
            samples=("matsciml-devsets/carolina_db/data.lmdb",),
        ),
        DatasetSpec(
            "carbon-24",
            "matsci_ray.data.readers.cdvae_csv:Carbon24Reader",
            energy_task="carbon24-energy",
        ),
        DatasetSpec(
            "perov-5",
            "matsci_ray.data.readers.cdvae_csv:Perov5Reader",
            energy_task="perov5-formation-energy",
        ),
        DatasetSpec(
            "mp-20",
            "matsci_ray.data.readers.cdvae_csv:MP20Reader",
            energy_task="mp20-formation-energy",
        ),
        DatasetSpec(
            "omat24",
            "matsci_ray.data.readers.aselmdb:AseLmdbReader",
            energy_task="omat24-forces",
        ),
        DatasetSpec(
            "mptrj",
            "matsci_ray.data.readers.mptrj:MPtrjReader",
            energy_task="mptrj-forces",
        ),
    ],
    check=_check,
)


def dataset_names() -> list[str]:
    """Registered data set names: the built-ins, then plugins by name."""
    return DATASETS.names()


def energy_task(dataset: str) -> str:
    """The task a multi-data study trains on ``dataset``."""
    task = DATASETS.get(dataset).energy_task
    if task is None:
        raise ConfigError(f"data set {dataset}: no energy task registered for multi-data studies")
    return task


def paper_pairs() -> list[tuple[str, str]]:
    """The MatSciML paper's multi-data pairs, the default of a dataset-pair study."""
    return [(spec.name, other) for spec in DATASETS.specs().values() for other in spec.pairs_with]
