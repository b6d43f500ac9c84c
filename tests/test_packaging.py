"""The installed distribution: one import package (`crystalae`), with `search/` and `dashboard/` inside it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_crystalae_import_package(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, project / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("crystalae", "search", "dashboard", "pretrained"):
        shutil.copytree(ROOT / folder, project / folder, ignore=ignore)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                             "-w", str(tmp_path / "dist"), str(project)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # setuptools' warnings (a folder it would have to guess is a package) are 40-line walls at install time
    warned = [line for line in (result.stdout + result.stderr).splitlines() if "Warning:" in line]
    assert not warned, warned
    [wheel] = list((tmp_path / "dist").glob("crystalae-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["crystalae"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"crystalae"}
    for needed in ("crystalae/search/sweep.py", "crystalae/search/configs/demo.yaml", "crystalae/dashboard/app.py",
                   "crystalae/dashboard/pages/1_Sweeps.py", "crystalae/registry.py", "crystalae/py.typed",
                   *(f"crystalae/_pretrained/{model}/{file}" for model in ("perov_5", "carbon_24")
                     for file in ("checkpoint.pt", "config.json", "README.md"))):
        assert needed in names, needed  # the shipped models are reachable after `pip install`
    from crystalae.pretrained import PRETRAINED

    for model in PRETRAINED.glob("*/checkpoint.pt"):  # a new shipped model is named in pyproject's packages
        assert f"crystalae/_pretrained/{model.parent.name}/checkpoint.pt" in names, model
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert "Author: The crystalae authors" in text and "Classifier: Intended Audience :: Science/Research" in text
    assert "Project-URL:" in text and "Provides-Extra: all" in text


def test_the_all_extra_holds_every_extra_and_dev_repeats_none():
    import re

    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [everything] = extras["all"]
    named = set(re.fullmatch(r"crystalae\[(.*)\]", everything).group(1).split(","))
    assert named == set(extras) - {"all", "dev"}
    repeated = {d for d in extras["dev"] for name in named if d in extras[name]}
    assert not repeated, f"dev repeats the lists of other extras: {sorted(repeated)}"


def test_every_imported_distribution_is_declared():
    """Third-party imports of the package (not the tests) must be dependencies or in the extra that
    uses them, so `pip install crystalae[search,dashboard]` is complete."""
    import ast

    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = " ".join(meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds])
    module_to_dist = {"yaml": "pyyaml", "sklearn": "scikit-learn", "optuna_dashboard": "optuna-dashboard"}
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for folder in ("crystalae", "search", "dashboard"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
                for name in names:
                    top = name.split(".")[0]
                    if top in stdlib or top in ("crystalae", "search", "dashboard"):
                        continue
                    if module_to_dist.get(top, top).lower() not in declared.lower():
                        missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
