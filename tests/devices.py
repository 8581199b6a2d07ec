"""The devices a device-parametrised test runs on: the CPU always, and CUDA where torch sees a
GPU. Elsewhere (CI) the CUDA cases are skipped, so the skip count names what only a GPU machine
checks; there, ``pytest -k cuda`` runs them (benchmarks/README.md, "GPU")."""

import pytest
import torch

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
)
DEVICES = ["cpu", CUDA]
