"""crystalae: crystal structures as 3-D densities, learned with VAEs, searched with Ray Tune."""
__version__ = "0.1.0"
