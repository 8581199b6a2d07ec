"""Where the shared sample data sets live: ../shared/datasets beside the repository."""

from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "datasets"
