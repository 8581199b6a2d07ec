"""MACE as an encoder: mace-torch's own blocks on the project's periodic graphs.

Batatia, Kovács, Simm, Ortner and Csányi, "MACE: Higher Order Equivariant Message Passing
Neural Networks for Fast and Accurate Force Fields", NeurIPS 2022 (arXiv:2206.07697). The
layers are ``mace.modules``' radial embedding (Bessel basis times a polynomial envelope),
spherical harmonics, residual interaction blocks and equivariant product (symmetric
contraction) blocks, stacked as ``mace.modules.models.MACE`` stacks them; this module only
feeds them the batch and hands their invariant features to the project's heads. The readouts,
atomic reference energies and scale/shift of mace-torch's model are left out: the heads, their
normalisers and the tasks' losses play those parts for every encoder alike.

Elements: MACE's node attributes are a one-hot vector over the elements it was built for,
``elements``. A training run fills it in from its data sets' manifests (every element of every
split: :func:`~matsci_ray.train.trainer.with_data_elements`), as mace-torch builds its table
from the training data; the table is part of the model's config, so a checkpoint rebuilds the
same one, and a structure holding another element is refused by name. Without a table the
vector spans every atomic number ``0..118`` (0 unused): a model built before it knows its data
(a test, the driver's check), at a cost, since the product blocks' element-dependent weights
and each layer's skip connection grow with the table. e3nn normalises its linear maps and
tensor products by their fan-in, which assumes every input is active; a one-hot input has one,
so the element embedding and each layer's element-dependent skip connection would come out
``sqrt(table size)`` times smaller than MACE makes them for a one-element table (they shrink
with the table's size in mace-torch). Those two read the one-hot times ``sqrt(table size)``;
the product blocks, whose per-element weights are not normalised by the number of elements,
read the plain one-hot. The model is then, at initialisation, what mace-torch builds for a
table holding the atom's element alone, whatever the table.

mace-torch is an optional extra (``pip install -e '.[mace]'``); without it, asking for this
model is a :class:`~matsci_ray.errors.ConfigError` when the config is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from matsci_ray.errors import ConfigError
from matsci_ray.models.base import Encoder, EncoderOutput
from matsci_ray.models.blocks import MAX_Z, edge_geometry, graph_index, readout, readout_width

log = logging.getLogger(__name__)
_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _contained_import() -> Iterator[None]:
    """Import mace-torch without its side effects on the process.

    ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for good (e3nn 0.4.4 loads its
    own constants with a plain ``torch.load``, which torch >= 2.6 refuses): left set, every
    later ``torch.load`` without an explicit ``weights_only`` in this process and its children
    would unpickle arbitrary code. The variable is restored once the import is done. mace's
    note that the optional cuequivariance kernels are missing goes to the log, not stdout.
    """
    before = os.environ.get(_NO_WEIGHTS_ONLY)
    os.environ[_NO_WEIGHTS_ONLY] = "1"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            # torch's note that the variable above turned weights-only loading off
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
            yield
    finally:
        if before is None:
            os.environ.pop(_NO_WEIGHTS_ONLY, None)
        else:
            os.environ[_NO_WEIGHTS_ONLY] = before
        if printed.getvalue().strip():
            log.debug("mace-torch: %s", printed.getvalue().strip())


with _contained_import():
    try:
        import e3nn
        from e3nn import o3
        from mace.modules import (
            EquivariantProductBasisBlock,
            LinearNodeEmbeddingBlock,
            RadialEmbeddingBlock,
            RealAgnosticResidualInteractionBlock,
        )
    except ImportError as error:  # this module stays unimported; the registry reports why
        raise ConfigError(f"needs the mace extra: pip install -e '.[mace]' ({error})") from None

ALL_ELEMENTS = tuple(range(MAX_Z + 1))  # the table without ``elements``: atomic numbers 0..118


@dataclass(frozen=True)
class MACESettings:
    """The hyperparameters that shape MACE's layers (see :class:`MACE` for each)."""

    num_channels: int
    num_interactions: int
    max_ell: int
    max_L: int
    correlation: int
    num_radial: int
    num_cutoff_basis: int
    radial_mlp_dim: int
    avg_num_neighbors: float
    cutoff: float
    num_elements: int


