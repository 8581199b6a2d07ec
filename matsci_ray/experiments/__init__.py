"""Experiment families (the MatSciML paper's Tables 3–5) and sweeps, on Ray Tune."""
