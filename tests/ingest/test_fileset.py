"""Which files get packed: git and plain trees, ignore files, globs, default excludes, links, secrets."""

from __future__ import annotations

import os

import pytest

import ingest
from tests.ingest.fixtures import git_repo, write_tree

TREE = {
    ".gitignore": "*.log\nbuild_out/\n",
    "app.py": "print('app')\n",
    "debug.log": "ignored by the root .gitignore\n",
    "sub/.gitignore": "*.tmp\n!keep.tmp\nhidden/\n",
    "sub/mod.py": "x = 1\n",
    "sub/c.tmp": "ignored by the nested .gitignore\n",
    "sub/keep.tmp": "re-included by a negation\n",
    "sub/hidden/z.py": "ignored directory\n",
    "sub/deep/notes.log": "ignored from the root rule\n",
}
KEPT = {".gitignore", "app.py", "sub/.gitignore", "sub/mod.py", "sub/keep.tmp"}


def paths(p: ingest.Pack) -> set[str]:
    return {f.path for f in p.files}


def skipped(p: ingest.Pack) -> dict[str, str]:
    return dict(p.skipped)


@pytest.mark.parametrize("use_git", [True, False], ids=["git", "plain"])
def test_nested_gitignore(tmp_path, run_pack, use_git):
    write_tree(tmp_path, TREE)
    if use_git:
        git_repo(tmp_path, commit=[".gitignore", "app.py", "sub/.gitignore", "sub/mod.py"])
    assert paths(run_pack(tmp_path)) == KEPT


def test_git_untracked_files(tmp_path, run_pack):
    write_tree(tmp_path, TREE)
    git_repo(tmp_path, commit=["app.py", ".gitignore"])
    write_tree(tmp_path, {"new_untracked.py": "y = 2\n", "build_out/gen.py": "untracked and ignored\n",
                          "scratch.log": "untracked and ignored\n"})
    got = paths(run_pack(tmp_path))
    assert "new_untracked.py" in got
    assert not {"build_out/gen.py", "scratch.log"} & got


def test_git_info_exclude_and_subdirectory_paths(tmp_path, run_pack):
    write_tree(tmp_path, TREE)
    git_repo(tmp_path)
    (tmp_path / ".git" / "info").mkdir(exist_ok=True)
    (tmp_path / ".git" / "info" / "exclude").write_text("app.py\n")
    assert paths(run_pack(tmp_path)) == KEPT - {"app.py"}
    sub = run_pack(tmp_path / "sub")
    assert paths(sub) == {".gitignore", "mod.py", "keep.tmp"} and sub.root == str((tmp_path / "sub").resolve())


@pytest.mark.parametrize("use_git", [True, False], ids=["git", "plain"])
def test_mobaignore_and_globs(tmp_path, run_pack, use_git):
    write_tree(tmp_path, {**TREE, ".mobaignore": "sub/mod.py\n", "docs/guide.md": "# Guide\n"})
    if use_git:
        git_repo(tmp_path)
    assert paths(run_pack(tmp_path)) == KEPT - {"sub/mod.py"} | {".mobaignore", "docs/guide.md"}
    assert paths(run_pack(tmp_path, include=("*.py",))) == {"app.py"}
    assert paths(run_pack(tmp_path, exclude=("sub/", "*.md"))) == {".gitignore", "app.py", ".mobaignore"}


def test_several_paths_and_single_file(tmp_path, run_pack):
    write_tree(tmp_path, {"a/x.py": "x = 1\n", "b/y.py": "y = 2\n", "c/z.py": "z = 3\n"})
    p = run_pack([tmp_path / "a", tmp_path / "b" / "y.py"])
    assert paths(p) == {"a/x.py", "b/y.py"} and p.root == str(tmp_path.resolve())
    single = run_pack(tmp_path / "c" / "z.py")
    assert paths(single) == {"z.py"}


def test_default_excludes(tmp_path, run_pack):
    files = {"main.py": "x = 1\n", "poetry.lock": "lock\n", "package-lock.json": "{}\n",
             "node_modules/lib/index.js": "x\n", "vendor/dep.go": "package dep\n", "dist/app.js": "x\n",
             "static/app.min.js": "x\n", "static/app.js.map": "{}\n", "static/style.min.css": "a{}\n"}
    write_tree(tmp_path, files)
    p = run_pack(tmp_path)
    assert paths(p) == {"main.py"}
    reasons = skipped(p)
    assert reasons["poetry.lock"] == "excluded by default (lockfile)"
    assert reasons["node_modules/"] == "excluded by default (dependency directory)"
    assert reasons["dist/"] == "excluded by default (build output)"
    assert reasons["static/app.min.js"] == "excluded by default (minified)"
    assert reasons["static/app.js.map"] == "excluded by default (source map)"
    assert paths(run_pack(tmp_path, default_excludes=False)) == set(files)


