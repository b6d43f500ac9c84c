"""The command line that starts the dashboard; `crystalae dashboard` replaces itself with it (`os.execv`).

    python -m streamlit run dashboard/app.py --server.address 127.0.0.1 --server.port 8501 \
        --server.headless true --browser.gatherUsageStats false -- --storage runs/sweeps --registry runs/registry
"""
from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def launch_command(storage: str, registry: str, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """argv (for `os.execv` or a subprocess) that serves the dashboard over `storage` (sweeps) and `registry`.

    Binds 127.0.0.1 by default: the app can promote models, so it should not face a network unasked.
    Paths become absolute because Streamlit may run the script from another working directory.
    """
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false",  # no telemetry leaves the machine
            "--", "--storage", _absolute(storage), "--registry", _absolute(registry)]


def _absolute(location: str) -> str:
    from crystalae.uri_fs import absolute

    return str(absolute(location))  # URIs (s3://...) stay as given
