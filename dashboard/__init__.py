"""Streamlit dashboard over sweep results and the model registry. Installed as `crystalae.dashboard`
(the repository keeps the top-level `dashboard/` folder); depends on the core and `crystalae.search`,
and nothing imports it except `crystalae dashboard`, which launches it."""
