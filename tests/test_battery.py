"""The hostile-input battery: each row is one input a demanding user could give the real CLI (pack, ask,
chat, summarize, eval, cache), with the outcome they expect: a clean one-line error (exit code, a message
naming the problem and the fix, no traceback) or a clean success. Every row also checks that nothing
planted as a secret reaches stdout or stderr, that the repository and the files outside it are left as
they were, and that the command ends within a deadline (a hang fails the row).

ask, chat and summarize run in-process on the fake runtime of tests/agent/fakes.py (real packing,
prompts, sessions, context cache and CLI; canned answers); pack runs with a tiny tokenizer file. The
rows that need other processes (two asks racing on one cache entry, kill -9 during a cache write) run
the CLI in subprocesses on the same fake runtime; the chat soak runs a tiny random GGUF through the real
runtime and is marked slow. Each row records its outcome (`record_property("outcome", ...)`), so a
`--junitxml` run gives the figures of bench/RESULTS.md.

The setups that plant the inputs live in tests/hostile.py. Knows nothing of the library's internals
beyond the context cache's on-disk layout, which the corruption rows damage on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.runtime import load_runtime as real_load_runtime
from tests.agent.conftest import write_tiny_gguf
from tests.agent.fakes import FakeRuntime
from tests.hostile import (
    World,
    bind_socket,
    edit_manifest,
    entry_linked_outside,
    fifo,
    files,
    flip_byte,
    hostile_git,
    link,
    relink,
    rss_mib,
    short_kv_valid_checksum,
    sparse,
    stray_temp,
    tmpfs,
    write_text,
)
from tests.ingest.fixtures import make_tokenizer, minimal_pdf, snapshot, write_tree
from tests.ingest.test_hostile import AKIA, AWS_SECRET, GH, PEM, deadline

DEADLINE_S = 30
ENV_SECRET = "sk_live_" + "51BatteryEnvSecretValue0000"
SECRETS = (AKIA, AWS_SECRET, GH, "MIIEowIBAAKCAQEA", ENV_SECRET, "hunter2-outside-root")
SETTINGS = '"""Settings."""\n\nRETRY = 5\nMAGIC_NUMBER = 7391046\n\n\ndef load():\n    return RETRY\n'
ANSWER = "MAGIC_NUMBER is 7391046 (src/settings.py:4)."


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    repo = write_tree(tmp_path / "repo", {"src/settings.py": SETTINGS, "README.md": "# Demo\n\nA demo service.\n"})
    outside = write_tree(tmp_path / "outside", {"secret.txt": "password = hunter2-outside-root\n"})
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    make_tokenizer().save(str(tok))
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(cache))
    monkeypatch.setenv("MOBA_ASK_MODEL", str(tok))
    monkeypatch.setenv("BATTERY_TOKEN", ENV_SECRET)
    rt = FakeRuntime(answers=[ANSWER] * 8, block_size=64, max_positions=100_000)
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    w = World(tmp_path, repo, outside, cache, tok, rt)
    yield w
    for mount in w.mounts:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: argv (with {repo} {tmp} {outside} {tok} filled in), the exit code, fragments of the
    error line (or, on success, of stdout + stderr), a setup that plants the hostile input, stdin, a
    check of what the command left behind, and fragments that must not appear in stdout + stderr."""

    id: str
    argv: tuple[str, ...]
    code: int
    words: tuple[str, ...] = ()
    setup: Callable[[World], None] | None = None
    input: str | None = None
    after: Callable[[World, object], None] | None = None
    absent: tuple[str, ...] = ()


def run_case(w: World, case: Case):
    fill = dict(repo=w.repo, tmp=w.tmp, outside=w.outside, tok=w.tokenizer)
    argv = [a.format(**fill) for a in case.argv]
    with deadline(DEADLINE_S):
        return CliRunner().invoke(cli, argv, input=case.input)


