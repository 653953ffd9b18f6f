"""The real CLI, engine and attention on a tiny random Llama saved as a local model directory.

On CPU always; on CUDA too when one is present, where the answer's first ANSWER_ROUTING_TOKENS tokens
decode eagerly (their routing is recorded for citations) and the rest replay one captured CUDA graph.
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from agent.cli import cli
from agent.decoder import StaticDecoder
from agent.session import ANSWER_ROUTING_TOKENS
from tests.agent.fakes import fake_tokenizer
from tests.agent.repogen import planted_repo

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Llama (head dim 64, GQA 2) with random weights whose end-of-text logit is 0."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = fake_tokenizer(chat=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # the answer never ends early: 417 random logits, one of them 0
        model.lm_head.weight[tok.eos_token_id] = 0.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("device", DEVICES)
def test_ask_on_a_real_tiny_model(device, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    captures = []
    original = StaticDecoder._capture
    monkeypatch.setattr(StaticDecoder, "_capture", lambda self: captures.append(1) or original(self))
    repo = planted_repo(tmp_path / "repo", modules=2, funcs=4)
    new = ANSWER_ROUTING_TOKENS + 40
    args = [str(repo), "Where is MAGIC_NUMBER defined?", "--json", "-m", str(model_dir), "--device", device,
            "--attention", "moba", "--block-size", "32", "--top-k", "3", "--max-new-tokens", str(new), "--repeat-stop", "0"]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["stats"]["attention"] == "moba" and out["stats"]["cache_hit"] is False
    assert out["stats"]["stopped"] == "length"  # past the recorded tokens (a random model repeats itself early)
    assert out["citations"] and all(Path(c["path"]).is_file() for c in out["citations"])  # open from the cwd
    assert len(captures) == (1 if device == "cuda" else 0)
    second = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)
    assert second["stats"]["cache_hit"] is True and second["answer"] == out["answer"]
