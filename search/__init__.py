"""Hyperparameter search over crystalae models (Ray Tune + Optuna) and the model registry.

Depends on `crystalae`; nothing in `crystalae` imports this package.
"""