def outcome(r, case: Case, before: dict, w: World) -> str:
    """The row's outcome in the battery's terms; the first property that fails names it."""
    seen = r.stdout + r.stderr
    if isinstance(r.exception, TimeoutError):
        return "hang"
    if "Traceback" in seen or not (r.exception is None or isinstance(r.exception, SystemExit)):
        return "traceback"
    if any(s in seen for s in SECRETS):
        return "leak"
    if snapshot(w.repo) != before["repo"] or snapshot(w.outside) != before["outside"]:
        return "written"
    return "clean error" if r.exit_code else "clean success"


def check(r, case: Case) -> None:
    assert r.exit_code == case.code, (r.exit_code, r.stdout[-2000:], r.stderr[-2000:])
    if case.code:
        errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
        assert len(errors) == 1, r.stderr
        assert all(word in errors[0] for word in case.words), (errors[0], case.words)
    else:
        assert all(word in r.stdout + r.stderr for word in case.words), (case.words, r.stdout, r.stderr)
    assert not any(word in r.stdout + r.stderr for word in case.absent), case.absent


def battery_case(case: Case, w: World, record_property) -> None:
    """Plant, run, classify, record; then assert the row's expectations."""
    if case.setup:
        case.setup(w)
    before = {"repo": snapshot(w.repo), "outside": snapshot(w.outside)}
    r = run_case(w, case)
    got = outcome(r, case, before, w)
    record_property("outcome", got)
    assert got in ("clean error", "clean success"), (got, r.exception, r.stderr[-3000:])
    check(r, case)
    if case.after:
        case.after(w, r)


def packed(*names: str, present: bool = True) -> Callable[[World, object], None]:
    def after(w: World, r) -> None:
        paths = {f["path"] for f in json.loads(r.stdout)["files"]}
        for name in names:
            assert (name in paths) == present, (name, paths)
    return after


def nothing_written(rel: str) -> Callable[[World, object], None]:
    return lambda w, r: not (w.tmp / rel).exists() or pytest.fail(f"{rel} was written")


PACK = ("pack", "{repo}", "--json", "--no-cache")
ASK = ("ask", "{repo}", "What is MAGIC_NUMBER?", "--json", "--no-cache")
NB = json.dumps({"cells": [{"cell_type": "code", "source": [f"key = '{AKIA}'\n"], "metadata": {},
                            "outputs": [{"output_type": "stream", "name": "stdout", "text": [GH]}]}],
                 "metadata": {}, "nbformat": 4, "nbformat_minor": 5})

