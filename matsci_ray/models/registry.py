"""The one registry of encoders: adding a model is its module plus one :class:`ModelSpec` here
(or, from another package, an entry point in the ``matsci_ray.models`` group naming one).

Config validation, sweeps, the demo, the report's column order, the benchmarks and the
encoder-contract tests read their model names and facts from here. Nothing in this module
imports an encoder: ``matsci_ray.models.encoder_class`` does, on first use, and checks the
spec against the encoder's keyword arguments then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from matsci_ray.plugins import Registry

# predictive: an encoder under the task heads (matsci_ray.potential.MatSciModel), trained on
# the config's tasks; generative: a model of crystals themselves (matsci_ray.generative),
# trained by its own loop, sampled by `generate` and `reconstruct`.
Family = Literal["predictive", "generative"]


@dataclass(frozen=True)
class ModelSpec:
    """An encoder and the facts the rest of the project needs about it.

    ``width`` and ``depth`` name the keyword arguments a sweep varies (feature width, number
    of layers or blocks); ``small`` is the model's small setting (read-only), small enough to
    train in seconds on a CPU: the one table of them, read by the demo's studies and the tests.
    All three are checked against the encoder's ``__init__`` when it is first used.
    ``family`` says which training loop and commands take it (:data:`Family`).
    """

    name: str
    encoder: str  # "module:Class", a subclass of matsci_ray.models.base.Encoder
    width: str
    depth: str
    small: Mapping[str, Any] = field(default_factory=dict, hash=False)
    family: Family = "predictive"

    def __post_init__(self) -> None:
        object.__setattr__(self, "small", MappingProxyType(dict(self.small)))

    def __reduce__(self) -> tuple[Any, ...]:  # a mapping proxy does not pickle; a dict does
        fields = (self.name, self.encoder, self.width, self.depth, dict(self.small), self.family)
        return type(self), fields

    def small_params(self) -> dict[str, Any]:
        """``small`` as a new dict, for a config's ``model.params``."""
        return dict(self.small)


MODELS: Registry[ModelSpec] = Registry(
    "model",
    "matsci_ray.models",
    ModelSpec,
    # the paper's order: the report's columns follow it
    [
        ModelSpec(
            "egnn",
            "matsci_ray.models.egnn:EGNN",
            width="hidden_dim",
            depth="num_layers",
            small={"hidden_dim": 64, "num_layers": 2, "mlp_dim": 128},
        ),
        ModelSpec(
            "megnet",
            "matsci_ray.models.megnet:MEGNet",
            width="dim",
            depth="num_blocks",
            small={"dim": 32, "num_blocks": 2, "num_rbf": 50},
        ),
        ModelSpec(
            "gala",
            "matsci_ray.models.gala:GALA",
            width="dim",
            depth="num_layers",
            small={"dim": 64, "heads": 4, "num_layers": 2, "ffn_dim": 128},
        ),
        ModelSpec(
            "mace",
            "matsci_ray.models.mace:MACE",  # needs the optional extra: pip install -e '.[mace]'
            width="num_channels",
            depth="num_interactions",
            small={
                "num_channels": 8,
                "num_interactions": 2,
                "max_ell": 2,
                "correlation": 2,
                "num_radial": 6,
                "radial_mlp_dim": 16,
            },
        ),
        ModelSpec(
            "cdvae",
            "matsci_ray.generative.model:CDVAE",
            width="hidden_dim",
            depth="num_layers",
            small={"hidden_dim": 32, "num_layers": 2, "latent_dim": 32, "num_noise_levels": 10},
            family="generative",
        ),
    ],
)


def model_names(family: Family = "predictive") -> list[str]:
    """Registered model names of ``family`` (encoders under task heads by default): the
    built-ins in the paper's order, then plugins by name."""
    return [name for name, spec in MODELS.specs().items() if spec.family == family]


def is_generative(name: str) -> bool:
    """Whether registered model ``name`` is trained and sampled as a generative model."""
    return name in MODELS and MODELS.get(name).family == "generative"
