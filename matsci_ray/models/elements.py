"""What an encoder may know about an element besides its atomic number.

A per-Z embedding table learns nothing about an element absent from training: it keeps its
random initial row. Describing each element by its place in the periodic table (period,
group, block), its Pauling electronegativity and its covalent radius lets an encoder place an
unseen element beside its chemical neighbours (Pt beside Pd and Ir, Zr beside Ti), as CGCNN's
atom features do (Xie & Grossman 2018, Phys. Rev. Lett. 120, 145301).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import Tensor

PERIODS, GROUPS, BLOCKS = 7, 18, "spdf"
NUM_FEATURES = PERIODS + GROUPS + len(BLOCKS) + 2


@functools.cache
def _table(max_z: int) -> np.ndarray:
    from ase.data import covalent_radii
    from pymatgen.core.periodic_table import Element

    rows = np.zeros((max_z + 1, NUM_FEATURES))
    scalars = np.full((max_z + 1, 2), np.nan)
    with warnings.catch_warnings():  # pymatgen warns about elements it has no X for
        warnings.simplefilter("ignore")
        for z in range(1, max_z + 1):
            element = Element.from_Z(z)
            rows[z, element.row - 1] = 1.0
            rows[z, PERIODS + element.group - 1] = 1.0
            rows[z, PERIODS + GROUPS + BLOCKS.index(element.block)] = 1.0
            scalars[z] = (element.X, covalent_radii[z])
    # standardised over the elements that have a value; the others sit at the mean (zero)
    known = scalars[1:]
    scalars = (scalars - np.nanmean(known, axis=0)) / np.nanstd(known, axis=0)
    rows[:, -2:] = np.nan_to_num(scalars, nan=0.0)
    rows[0] = 0.0
    return rows


def element_features(max_z: int) -> Tensor:
    """``(max_z + 1, NUM_FEATURES)`` float32: one-hot period, group and block, then
    standardised electronegativity and covalent radius; row 0 (no element) is zero."""
    return torch.from_numpy(_table(max_z)).float()
