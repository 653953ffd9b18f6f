"""Ask git which files a work tree holds, treating the repository as hostile input.

Every git call runs with the repository's command-running settings overridden (`core.fsmonitor`,
`core.hooksPath`, `core.pager`, `core.sshCommand`, `core.askPass`, `protocol.allow`, and
`core.excludesFile` taken from the user's global config only), no pager,
no prompt, no optional locks, stdin closed, inherited GIT_* variables dropped and a timeout, so
a repository's own .git/config cannot run a program. The system and global git configs are the
user's and are kept (global excludes, safe.directory); git's own ownership check still applies.

It also reads the lines of `.git/info/exclude` and of the default global excludes file, for the
plain walk when git cannot be used. It never writes and knows nothing about packing.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

TIMEOUT_S = 60
IGNORE_FILE_LIMIT = 1 << 20
SAFE_CONFIG = ("core.fsmonitor=false", "core.hooksPath=/dev/null", "core.pager=cat", "core.sshCommand=false",
               "core.askPass=", "protocol.allow=never", "core.untrackedCache=false", "core.splitIndex=false")


class GitUnavailable(Exception):
    """git cannot list this tree; the message says why in a few words."""


def safe_env() -> dict[str, str]:
    """The environment for git: no inherited GIT_* overrides, no prompt, pager or optional locks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0", GIT_PAGER="cat", PAGER="cat",
               GIT_ASKPASS="", SSH_ASKPASS="", GIT_NO_REPLACE_OBJECTS="1")
    return env


def run(cwd: str, *args: str) -> str:
    """stdout of `git <args>` run safely in cwd. Raises GitUnavailable."""
    cmd = ["git", "--no-pager", *(x for kv in SAFE_CONFIG for x in ("-c", kv)), *args]
    try:
        done = subprocess.run(cmd, cwd=cwd, env=safe_env(), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise GitUnavailable("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise GitUnavailable(f"git did not answer within {TIMEOUT_S} s") from None
    except OSError as e:
        raise GitUnavailable(f"git could not run ({e.strerror or e})") from None
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitUnavailable(_first_fatal(err) or f"git exited with status {done.returncode}")
    return done.stdout.decode("utf-8", "surrogateescape")


def _first_fatal(lines: list[str]) -> str:
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line.split(":", 1)[1].strip()[:160]
    return lines[0][:160] if lines else ""


def work_tree_of(top: str) -> str | None:
    """The work tree enclosing top: the nearest directory at or above it holding `.git`, or None."""
    for d in (Path(top), *Path(top).parents):
        if os.path.lexists(d / ".git"):
            return str(d)
    return None


def list_files(top: str, work: str) -> list[str]:
    """Absolute paths of tracked plus untracked-not-ignored files under top (inside work tree work).

    Raises GitUnavailable when git refuses, fails or is missing.
    """
    toplevel = run(top, "rev-parse", "--show-toplevel").strip()
    if not toplevel or Path(toplevel).resolve() != Path(work):
        raise GitUnavailable(f"git reports the work tree at {toplevel or 'nowhere'}, not {work}")
    rel = os.path.relpath(top, work)
    out = run(work, "-c", f"core.excludesFile={global_excludes_file()}", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", rel)
    return [os.path.join(work, p) for p in dict.fromkeys(out.split("\0")) if p]


def global_excludes_file() -> str:
    """core.excludesFile from the user's global config, else git's default ($XDG_CONFIG_HOME/git/ignore).

    Passed explicitly so that a repository's own config cannot point git at a FIFO or a device.
    """
    try:
        return os.path.expanduser(run(os.path.expanduser("~"), "config", "--global", "--get",
                                      "core.excludesFile").strip())
    except GitUnavailable:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return os.path.join(base, "git", "ignore")


def exclude_lines(work: str) -> list[str]:
    """Lines of the default global excludes file, then of .git/info/exclude (git's precedence order)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    lines = read_ignore_file(os.path.join(base, "git", "ignore"))
    return lines + read_ignore_file(os.path.join(work, ".git", "info", "exclude"))


def read_ignore_file(path: str) -> list[str]:
    """Lines of an ignore file when it is a regular file (at most 1 MiB read), else []."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        if not _is_regular(f.fileno()):
            return []
        data = f.read(IGNORE_FILE_LIMIT)
    return data.decode("utf-8", "replace").splitlines()


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def is_git_dir(path: str) -> bool:
    """True for a git directory itself (a bare repository or a .git dir): HEAD, objects/ and refs/."""
    return (os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects"))
            and os.path.isdir(os.path.join(path, "refs")))