def test_binary_size_and_encoding(tmp_path, run_pack):
    write_tree(tmp_path, {
        "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00rest",
        "blob.dat": b"abc\x00def" * 10,
        "noise.raw": bytes(range(1, 32)) * 20 + b"\xff\xfe\xfd",
        "latin1.txt": "caf\xe9 cr\xe8me\nsecond line\n".encode("latin-1"),
        "big.py": "x = 1\n" * 400,
        "small.py": "y = 2\n",
    })
    p = run_pack(tmp_path, max_file_bytes=1000)
    reasons = skipped(p)
    assert reasons["logo.png"] == "binary (image)"
    assert reasons["blob.dat"] == "binary (NUL bytes)"
    assert reasons["noise.raw"] == "binary (not text)"
    assert reasons["big.py"].startswith("larger than the size cap")
    latin = next(f for f in p.files if f.path == "latin1.txt")
    assert latin.flags == ("non_utf8",) and latin.lines == 2
    assert "caf\ufffd cr\ufffdme" in p.text
    assert paths(p) == {"latin1.txt", "small.py"}
    assert "big.py" in paths(run_pack(tmp_path, max_file_bytes=10_000))


@pytest.mark.parametrize("use_git", [True, False], ids=["git", "plain"])
def test_symlinks(tmp_path, run_pack, use_git):
    outside = tmp_path / "outside"
    root = write_tree(tmp_path / "repo", {"real.py": "r = 1\n", "d/inner.py": "i = 1\n"})
    write_tree(outside, {"secret.py": "s = 1\n"})
    os.symlink(outside / "secret.py", root / "out_link.py")
    os.symlink(outside, root / "out_dir")
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    os.symlink("..", root / "d" / "up")
    os.symlink("real.py", root / "alias.py")
    if use_git:
        git_repo(root)
    p = run_pack(root)
    reasons = skipped(p)
    assert paths(p) == {"real.py", "d/inner.py", "alias.py"}
    assert reasons["out_link.py"] == "symlink points outside the root"
    assert reasons["loop_a"] == reasons["loop_b"] == "symlink loop"
    assert reasons["d/up" if use_git else "d/up/"] == "symlink loop"
    assert reasons["out_dir" if use_git else "out_dir/"] == "symlink points outside the root"
    assert "s = 1" not in p.text


def test_secret_files_are_skipped_and_secret_values_redacted(tmp_path, run_pack):
    header = "PRIVATE KEY-----"  # split so that this test file itself is not flagged as a secret
    key = f"-----BEGIN RSA {header}\nMIIEowIBAAKCAQEA\n-----END RSA {header}\n"
    write_tree(tmp_path, {
        ".env": "API_TOKEN=abc\n", "config/.env.production": "X=1\n", ".env.example": "API_TOKEN=\n",
        "keys/id_rsa": key, "deploy/server.pem": key, "settings.py": f"KEY = '''{key}'''\n",
        "ok.py": "fine = True\n",
    })
    p = run_pack(tmp_path)
    reasons = skipped(p)
    assert paths(p) == {".env.example", "ok.py", "settings.py"}
    for name in (".env", "config/.env.production", "keys/id_rsa", "deploy/server.pem"):
        assert reasons[name].startswith("looks like a secret (file name)")
    assert "1| KEY = " + "'" * 3 + "[REDACTED:private-key]\n2|\n3|\n4| " in p.text
    assert p.redacted == (("settings.py", 1, "private-key"),)
    assert "PRIVATE KEY" not in p.text
    assert {".env", "settings.py", "keys/id_rsa"} <= paths(run_pack(tmp_path, allow_secrets=True))


def test_missing_path_and_empty_repository(tmp_path, run_pack):
    with pytest.raises(ingest.PackError, match="path not found: .*nope"):
        run_pack(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    git_repo(empty)
    with pytest.raises(ingest.PackError, match="no files to pack"):
        run_pack(empty)
    write_tree(tmp_path / "only_binary", {"a.png": b"\x89PNG"})
    with pytest.raises(ingest.PackError, match=r"no files to pack .*\(1 skipped\)"):
        run_pack(tmp_path / "only_binary")


def test_directory_ignored_by_the_enclosing_repo_is_walked(tmp_path, run_pack):
    write_tree(tmp_path, {".gitignore": "scratch/\n", "a.py": "a = 1\n", "scratch/.gitignore": "*.log\n",
                          "scratch/notes.py": "n = 1\n", "scratch/run.log": "log\n"})
    git_repo(tmp_path, commit=["a.py", ".gitignore"])
    assert paths(run_pack(tmp_path)) == {".gitignore", "a.py"}
    assert paths(run_pack(tmp_path / "scratch")) == {".gitignore", "notes.py"}
