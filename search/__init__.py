"""Hyperparameter search over crystalae models (Ray Tune + Optuna): the sweep config, the driver, and
the Ray-free reading of sweep results. Installed as `crystalae.search` (the repository keeps the
top-level `search/` folder). Depends on the core; `crystalae.cli` and `crystalae.dashboard` use it.
"""