PATH_CASES = [
    Case("missing-path-pack", ("pack", "{tmp}/nope"), 1, ("path not found", "check the spelling")),
    Case("broken-link-as-path", ("pack", "{repo}/dangling"), 1, ("broken symlink",), link("dangling", "{repo}/gone")),
    Case("missing-path-chat", ("chat", "{tmp}/nope"), 1, ("path not found",)),
    Case("missing-path-summarize", ("summarize", "{tmp}/nope"), 1, ("path not found",)),
    Case("file-as-path", ("pack", "{repo}/src/settings.py", "--json", "--no-cache"), 0, ("settings.py",)),
    Case("eval-on-a-file", ("eval", "{repo}/README.md"), 2, ("REPO must be a directory",)),
    Case("empty-dir", ("pack", "{tmp}/empty", "--no-cache"), 1, (), lambda w: (w.tmp / "empty").mkdir()),
    Case("symlink-loop-files", PACK, 0, (), link("a", "{repo}/b"), after=packed("a", present=False)),
    Case("symlink-dir-loop", PACK, 0, (), link("src/up", "{repo}"), after=packed("src/up/README.md", present=False)),
    Case("link-outside-root", PACK, 0, (), link("leak.txt", "{outside}/secret.txt"), after=packed("leak.txt", present=False)),
    Case("dir-link-outside-root", PACK, 0, (), link("ext", "{outside}")),
    Case("link-to-etc-shadow", PACK, 0, (), link("shadow", "/etc/shadow"), after=packed("shadow", present=False)),
    Case("fifo-in-tree", PACK, 0, (), fifo("pipe.py"), after=packed("pipe.py", present=False)),
    Case("fifo-as-path", ("pack", "{repo}/pipe", "--no-cache"), 1, (), fifo("pipe")),
    Case("fifo-in-tree-ask", ASK, 0, ("7391046",), fifo("pipe.txt")),
    Case("socket-in-tree", PACK, 0, (), bind_socket, after=packed("agent.sock", present=False)),
    Case("dev-zero-as-path", ("pack", "/dev/zero", "--no-cache"), 1),
    Case("dev-urandom-link", PACK, 0, (), link("rand.bin", "/dev/urandom")),
    Case("proc-environ-as-path", ("pack", "/proc/self/environ", "--no-cache"), 1),
    Case("proc-environ-ask", ("ask", "/proc/self/environ", "env?", "--no-cache"), 1),
    Case("proc-kmsg-as-path", ("pack", "/proc/kmsg", "--no-cache"), 1),
    Case("proc-dir-as-path", ("pack", "/proc/self/fd", "--no-cache"), 1),
    Case("huge-sparse-file", PACK, 0, (), sparse("big.log", 3 << 30), after=packed("big.log", present=False)),
    Case("huge-file-raised-cap", ("pack", "{repo}", "--max-file-bytes", str(64 << 20), "--json", "--no-cache"), 0,
         (), sparse("big.txt", 3 << 30), after=packed("big.txt", present=False)),
    Case("binary-file", PACK, 0, (), files(**{"blob.dat": os.urandom(4096)}), after=packed("blob.dat", present=False)),
    Case("nul-in-source", PACK, 0, (), files(**{"x.py": b"a = 1\x00\x00\nb = 2\n"})),
    Case("latin1-file", PACK, 0, (), files(**{"old.py": "caf\xe9 = 1\n".encode("latin-1")})),
    Case("utf16-file", PACK, 0, (), files(**{"w.txt": "hello world\n".encode("utf-16")})),
    Case("one-huge-line", PACK, 0, (), files(**{"min.js": "x=1;" * 200_000})),
    Case("deep-nesting", PACK, 0, (), files(**{"/".join(["d"] * 120) + "/deep.py": "DEEP = 1\n"})),
    Case("name-with-newline", PACK, 0, (), files(**{"a\n<file path=\"x\">.py": "x = 1\n"}),
         absent=('\n<file path="x">',)),
    Case("name-with-esc", ("pack", "{repo}", "--no-cache"), 0, (), files(**{"bad\x1b[2J\x1b]0;pwn\x07.py": "x = 1\n"}),
         absent=("\x1b", "\x07")),
    Case("name-with-rtl-override", ("pack", "{repo}", "--no-cache"), 0, (), files(**{"evil\u202etxt.py": "x = 1\n"}),
         absent=("\u202e",)),
    Case("name-invalid-utf8", PACK, 0, (), lambda w: (w.repo / os.fsdecode(b"bad\xff\xfe.py")).write_text("x = 1\n")),
    Case("secret-in-name", PACK, 0, (), files(**{f"{GH}.txt": "nothing\n"})),
    Case("secret-in-source", PACK, 0, ("redacted",), files(**{"aws.py": f"KEY = '{AKIA}'\nSECRET = '{AWS_SECRET}'\n"})),
    Case("pem-in-text", ("pack", "{repo}", "--no-cache"), 0, (), files(**{"notes.txt": PEM + "\n"})),
    Case("secret-in-pdf", PACK, 0, (), files(**{"doc.pdf": minimal_pdf([["token", AKIA]])})),
    Case("secret-in-notebook", ("pack", "{repo}", "--notebook-outputs", "--no-cache"), 0, (), files(**{"n.ipynb": NB})),
    Case("corrupt-pdf", PACK, 0, (), files(**{"bad.pdf": b"%PDF-1.4\n1 0 obj << /Length 99999 >> stream\n\xff\xfe"})),
    Case("invalid-notebook", PACK, 0, (), files(**{"bad.ipynb": "{not json"})),
    Case("dotenv-named", ("pack", "{repo}/.env", "--no-cache"), 1, (".env",), files(**{".env": f"TOKEN={GH}\n"})),
    Case("aws-credentials-named", ("pack", "{repo}/home/.aws/credentials", "--no-cache"), 1, (),
         files(**{"home__.aws__credentials": f"aws_secret_access_key={AWS_SECRET}\n"})),
    Case("secret-in-ask-json", ASK, 0, ("7391046",), files(**{"k.py": f"K = '{GH}'\n"})),
    Case("git-fsmonitor", PACK, 0, (), hostile_git, after=nothing_written("pwned")),
    Case("bare-repo", ("pack", "{tmp}/bare.git", "--no-cache"), 1, (),
         lambda w: subprocess.run(["git", "init", "-q", "--bare", str(w.tmp / "bare.git")], check=True)),
]

