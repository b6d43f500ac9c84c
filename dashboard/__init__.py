"""Streamlit dashboard over sweep results and the model registry (depends on `search`)."""
