"""bench/ is a package of scripts run as `python -m bench.NAME` on the libraries' public modules:
no sys.path edits, no imports of the CLI (agent.cli, agent.commands) or of test helpers."""

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
FORBIDDEN = ("tests", "agent.cli", "agent.commands", "bench.experiments")


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _scripts() -> list[Path]:
    return sorted(p for p in BENCH.glob("*.py") if p.name != "__init__.py")


def test_bench_is_a_package():
    assert (BENCH / "__init__.py").is_file()
    assert not (BENCH / "experiments").exists()


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.name)
def test_bench_script_imports_only_library_modules(script):
    text = script.read_text()
    tree = ast.parse(text)
    bad = [m for m in _imports(tree) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"{script.name} imports {bad}"
    assert "sys.path" not in text
    assert f"python bench/{script.name}" not in text and f"python3 bench/{script.name}" not in text
