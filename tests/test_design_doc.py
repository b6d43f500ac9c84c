"""docs/design.md stays true to the code: its layout names every module."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    return text[text.index("## Layout"):].split("\n## ", 1)[0]


def test_the_design_layout_names_every_module():
    layout = _layout()
    named = set(re.findall(r"[\w/]+", layout))
    missing = []
    for package in ("crystalae", "search", "dashboard"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py"):
                continue
            stem = path.relative_to(ROOT / package).with_suffix("").as_posix()  # pages/1_Sweeps
            if stem not in named:
                missing.append(f"{package}/{stem}")
    assert not missing, f"docs/design.md's layout does not name: {missing}"


def test_the_design_layout_names_no_module_that_is_gone():
    layout = _layout()
    core = layout.split("search/ ", 1)[0]
    listed = re.findall(r"^  (\w+)\s", core, flags=re.M)
    gone = [name for name in listed if not (ROOT / "crystalae" / f"{name}.py").exists()]
    assert listed and not gone, gone


def test_dependencies_point_one_way_dashboard_search_core():
    """The core imports neither search nor dashboard (cli.py composes them), and search never imports the
    dashboard, at module level or inside a function."""
    import ast

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    wrong = []
    for package, banned in (("crystalae", ("crystalae.search", "crystalae.dashboard")), ("search", ("crystalae.dashboard",))):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name == "cli.py":
                continue
            wrong += [f"{package}/{path.name} imports {m}" for m in imported(path) if m.startswith(banned)]
    assert not wrong, wrong
