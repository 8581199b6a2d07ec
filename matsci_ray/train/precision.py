"""Training arithmetic (``run.precision``) and ``torch.compile`` of the encoder (``run.compile``).

- ``fp32``: everything in float32.
- ``bf16``: the encoder's forward runs under ``torch.autocast(dtype=torch.bfloat16)``, on CPU
  and CUDA alike; no gradient scaler is needed, bf16 having float32's exponent range.
  :class:`~matsci_ray.potential.MatSciModel` keeps what forces and stress are derivatives of
  in float32: positions, strain and edge vectors, the heads and the energy sum (why: in its
  ``forward``). Validation and inference run in float32, so checkpoints are ranked by what
  predicts from them.
  MACE cannot: e3nn's generated tensor products call ``tensordot``, which autocast does not
  cast, on a bf16 input and a float32 one ("both inputs should have same dtype"), so a MACE
  run asked for bf16 trains in float32 and says so in one warning line.
- ``tf32``: CUDA matmuls may use TensorFloat-32, 10-bit mantissa products with float32 sums
  and storage (cuDNN convolutions do by default). CPUs have no TF32 arithmetic: on CPU it
  changes nothing.

``run.compile`` compiles the encoder in place (``nn.Module.compile``, so parameter names and
checkpoints are unchanged), with dynamic shapes: every batch has other atom and edge counts.
Force tasks train on ``-dE/dpos``, which needs a double backward (``create_graph=True``), and
torch.compile's AOTAutograd does not support one: with torch 2.13 on CPU the first force step
of a compiled EGNN fails ("This backward function was compiled with non-empty donated buffers
which requires create_graph=False"), where an energy-only step compiles and runs. A run with a
force task therefore trains uncompiled and says so in one warning line, and energy-only tasks
compile (tests/test_precision.py). Compiling costs minutes of start-up on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator

import torch

from matsci_ray.config import ExperimentConfig
from matsci_ray.potential import MatSciModel

logger = logging.getLogger(__name__)

# Encoders whose forward fails under a bf16 autocast, and why (they train in float32).
NO_AUTOCAST = {
    "mace": "e3nn's tensor products call tensordot on mixed bf16 and float32 inputs, "
    "which autocast does not cast",
}


def set_matmul_precision(config: ExperimentConfig) -> None:
    """``tf32``: let this process's CUDA matmuls and convolutions use TF32 (a no-op on CPU,
    which has no TF32 arithmetic); ``bf16`` on an encoder without it: say so."""
    warn_unsupported_precision(config)
    if config.run.precision == "tf32":
        # cuDNN convolutions already default to TF32 in torch; matmuls do not
        torch.backends.cuda.matmul.fp32_precision = "tf32"


def uses_bf16(config: ExperimentConfig) -> bool:
    """Whether training forwards run under a bf16 autocast: ``bf16`` asked for, and an
    encoder that supports it (:data:`NO_AUTOCAST`)."""
    return config.run.precision == "bf16" and config.model.name not in NO_AUTOCAST


def warn_unsupported_precision(config: ExperimentConfig) -> None:
    """One warning line when ``bf16`` was asked for an encoder that trains in float32."""
    if config.run.precision == "bf16" and not uses_bf16(config):
        reason = NO_AUTOCAST[config.model.name]
        logger.warning("run.precision: %s trains in fp32, not bf16: %s", config.model.name, reason)


@contextlib.contextmanager
def training_autocast(config: ExperimentConfig, device: torch.device) -> Iterator[None]:
    """Around a training forward: a bf16 autocast where :func:`uses_bf16`, else nothing."""
    if not uses_bf16(config):
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def why_not_compiled(model: MatSciModel, device: torch.device) -> str | None:
    """Why ``run.compile`` cannot compile ``model``'s encoder here, or ``None``."""
    if model.needs_forces:
        return (
            "force tasks train on a double backward (forces are -dE/dpos), which "
            "torch.compile does not support"
        )
    if device.type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile on CPU needs a C++ compiler, and none (c++, g++) is on PATH"
    return None


def maybe_compile(model: MatSciModel, config: ExperimentConfig, device: torch.device) -> bool:
    """Compile ``model``'s encoder in place if ``run.compile`` asks and it can be; whether it
    was. One warning line says why not when it cannot."""
    if not config.run.compile:
        return False
    reason = why_not_compiled(model, device)
    if reason is not None:
        logger.warning("run.compile: %s trains uncompiled: %s", config.model.name, reason)
        return False
    model.encoder.compile(dynamic=True)
    return True