class MACE(Encoder):
    """MACE encoder: each layer's invariant (``0e``) atom features, concatenated, and pooled.

    ``node`` holds, per atom, the scalar channels of every layer's output, the features
    mace-torch's readouts turn into atomic energies; ``graph`` pools them per structure.

    Args:
        num_channels: channels per irrep of the hidden features (MACE's ``num_channels``).
        num_interactions: interaction + product layers (MACE's ``num_interactions``).
        max_ell: highest degree of the edges' spherical harmonics.
        max_L: highest degree of the hidden atom features (0: scalars only, 1: vectors too);
            the last layer keeps only its scalars, as in mace-torch.
        correlation: body order of each product block (the symmetric contraction's degree).
        num_radial: Bessel functions expanding the edge length (MACE's ``num_radial_basis``).
        num_cutoff_basis: power ``p`` of MACE's polynomial envelope.
        radial_mlp_dim: width of the three hidden layers of the MLP from the radial basis to
            each edge's tensor-product weights.
        avg_num_neighbors: constant dividing each neighbour sum (mace-torch measures it on the
            training set; here it is a setting, like EGNN's ``aggr_norm``).
        cutoff: Å; MACE's ``r_max``, where the envelope reaches zero.
        elements: the atomic numbers the one-hot node attributes span (MACE's element table);
            ``None``: every atomic number. A training run sets it from its data.
        readout: pooling of the atom features into ``graph``: ``"sum_mean"``, ``"sum"`` or
            ``"mean"``.
    """

    def __init__(
        self,
        *,
        num_channels: int = 64,
        num_interactions: int = 2,
        max_ell: int = 3,
        max_L: int = 1,
        correlation: int = 3,
        num_radial: int = 8,
        num_cutoff_basis: int = 5,
        radial_mlp_dim: int = 64,
        avg_num_neighbors: float = 32.0,
        cutoff: float = 6.0,
        elements: list[int] | None = None,
        readout: Literal["sum_mean", "sum", "mean"] = "sum_mean",
    ) -> None:
        super().__init__()
        if min(num_channels, num_interactions, correlation, num_radial, radial_mlp_dim) < 1:
            raise ValueError(
                "num_channels, num_interactions, correlation, num_radial and radial_mlp_dim "
                "must be at least 1"
            )
        if max_ell < 0 or max_L < 0:
            raise ValueError("max_ell and max_L must be at least 0")
        self.elements = ALL_ELEMENTS if elements is None else element_table(elements)
        self.settings = MACESettings(
            num_channels=num_channels,
            num_interactions=num_interactions,
            max_ell=max_ell,
            max_L=max_L,
            correlation=correlation,
            num_radial=num_radial,
            num_cutoff_basis=num_cutoff_basis,
            radial_mlp_dim=radial_mlp_dim,
            avg_num_neighbors=float(avg_num_neighbors),
            cutoff=float(cutoff),
            num_elements=len(self.elements),
        )
        self.cutoff = float(cutoff)
        self.readout = readout
        self.node_dim = num_channels * num_interactions
        self.graph_dim = readout_width(self.node_dim, readout)
        self.element_scale = math.sqrt(len(self.elements))  # see the module's docstring
        column = torch.full((MAX_Z + 1,), -1, dtype=torch.long)
        column[list(self.elements)] = torch.arange(len(self.elements))
        # derived from ``elements`` (the config), so not in the state dict
        self.register_buffer("element_column", column, persistent=False)
        self.layers = build_layers(self.settings)

    def reset_parameters(self) -> None:
        # e3nn's modules draw their weights in __init__ and have no reset: build the same
        # layers again (the same draws under the same seed) and take their weights
        self.layers.load_state_dict(build_layers(self.settings).state_dict())

    def forward(self, batch: Any) -> EncoderOutput:
        index, num_graphs = graph_index(batch)
        vec, dist = edge_geometry(batch, index)
        # mace-torch's edge vectors point from the neighbour to the centre, ours the other way
        edge_attrs = self.layers["spherical_harmonics"](-vec)
        edge_feats, _ = self.layers["radial"](dist.unsqueeze(-1), None, None, None)
        one_hot = nn.functional.one_hot(self.columns(batch.z), len(self.elements)).to(vec.dtype)
        scaled = one_hot * self.element_scale
        h = self.layers["embedding"](scaled)
        scalars: list[Tensor] = []
        for interaction, product in zip(
            self.layers["interactions"], self.layers["products"], strict=True
        ):
            h, skip = interaction(
                node_attrs=scaled,
                node_feats=h,
                edge_attrs=edge_attrs,
                edge_feats=edge_feats,
                edge_index=batch.edge_index,
            )
            h = product(node_feats=h, sc=skip, node_attrs=one_hot)
            # the hidden irreps are sorted, so each layer's scalars are its first channels
            scalars.append(h[:, : self.settings.num_channels])
        node = torch.cat(scalars, dim=-1)
        return EncoderOutput(node=node, graph=readout(node, index, num_graphs, self.readout))

    def columns(self, z: Tensor) -> Tensor:
        """Each atom's column of the element table; an element outside it is a ValueError
        (under torch.compile, the check's host sync would split the graph: a run's table holds
        its data's elements, checked when it starts, and prediction checks each structure)."""
        columns = self.element_column[z]
        if not torch.compiler.is_compiling() and bool((columns < 0).any()):
            missing = sorted(set(z[columns < 0].tolist()))
            raise ValueError(
                f"MACE was built for elements {list(self.elements)}; the batch holds atomic "
                f"number(s) {missing}"
            )
        return columns


