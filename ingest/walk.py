"""File discovery: which files under the given paths are candidates for packing.

Inside a git work tree, git lists tracked plus untracked-not-ignored files (`git ls-files -co
--exclude-standard`, run by `ingest.gitfiles` with the repository's command-running settings
disabled), which honours nested .gitignore, .git/info/exclude and global excludes. Outside git the
tree is walked and .gitignore files are applied with pathspec's gitignore matcher; when a work tree
exists but git cannot list it, the walk also applies .git/info/exclude and the default global
excludes file, and a note says so. In both modes `.mobaignore` files (gitignore syntax, any
directory), the default excludes, and the include/exclude globs then adjust the set. Symlinks are
never followed out of the root, symlinked directories are never descended into, link loops are
reported, and a file whose real path leaves the root is skipped. Git directories (a bare
repository, a .git dir given as a path) and /proc, /sys, /dev are never entered.

It reads only directory listings, ignore files and link targets, never file contents, and writes
nothing.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ingest import gitfiles, rules
from ingest.records import PackError, PackOptions


@dataclass(frozen=True)
class Candidate:
    """A file to read: absolute path, path relative to the root ('/'-separated), named explicitly?"""

    abs: str
    rel: str
    explicit: bool = False


class IgnoreTree:
    """gitignore-style matcher built from ignore files (e.g. .gitignore, .mobaignore) in every directory."""

    def __init__(self, root: str, names: tuple[str, ...], outer: tuple[list[str], str] = ([], "")):
        """outer: (lines, prefix): rules of lowest precedence (info/exclude, global excludes), matched
        against prefix + the path, where prefix is the pack root relative to their work tree."""
        self.root, self.names = root, names
        self._outer = rules.spec(tuple(outer[0])) if outer[0] else None
        self._prefix = outer[1]
        self._specs: dict[str, object] = {}
        self._dirs: dict[str, bool] = {}

    def _spec(self, rel_dir: str):
        if rel_dir not in self._specs:
            lines = []
            for name in self.names:
                lines += gitfiles.read_ignore_file(os.path.join(self.root, rel_dir, name))
            self._specs[rel_dir] = rules.spec(tuple(lines)) if lines else None
        return self._specs[rel_dir]

    def decide(self, parts: list[str], is_dir: bool) -> bool:
        """Ignored by the deepest matching rule, ancestors' rules not considered."""
        result = None
        if self._outer is not None:
            tail = self._prefix + "/".join(parts) + ("/" if is_dir else "")
            result = self._outer.check_file(tail).include
        for depth in range(len(parts)):
            spec = self._spec("/".join(parts[:depth]))
            if spec is not None:
                tail = "/".join(parts[depth:]) + ("/" if is_dir else "")
                hit = spec.check_file(tail).include
                result = hit if hit is not None else result
        return bool(result)

    def ignored(self, rel: str) -> bool:
        """True when the file rel, or any directory above it, is ignored."""
        parts = rel.split("/")
        for k in range(1, len(parts)):
            key = "/".join(parts[:k])
            if key not in self._dirs:
                self._dirs[key] = self.decide(parts[:k], True)
            if self._dirs[key]:
                return True
        return self.decide(parts, False)


def resolve_paths(paths: list[str]) -> tuple[str, list[Path]]:
    """(root, resolved paths). The root is the single directory given, else the common parent.

    Raises PackError for a path that does not exist or cannot be resolved (e.g. a link loop).
    """
    if not paths:
        raise PackError("no path given; pass a directory or files to pack")
    resolved = []
    for p in paths:
        try:
            resolved.append(Path(p).resolve(strict=True))
        except (OSError, RuntimeError):
            if os.path.lexists(p):
                raise PackError(f"cannot resolve {p}: a broken symlink or a symlink loop") from None
            raise PackError(f"path not found: {p} (check the spelling, or cd to the repository)") from None
    bases = [str(r if r.is_dir() else r.parent) for r in resolved]
    return os.path.commonpath(bases), resolved


def collect(paths: list[str], options: PackOptions) -> tuple[str, list[Candidate], list, list[str]]:
    """(root, candidates, [(path, reason)] skipped by rule, notes on fallbacks). See module doc."""
    root, resolved = resolve_paths(paths)
    found: dict[str, Candidate] = {}
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    for path in resolved:
        if path.is_dir():
            for c in _list_dir(root, str(path), skipped, notes, options.default_excludes):
                found.setdefault(c.rel, c)
        else:
            rel = _rel(root, str(path))
            found[rel] = Candidate(str(path), rel, explicit=True)
    kept = _filter(root, list(found.values()), options, skipped)
    return root, kept, skipped, notes