NUMERIC = [  # flag, value, exit code of ask with it[, the text of its error when not the flag's name]
    ("--block-size", "0", 2), ("--block-size", "-1", 2), ("--block-size", "1000000000", 0),
    ("--top-k", "0", 2), ("--top-k", "-5", 2), ("--top-k", "100000", 0),
    ("--sink-blocks", "-1", 2), ("--sink-blocks", "1000000", 0),
    ("--local-blocks", "-1", 2), ("--local-blocks", "1000000", 2, "local blocks must be >= 0 and below top-k"),
    ("--gate-subblocks", "0", 2), ("--gate-subblocks", "1000000", 2, "gate sub-blocks must be >= 1 and divide"),
    ("--max-tokens", "-1", 2), ("--max-tokens", "1", 1), ("--max-tokens", "1000000000", 1),
    ("--max-new-tokens", "0", 2), ("--max-new-tokens", "-3", 2), ("--max-new-tokens", "1000000000", 0),
    ("--temperature", "-1", 2), ("--temperature", "1e308", 0), ("--temperature", "nan", 2), ("--temperature", "inf", 2),
    ("--top-p", "0", 2), ("--top-p", "1.5", 2), ("--chunk-size", "0", 2), ("--chunk-size", "1000000000", 0),
    ("--rope-yarn", "0.5", 2), ("--rope-yarn", "nan", 2), ("--rope-yarn", "1e306", 2), ("--rope-yarn", "2", 0),
]
NUMERIC_CASES = [
    Case(f"ask{flag}={value}", (*ASK, "--attention", "moba", flag, value), code, (*text,) or (flag,) if code == 2 else ())
    for flag, value, code, *text in NUMERIC
] + [
    Case(f"{cmd}{flag}={value}", (cmd, "{repo}", "--no-cache", flag, value), code, (flag,) if code == 2 else (),
         input="What is MAGIC_NUMBER?\n/exit\n" if cmd == "chat" else None)
    for cmd in ("chat", "summarize")
    for flag, value, code in [("--block-size", "0", 2), ("--top-k", "1000000000", 0), ("--max-new-tokens", "0", 2)]
] + [
    Case("pack--max-tokens=-1", ("pack", "{repo}", "--max-tokens", "-1"), 2, ("--max-tokens",)),
    Case("pack--max-tokens=1", ("pack", "{repo}", "--max-tokens", "1", "--no-cache"), 1, ("--max-tokens 1", "raise it")),
    Case("pack--max-tokens=1e12", ("pack", "{repo}", "--max-tokens", str(10**12), "--no-cache"), 0),
    Case("pack--max-file-bytes=0", ("pack", "{repo}", "--max-file-bytes", "0"), 2, ("--max-file-bytes",)),
    Case("pack--max-file-bytes=huge", ("pack", "{repo}", "--max-file-bytes", str(10**12)), 2, ("--max-file-bytes",)),
    Case("eval--tasks=0", ("eval", "{repo}", "--tasks", "0"), 2, ("--tasks",)),
    Case("eval--tasks=-1", ("eval", "{repo}", "--tasks", "-1"), 2, ("--tasks",)),
    Case("eval--context-tokens=0", ("eval", "{repo}", "--context-tokens", "0"), 2, ("--context-tokens",)),
    Case("eval--context-tokens=-5", ("eval", "{repo}", "--context-tokens", "-5"), 2, ("--context-tokens",)),
    Case("eval--context-tokens=abc", ("eval", "{repo}", "--context-tokens", "abc"), 2, ("--context-tokens",)),
    Case("eval--context-tokens=1e12", ("eval", "{repo}", "--context-tokens", str(10**12)), 2, ("--context-tokens", "use at most")),
    Case("eval--max-new-tokens=0", ("eval", "{repo}", "--max-new-tokens", "0"), 2, ("--max-new-tokens",)),
    Case("eval--block-size=-1", ("eval", "{repo}", "--block-size", "-1"), 2, ("--block-size",)),
    Case("eval--top-k=0", ("eval", "{repo}", "--top-k", "0"), 2, ("--top-k",)),
]