def element_table(elements: list[int]) -> tuple[int, ...]:
    """``elements`` sorted, checked to be distinct atomic numbers ``1..118``."""
    table = tuple(sorted(set(elements)))
    if not table or len(table) != len(elements) or not 1 <= table[0] <= table[-1] <= MAX_Z:
        raise ValueError(f"elements must be distinct atomic numbers 1..{MAX_Z}, got {elements}")
    return table


# How e3nn generates MACE's code: its defaults, as mace-torch builds it: einsums reordered
# (opt_einsum's path) and each generated module compiled by TorchScript. Together they give
# the fastest training step at both the default and the small size, TorchScript alone the
# slowest (benchmarks/README.md, "e3nn's generated code"); TorchScript lengthens each build.
# All settings compute the same values.
CODEGEN = {"script": True, "einsums": True}


@contextlib.contextmanager
def e3nn_codegen(script: bool, einsums: bool) -> Iterator[None]:
    """e3nn's code generation while layers are built: ``script`` compiles each generated
    module with TorchScript, ``einsums`` reorders its einsums. TorchScript's notes on the
    generated code (its type system's limits, its own deprecation) say nothing to a user."""
    before = dict(e3nn.get_optimization_defaults())
    e3nn.set_optimization_defaults(jit_script_fx=script, optimize_einsums=einsums)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The TorchScript type system")
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
            yield
    finally:
        e3nn.set_optimization_defaults(**before)


def _device_with_data() -> contextlib.AbstractContextManager[Any]:
    """The CPU where the default device is torch's meta device (the driver's check of a
    config builds its encoder there, allocating nothing): e3nn computes constants from sampled
    numbers while it builds a layer, and a meta tensor holds no numbers."""
    meta = torch.get_default_device().type == "meta"
    return torch.device("cpu") if meta else contextlib.nullcontext()


def build_layers(settings: MACESettings) -> nn.ModuleDict:
    """The learnable part of MACE, wired as ``mace.modules.models.MACE.__init__`` wires it
    (residual interactions in every layer, scalar-only last layer), without its readouts."""
    with e3nn_codegen(**CODEGEN), _device_with_data():
        return nn.ModuleDict(
            {
                "spherical_harmonics": o3.SphericalHarmonics(
                    o3.Irreps.spherical_harmonics(settings.max_ell),
                    normalize=True,
                    normalization="component",
                ),
                "embedding": LinearNodeEmbeddingBlock(
                    o3.Irreps(f"{settings.num_elements}x0e"),
                    o3.Irreps(f"{settings.num_channels}x0e"),
                ),
                "radial": RadialEmbeddingBlock(
                    r_max=settings.cutoff,
                    num_bessel=settings.num_radial,
                    num_polynomial_cutoff=settings.num_cutoff_basis,
                ),
                **_interactions_and_products(settings),
            }
        )


def _interactions_and_products(settings: MACESettings) -> dict[str, nn.ModuleList]:
    c = settings.num_channels
    element_irreps = o3.Irreps(f"{settings.num_elements}x0e")
    scalar_irreps = o3.Irreps(f"{c}x0e")
    hidden_irreps = (c * o3.Irreps.spherical_harmonics(settings.max_L)).sort()[0].simplify()
    sh_irreps = o3.Irreps.spherical_harmonics(settings.max_ell)
    interactions, products = nn.ModuleList(), nn.ModuleList()
    node_irreps = scalar_irreps  # the element embedding gives scalars
    for layer in range(settings.num_interactions):
        out_irreps = scalar_irreps if layer == settings.num_interactions - 1 else hidden_irreps
        interaction = RealAgnosticResidualInteractionBlock(
            node_attrs_irreps=element_irreps,
            node_feats_irreps=node_irreps,
            edge_attrs_irreps=sh_irreps,
            edge_feats_irreps=o3.Irreps(f"{settings.num_radial}x0e"),
            target_irreps=(c * sh_irreps).sort()[0].simplify(),
            hidden_irreps=out_irreps,
            avg_num_neighbors=settings.avg_num_neighbors,
            radial_MLP=[settings.radial_mlp_dim] * 3,
        )
        interactions.append(interaction)
        products.append(
            EquivariantProductBasisBlock(
                node_feats_irreps=interaction.target_irreps,
                target_irreps=out_irreps,
                correlation=settings.correlation,
                num_elements=settings.num_elements,
                use_sc=True,
            )
        )
        node_irreps = out_irreps
    return {"interactions": interactions, "products": products}