def _rel(root: str, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _list_dir(root: str, top: str, skipped: list, notes: list[str], prune_defaults: bool) -> list[Candidate]:
    reason = _closed_dir_reason(top)
    if reason:
        skipped.append((_rel(root, top) + "/", reason))
        return []
    work = gitfiles.work_tree_of(top)
    if work is None:
        return _walk(root, top, skipped, prune_defaults)
    try:
        files = gitfiles.list_files(top, work)
    except gitfiles.GitUnavailable as e:
        notes.append(f"git could not list {top} ({e}); walked the tree instead, applying .gitignore files, "
                     ".git/info/exclude and ~/.config/git/ignore (a core.excludesFile set elsewhere is not applied)")
        prefix = os.path.relpath(root, work)
        outer = (gitfiles.exclude_lines(work), "" if prefix == "." else Path(prefix).as_posix() + "/")
        return _walk(root, top, skipped, prune_defaults, outer)
    if not files:
        notes.append(f"git lists no files under {top} (ignored by the enclosing repository?); "
                     "walked it with its own .gitignore files")
        return _walk(root, top, skipped, prune_defaults)
    return _git_candidates(root, top, files, skipped)


def _git_candidates(root: str, top: str, files: list[str], skipped: list) -> list[Candidate]:
    closed: dict[str, str | None] = {}
    out = []
    for abs_path in files:
        inside = _closed_ancestor(top, abs_path, closed)
        if inside is not None:
            continue
        if os.path.isdir(abs_path) and not os.path.islink(abs_path):
            skipped.append((_rel(root, abs_path) + "/", "git submodule or nested repository (not packed)"))
        elif os.path.lexists(abs_path):
            out.append(Candidate(abs_path, _rel(root, abs_path)))
    for d, reason in sorted(closed.items()):
        if reason:
            skipped.append((_rel(root, d) + "/", reason))
    return out


def _closed_ancestor(top: str, abs_path: str, closed: dict[str, str | None]) -> str | None:
    """The first directory between top and abs_path that must not be entered (a git dir), or None."""
    parts = Path(os.path.relpath(abs_path, top)).parts[:-1]
    for k in range(1, len(parts) + 1):
        d = os.path.join(top, *parts[:k])
        if d not in closed:
            closed[d] = _closed_dir_reason(d)
        if closed[d]:
            return d
    return None


def _closed_dir_reason(path: str) -> str | None:
    """Why a directory must not be entered: a git directory or a pseudo file system; else None."""
    if gitfiles.is_git_dir(path):
        return "git directory or bare repository (git internals are not packed)"
    return rules.pseudo_fs_reason(path)


def _walk(root: str, top: str, skipped: list, prune_defaults: bool, outer=([], "")) -> list[Candidate]:
    ignores = IgnoreTree(root, (".gitignore",), outer)
    out = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        rel_dir = _rel(root, dirpath)
        base = [] if rel_dir == "." else rel_dir.split("/")
        keep = []
        for d in sorted(dirnames):
            rel = "/".join([*base, d])
            if d == ".git" or ignores.decide([*base, d], True):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append((rel + "/", _dir_link_reason(root, os.path.join(dirpath, d))))
                continue
            reason = rules.default_exclude_reason(rel, is_dir=True) if prune_defaults else None
            reason = f"excluded by default ({reason})" if reason else _closed_dir_reason(os.path.join(dirpath, d))
            if reason:
                skipped.append((rel + "/", reason))
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not ignores.decide([*base, name], False):
                out.append(Candidate(os.path.join(dirpath, name), "/".join([*base, name])))
    return out


def _dir_link_reason(root: str, link: str) -> str:
    reason = link_problem(root, link)
    return reason or "symlinked directory (not followed)"


def link_problem(root: str, link: str) -> str | None:
    """Why a symlink must not be followed (loop, broken, outside the root, dir loop), or None."""
    try:
        target = Path(link).resolve(strict=True)
    except RuntimeError:
        return "symlink loop"
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else "broken symlink"
    parent = Path(link).parent.resolve()
    if target.is_dir() and (parent == target or target in parent.parents):
        return "symlink loop"
    if os.path.commonpath([root, str(target)]) != root:
        return "symlink points outside the root"
    return None


def _filter(root: str, cands: list[Candidate], options: PackOptions, skipped: list) -> list[Candidate]:
    moba = IgnoreTree(root, (".mobaignore",))
    include = rules.spec(options.include) if options.include else None
    exclude = rules.spec(options.exclude) if options.exclude else None
    seen_dirs: set[str] = set()
    out = []
    for c in sorted(cands, key=lambda c: c.rel):
        if not c.explicit:
            if moba.ignored(c.rel) or (exclude and exclude.match_file(c.rel)):
                continue
            if include and not include.match_file(c.rel):
                continue
            if options.default_excludes and _default_excluded(c.rel, skipped, seen_dirs):
                continue
        reason = _path_problem(root, c)
        if reason:
            skipped.append((c.rel, reason))
            continue
        out.append(c)
    return out


def _path_problem(root: str, c: Candidate) -> str | None:
    if os.path.islink(c.abs):
        reason = link_problem(root, c.abs)
        if reason is None and os.path.isdir(c.abs):
            reason = "symlinked directory (not followed)"
        if reason:
            return reason
    if not c.explicit and os.path.commonpath([root, os.path.realpath(c.abs)]) != root:
        return "path leads outside the root (through a symlinked directory)"
    return None


def _default_excluded(rel: str, skipped: list, seen_dirs: set[str]) -> bool:
    parts = rel.split("/")
    for k in range(1, len(parts)):
        d = "/".join(parts[:k])
        reason = rules.default_exclude_reason(d, is_dir=True)
        if reason:
            if d not in seen_dirs:
                seen_dirs.add(d)
                skipped.append((d + "/", f"excluded by default ({reason})"))
            return True
    reason = rules.default_exclude_reason(rel)
    if reason:
        skipped.append((rel, f"excluded by default ({reason})"))
    return reason is not None