@pytest.mark.parametrize("case", PATH_CASES + NUMERIC_CASES, ids=lambda c: c.id)
def test_hostile_input(world, record_property, case):
    battery_case(case, world, record_property)


ASK_CACHED = ("ask", "{repo}", "What is MAGIC_NUMBER?", "--json")


def cached(damage: Callable[[Path, World], None]) -> Callable[[World], None]:
    """Fill the context cache with one real entry (one ask), then damage that entry."""
    def make(w: World) -> None:
        r = CliRunner().invoke(cli, [a.format(repo=w.repo) for a in ASK_CACHED])
        assert r.exit_code == 0 and len(w.entries()) == 1, r.stderr
        damage(w.entries()[0], w)
    return make


def prefilled_again(w: World, r) -> None:
    """No stale KV served: the context was prefilled in full, and the entry saved again is whole."""
    stats = json.loads(r.stdout)["stats"]
    assert stats["cache_hit"] is False and w.rt.engines[-1].prefills[0] == stats["context_tokens"]
    again = CliRunner().invoke(cli, [a.format(repo=w.repo) for a in ASK_CACHED])
    assert json.loads(again.stdout)["stats"]["cache_hit"] is True, again.stderr
    assert w.rt.engines[-1].ids[: stats["context_tokens"]] == w.rt.engines[-2].ids[: stats["context_tokens"]]


def no_temp_left(w: World, r) -> None:
    root = w.cache / "contexts"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")] if root.is_dir() else True


CACHE_CASES = [
    Case("cache-flipped-byte", ASK_CACHED, 0, ("7391046", "warning"), cached(flip_byte), after=prefilled_again),
    Case("cache-truncated-kv", ASK_CACHED, 0, ("7391046",),
         cached(lambda e, w: os.truncate(e / "kv.safetensors", 40)), after=prefilled_again),
    Case("cache-empty-kv", ASK_CACHED, 0, ("7391046",), cached(write_text("kv.safetensors", "")), after=prefilled_again),
    Case("cache-kv-deleted", ASK_CACHED, 0, ("7391046",), cached(lambda e, w: (e / "kv.safetensors").unlink()),
         after=prefilled_again),
    Case("cache-manifest-not-json", ASK_CACHED, 0, ("7391046",), cached(write_text("manifest.json", "{oops")),
         after=prefilled_again),
    Case("cache-manifest-truncated", ASK_CACHED, 0, ("7391046",),
         cached(lambda e, w: os.truncate(e / "manifest.json", 30)), after=prefilled_again),
    Case("cache-manifest-wrong-key", ASK_CACHED, 0, ("7391046",), cached(edit_manifest(key="0" * 64)),
         after=prefilled_again),
    Case("cache-manifest-wrong-size", ASK_CACHED, 0, ("7391046",), cached(edit_manifest(size=1)), after=prefilled_again),
    Case("cache-short-tokens-meta", ASK_CACHED, 0, ("7391046",), cached(edit_manifest(tokens=3)), after=prefilled_again),
    Case("cache-short-kv-valid-checksum", ASK_CACHED, 0, ("7391046",), cached(short_kv_valid_checksum),
         after=prefilled_again),
    Case("cache-manifest-links-outside", ASK_CACHED, 0, ("7391046",), cached(relink("manifest.json")),
         after=prefilled_again),
    Case("cache-kv-links-outside", ASK_CACHED, 0, ("7391046",), cached(relink("kv.safetensors")),
         after=prefilled_again),
    Case("cache-entry-links-outside", ASK_CACHED, 0, ("7391046",), cached(entry_linked_outside)),
    Case("cache-dead-writer-temp", ASK_CACHED, 0, ("7391046",), cached(stray_temp), after=no_temp_left),
    Case("cache-dir-is-a-file", ASK_CACHED, 0, ("7391046",),
         lambda w: w.cache.parent.joinpath("cache").write_text("not a dir")),
]


