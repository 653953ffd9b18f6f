"""A synthetic repository with a planted constant, for end-to-end tests on a real small model."""

from __future__ import annotations

from pathlib import Path

from tests.ingest.fixtures import write_tree

PLANTED = "7391046"


def filler_module(name: str, n: int) -> str:
    funcs = []
    for i in range(n):
        funcs.append(
            f"def {name}_step_{i}(values):\n"
            f'    """Apply step {i} of the {name} pipeline to a list of values."""\n'
            f"    total = 0\n"
            f"    for v in values:\n"
            f"        total += v * {i + 2}\n"
            f"    return total\n"
        )
    return f'"""The {name} pipeline."""\n\n\n' + "\n\n".join(funcs)


def planted_repo(root: Path, modules: int = 6, funcs: int = 12) -> Path:
    """~350 tokens per 2 functions; the constant sits in src/settings.py line 4, mid-repository."""
    files = {"README.md": "# Pipelines\n\nA set of numeric pipelines.\n"}
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"][:modules]
    for i, name in enumerate(names):
        files[f"src/{name}.py"] = filler_module(name, funcs)
        if i == len(names) // 2:
            files["src/settings.py"] = (
                '"""Settings of the pipelines."""\n\nRETRIES = 3\n'
                f"MAGIC_NUMBER = {PLANTED}\n\n\ndef magic():\n    return MAGIC_NUMBER\n"
            )
    return write_tree(root, files)
