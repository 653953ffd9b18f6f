"""The repositories of the `moba-ask eval` benchmark: pinned PyPI sdists, extracted as plain
directories (no git), and a table of their sizes and task candidates.

    python -m bench.eval_repos fetch [DEST]    # download and extract every sdist (default /work/evalrepos)
    python -m bench.eval_repos stats [DEST]    # markdown: pack tokens (smollm2-135m tokenizer) and the
                                               # candidate tasks per family at 16K and 30K context tokens
    python -m bench.eval_repos paths [DEST]    # the evaluation package directories, one line (for `moba-ask eval`)
    python -m bench.eval_repos paths-more [DEST]  # the same for MORE, the evaluation's second set
    python -m bench.eval_repos bundle [DEST]   # DEST/evalrepos.tgz: every package directory (about 1 MB), to
                                               # carry to a machine without network (bench/eval_gpu.sh unpacks it)

EVAL are the evaluation repositories, MORE a second set of them (added in the twelfth session, when
EVAL's 245 tasks at 16K were too few to bound a difference of 0.05), CALIBRATION the ones kept out of
both (for calibrating citation weights). DEST/NAME-VERSION is each one's directory (an existing one is
kept); the evaluation packs its package directory, so that the context is the library's code rather
than docs, examples or tests. Knows nothing of models beyond the tokenizer used for counting.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

EVAL = [  # (name, version, kind, the package directory inside the sdist: the code, not docs/tests/examples)
    ("flask", "3.0.3", "web framework", "src/flask"),
    ("mpmath", "1.3.0", "numeric / scientific library", "mpmath"),
    ("lark", "1.2.2", "parser generator", "lark"),
    ("flake8", "7.1.1", "tool with a plugin system", "src/flake8"),
    ("tortoise-orm", "0.21.7", "database / async ORM", "tortoise"),
    ("rich", "13.7.1", "terminal rendering", "rich"),
    ("click", "8.1.7", "CLI framework", "src/click"),
]
MORE = [
    ("requests", "2.32.3", "HTTP client", "src/requests"),
    ("werkzeug", "3.0.6", "WSGI toolkit", "src/werkzeug"),
    ("pygments", "2.18.0", "syntax highlighter with lexer plugins", "pygments"),
    ("attrs", "24.2.0", "class-building library", "src/attr"),
    ("marshmallow", "3.23.1", "serialization and validation", "src/marshmallow"),
]
CALIBRATION = [
    ("itsdangerous", "2.2.0", "signing library", "src/itsdangerous"),
    ("packaging", "24.2", "packaging metadata", "src/packaging"),
    ("jinja2", "3.1.4", "template engine", "src/jinja2"),
]
SIZES = (16384, 30000)
DEFAULT_DEST = "/work/evalrepos"


def fetch(dest: Path) -> None:
    for name, version, *_ in EVAL + MORE + CALIBRATION:
        target = dest / f"{name}-{version}"
        if target.is_dir():
            print(f"{target}: present", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"{name}=={version}", "-d", tmp], check=True)
            (archive,) = [p for p in Path(tmp).iterdir() if p.suffix in (".gz", ".zip")]
            _extract(archive, Path(tmp, "x"))
            (top,) = list(Path(tmp, "x").iterdir())
            dest.mkdir(parents=True, exist_ok=True)
            shutil.move(str(top), target)
        print(f"{target}: extracted", file=sys.stderr)


def _extract(archive: Path, out: Path) -> None:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(out)
    else:
        with tarfile.open(archive) as t:
            t.extractall(out, filter="data")


def stats(dest: Path) -> None:
    import ingest
    from agent.evaluate.tasks import CALLER, CLASS, CONSTANT, FUNCTION, build_workspace
    from agent.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    head = "| set | name | version | kind | package | .py pack tokens |" + "".join(
        f" {s // 1000}K fn / def / callers |" for s in SIZES)
    print(head + "\n|" + "---|" * (6 + len(SIZES)))
    for label, repos in (("eval", EVAL), ("more", MORE), ("calibration", CALIBRATION)):
        for name, version, kind, package in repos:
            root = str(dest / f"{name}-{version}" / package)
            full = ingest.pack(root, tok, ingest.PackOptions(include=("*.py",)))
            cells = []
            for size in SIZES:
                ws = build_workspace(root, tok, context_tokens=size, n_tasks=100_000, seed=0, include=("*.py",))
                n = {k: sum(t.kind == k for t in ws.tasks) for k in (FUNCTION, CLASS, CONSTANT, CALLER)}
                cells.append(f"{n[FUNCTION]} / {n[CLASS] + n[CONSTANT]} / {n[CALLER]}")
            print(f"| {label} | {name} | {version} | {kind} | {package} | {full.total_tokens:,} | "
                  + " | ".join(cells) + " |")


def bundle(dest: Path) -> None:
    with tarfile.open(dest / "evalrepos.tgz", "w:gz") as t:
        for name, version, _, package in EVAL + MORE + CALIBRATION:
            t.add(dest / f"{name}-{version}" / package, arcname=f"{name}-{version}/{package}")
    print(dest / "evalrepos.tgz")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("fetch", "stats", "paths", "paths-more", "bundle"):
        sys.exit("usage: eval_repos.py fetch|stats|paths|paths-more|bundle [DEST]")
    dest = Path(argv[1] if len(argv) > 1 else DEFAULT_DEST)
    if argv[0] == "fetch":
        fetch(dest)
    elif argv[0] == "stats":
        stats(dest)
    elif argv[0] == "bundle":
        bundle(dest)
    else:
        repos = EVAL if argv[0] == "paths" else MORE
        print(" ".join(str(dest / f"{n}-{v}" / package) for n, v, _, package in repos))


if __name__ == "__main__":
    main(sys.argv[1:])