@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: c.id)
def test_hostile_cache(world, record_property, case):
    battery_case(case, world, record_property)


def clear_during_answer(w: World) -> None:
    """At the answer's second token another process runs `moba-ask cache clear -y`."""
    def clear(n: int) -> None:
        if n == 2:
            subprocess.run([sys.executable, "-c", "from agent.cli import main; main()", "cache", "clear", "-y"],
                           check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    w.rt.on_token_hook = clear


FS_CASES = [
    Case("cache-read-only-fs", ASK_CACHED, 0, ("7391046", "warning"), tmpfs("ro,size=256k")),
    Case("cache-full-fs", ASK_CACHED, 0, ("7391046", "warning"), tmpfs("size=256k", fill=True), after=no_temp_left),
    Case("cache-clear-during-miss", ASK_CACHED, 0, ("7391046",), clear_during_answer, after=prefilled_again),
    Case("cache-clear-during-hit", ASK_CACHED, 0, ("7391046",),
         lambda w: (cached(lambda e, w: None)(w), clear_during_answer(w))),
]


@pytest.mark.parametrize("case", FS_CASES, ids=lambda c: c.id)
def test_hostile_cache_filesystem(world, record_property, case):
    battery_case(case, world, record_property)


def fake_cli(w: World, *args: str, **env: str) -> subprocess.Popen:
    """The CLI on the fake runtime in its own process (tests/agent/fakecli.py)."""
    argv = [a.format(repo=w.repo) for a in args]
    return subprocess.Popen([sys.executable, "-m", "tests.agent.fakecli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd(), **env})


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE_S * 4)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("hang: the CLI process did not finish")
    return proc.returncode, out, err


def wait_for(marker: Path, proc: subprocess.Popen) -> None:
    start = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() - start < DEADLINE_S * 4, proc.stderr.read()
        time.sleep(0.1)


def test_two_asks_racing_on_one_cache_entry(world, record_property):
    """A second process asks while the first is inside its cache write; both install a whole entry."""
    marker = world.tmp / "written"
    proc = fake_cli(world, *ASK_CACHED, FAKECLI_STALL_SAVE="3", FAKECLI_MARKER=str(marker))
    wait_for(marker, proc)
    battery_case(Case("race-second-ask", ASK_CACHED, 0, ("7391046",)), world, record_property)
    code, out, err = finished(proc)
    assert code == 0 and "7391046" in out and "Traceback" not in out + err, err
    assert len(world.entries()) == 1
    hit = CliRunner().invoke(cli, [a.format(repo=world.repo) for a in ASK_CACHED])
    assert json.loads(hit.stdout)["stats"]["cache_hit"] is True and "warning" not in hit.stderr
    no_temp_left(world, hit)


def test_kill_9_during_a_cache_write(world, record_property):
    marker = world.tmp / "written"
    proc = fake_cli(world, *ASK_CACHED, FAKECLI_STALL_SAVE="600", FAKECLI_MARKER=str(marker))
    try:
        wait_for(marker, proc)
    finally:
        proc.kill()
        proc.communicate()
    battery_case(Case("kill-9-during-write", ASK_CACHED, 0, ("7391046",), after=prefilled_again), world,
                 record_property)
    no_temp_left(world, None)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama GGUFs: a 4096-position one, another seed of it, and a 512-position one."""
    d = tmp_path_factory.mktemp("ggufs")
    return {"tiny": write_tiny_gguf(d / "tiny.gguf", context=4096),
            "other": write_tiny_gguf(d / "other.gguf", context=4096, seed=1),
            "short": write_tiny_gguf(d / "short.gguf")}


@pytest.fixture
def real_world(world, ggufs, monkeypatch) -> World:
    """The world on the real runtime with the tiny GGUF (random weights: answers are noise)."""
    monkeypatch.setattr("agent.runtime.load_runtime", real_load_runtime)
    model = world.tmp / "model.gguf"
    model.write_bytes(ggufs["tiny"].read_bytes())
    monkeypatch.setenv("MOBA_ASK_MODEL", str(model))
    world.ggufs = ggufs
    return world


def replace_weights(w: World) -> None:
    """Ask once (filling the cache), then put other weights at the same model path."""
    r = CliRunner().invoke(cli, [a.format(repo=w.repo) for a in (*ASK_CACHED, "--max-new-tokens", "4")])
    assert r.exit_code == 0 and len(w.entries()) == 1, r.stderr
    (w.tmp / "model.gguf").write_bytes(w.ggufs["other"].read_bytes())


def not_a_hit(w: World, r) -> None:
    assert json.loads(r.stdout)["stats"]["cache_hit"] is False


REAL = ("ask", "{repo}", "What is MAGIC_NUMBER?", "--max-new-tokens", "4")
REAL_CASES = [
    Case("real-temperature-1e-320", (*REAL, "--temperature", "1e-320", "--no-cache"), 0),
    Case("real-temperature-1e308", (*REAL, "--temperature", "1e308", "--no-cache"), 0),
    Case("real-top-k-100000", (*REAL, "--attention", "moba", "--block-size", "16", "--top-k", "100000", "--no-cache"), 0),
    Case("real-block-size-1e9", (*REAL, "--attention", "moba", "--block-size", "1000000000", "--no-cache"), 0),
    Case("real-max-new-tokens-1e9", ("ask", "{repo}", "q?", "--max-new-tokens", "1000000000", "--no-cache"), 0),
    Case("real-window-below-prompt", (*REAL, "-m", "{tmp}/short.gguf", "--no-cache"), 1, ("window", "longer window"),
         lambda w: (w.tmp / "short.gguf").write_bytes(w.ggufs["short"].read_bytes()), absent=("use --max-tokens",)),
    Case("real-truncated-gguf", (*REAL, "-m", "{tmp}/cut.gguf"), 1, ("cut.gguf",),
         lambda w: (w.tmp / "cut.gguf").write_bytes(w.ggufs["tiny"].read_bytes()[:5000])),
    Case("real-gguf-is-dev-zero", (*REAL, "-m", "/dev/zero"), 1, ("/dev/zero",)),
    Case("real-new-weights-same-path", (*ASK_CACHED[:-1], "--json", "--max-new-tokens", "4"), 0, (), replace_weights,
         after=not_a_hit),
]


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: c.id)
def test_hostile_input_real_model(real_world, record_property, case):
    battery_case(case, real_world, record_property)


@pytest.mark.slow
def test_chat_soak_100_questions_memory(real_world, record_property):
    """100 questions in one chat on the tiny GGUF (/reset every 25, as the 4,096 chat tokens fill): every
    turn answers within the deadline, RSS is sampled after the prefill and after 10 and 100 questions,
    and the last 90 questions add less than 64 MiB."""
    import queue
    import threading

    argv = [sys.executable, "-c", "from agent.cli import main; main()", "chat", str(real_world.repo),
            "--max-new-tokens", "8", "--no-cache"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"})
    lines, errors = queue.Queue(), []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()

    def turn(text: str) -> None:
        proc.stdin.write(f"{text}\n/tokens\n")
        proc.stdin.flush()
        while "  history " not in lines.get(timeout=DEADLINE_S * 2):
            pass

    rss = {}
    try:
        turn("/help")
        rss["start"] = rss_mib(proc.pid)
        for i in range(1, 101):
            turn(f"What does load() return, question {i}?")
            if i in (10, 100):
                rss[f"after {i}"] = rss_mib(proc.pid)
            if i % 25 == 0:
                turn("/reset")
        proc.stdin.write("/exit\n")
        proc.stdin.close()
        code = proc.wait(timeout=DEADLINE_S)
    except queue.Empty:
        record_property("outcome", "hang")
        raise
    finally:
        proc.kill()
    for name, value in rss.items():
        record_property(f"rss_mib {name}", round(value, 1))
    seen = "".join(errors)
    got = "traceback" if code or "Traceback" in seen else "clean success"
    record_property("outcome", got)
    assert got == "clean success", seen[-3000:]
    assert "does not fit" not in seen
    assert rss["after 100"] - rss["after 10"] < 64, rss
