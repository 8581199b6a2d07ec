"""matsci-ray: the MatSciML benchmark for solid-state materials, on Ray."""

__version__ = "0.1.0"
