"""--rope-yarn: the loaded model's rope becomes YaRN with the factor and the trained window, its logits
change, the app's window grows by the factor (and no further), the context cache key and the eval
report carry the factor, a model it cannot scale and a bad factor are one-line errors."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from agent import load, rope
from agent.cli import cli
from agent.config import RESERVE, AskConfig, SettingError, answer_room
from agent.ctxcache import ContextCache
from agent.evaluate.tasks import build_workspace
from tests.agent.fakes import fake_tokenizer
from tests.agent.test_cli_errors import assert_clean_error
from tests.agent.test_ctxcache_session import session
from tests.agent.test_eval_cli import ONE, Oracle
from tests.agent.test_eval_cli import run as run_eval
from tests.agent.test_eval_tasks import make_repo
from tests.ingest.fixtures import write_tree
from tests.tinymodels import tiny_model

WINDOW = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Llama with a window of WINDOW positions, random weights and the fake tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = fake_tokenizer(chat=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=WINDOW,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def repo(tmp_path):
    return write_tree(tmp_path / "repo", {"src/settings.py": "MAGIC_NUMBER = 7391046\n",
                                             "src/steps.py": "def step(x):\n    return x + 1\n" * 40})


def yarn_reference(model, factor: float):
    """The rotary module of the same architecture built by transformers from a YaRN config."""
    cfg = model.config.get_text_config().__class__.from_dict(model.config.to_dict())
    theta = cfg.rope_parameters["rope_theta"]
    cfg.rope_parameters = dict(rope_type="yarn", rope_theta=theta, factor=factor,
                               original_max_position_embeddings=model.config.max_position_embeddings)
    return type(model)(cfg).model.rotary_emb


@pytest.mark.parametrize("dtype", ["float32", None])  # full precision, and the CPU default's int8 weights
def test_loaded_rope_is_yarn_with_the_factor_and_the_trained_window(model_dir, cache_dir, dtype):
    plain, _, info = load.load_model(str(model_dir), dtype=dtype)
    reference = yarn_reference(plain, 4.0)
    model, _, info4 = load.load_model(str(model_dir), dtype=dtype, rope_yarn=4)
    params = model.config.rope_parameters
    assert (params["rope_type"], params["factor"], params["original_max_position_embeddings"]) == ("yarn", 4.0, WINDOW)
    assert info.max_position_embeddings == WINDOW and info4.max_position_embeddings == 4 * WINDOW
    rotary = model.model.rotary_emb
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert torch.allclose(rotary.inv_freq, reference.inv_freq)
    assert not torch.allclose(rotary.inv_freq, plain.model.rotary_emb.inv_freq)
    assert rope.trained_window(model) == WINDOW


def test_logits_differ_from_the_unscaled_model():
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(1))
    plain, scaled = tiny_model("qwen2", attn="sdpa"), tiny_model("qwen2", attn="sdpa")
    assert rope.stretch(scaled, 2.0) == 2 * 4096
    with torch.no_grad():
        a, b = plain(ids).logits, scaled(ids).logits
    assert (a - b).abs().max() > 1e-3


def test_a_stretched_model_computes_what_a_yarn_model_of_the_same_weights_computes():
    """The forward, not only the frequencies: attention_scaling (0.1 ln f + 1) reaches cos/sin."""
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(2))
    scaled = tiny_model("qwen2", attn="sdpa")
    window = scaled.config.max_position_embeddings
    rope.stretch(scaled, 4.0)
    cfg = scaled.config.__class__.from_dict(scaled.config.to_dict())
    cfg.max_position_embeddings = window
    cfg.rope_parameters = dict(scaled.config.rope_parameters)
    built = type(scaled)(cfg)
    built.load_state_dict(scaled.state_dict())
    assert built.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    with torch.no_grad():
        assert torch.allclose(scaled(ids).logits, built.eval()(ids).logits, atol=1e-5)


def test_models_it_cannot_scale_are_refused_not_scaled_twice():
    scaled = tiny_model("qwen2", attn="sdpa")
    rope.stretch(scaled, 4.0)
    with pytest.raises(SettingError, match="already scaled.*leave --rope-yarn at 1"):
        rope.stretch(scaled, 2.0)
    assert scaled.config.rope_parameters["factor"] == 4.0
    with pytest.raises(SettingError, match="per layer type"):
        rope.stretch(tiny_model("gemma3", attn="sdpa"), 2.0)


def ask(repo, model_dir, *args):
    return CliRunner().invoke(cli, [str(a) for a in (repo, "q?", "-m", model_dir, "--device", "cpu", "--json",
                                                     "--max-new-tokens", "2", "--no-cache", *args)])


def test_the_window_check_takes_factor_times_the_window_and_no_more(repo, model_dir, cache_dir):
    fits_scaled = 2 * WINDOW - RESERVE - answer_room(2 * WINDOW)
    assert_clean_error(ask(repo, model_dir, "--max-tokens", fits_scaled), 1, f"window of {WINDOW:,}")
    r = ask(repo, model_dir, "--max-tokens", fits_scaled, "--rope-yarn", 2)
    assert r.exit_code == 0, r.stderr
    notes = [n for n in json.loads(r.stdout)["stats"]["notes"] if n.startswith("rope:")]
    assert notes == [f"rope: YaRN factor 2 is on: the window is now {2 * WINDOW:,} tokens ({WINDOW:,} trained); "
                     "answers differ from the unscaled model's at any length"]
    assert r.stderr.count("YaRN factor 2 is on") == 1
    r = ask(repo, model_dir, "--max-tokens", fits_scaled + 1, "--rope-yarn", 2)
    assert_clean_error(r, 1, f"window of {2 * WINDOW:,}")


@pytest.mark.parametrize("value", ["0.5", "0", "nan", "inf", "-2", "65", "1e306"])
def test_bad_factors_are_one_line_errors(repo, value, monkeypatch):
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: pytest.fail("the model loaded"))
    for command in (["ask", repo, "q?"], ["eval", repo]):
        r = CliRunner().invoke(cli, [*map(str, command), "--rope-yarn", value])
        assert_clean_error(r, 2, "--rope-yarn must be a finite factor >= 1 and <= 64", "1 is off")


def test_a_factor_that_is_not_a_number_is_a_one_line_error(repo):
    r = CliRunner().invoke(cli, ["ask", str(repo), "q?", "--rope-yarn", "x"])
    assert_clean_error(r, 2, "--rope-yarn", "'x' is not a valid float")


def test_a_model_without_rope_is_a_one_line_error(repo, cache_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = fake_tokenizer(chat=True)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    r = ask(repo, path, "--rope-yarn", 2, "--dtype", "float32")
    assert_clean_error(r, 1, "no rotary position embedding", "leave --rope-yarn at 1")


def test_the_cache_key_holds_the_factor(repo, tmp_path):
    store = ContextCache(tmp_path / "ctx")
    session(repo, store).ask("What is MAGIC_NUMBER?")
    assert session(repo, store).stats["cache_hit"] is True
    scaled = session(repo, store, rope_yarn=4.0)
    assert scaled.stats["cache_hit"] is False
    scaled.ask("What is MAGIC_NUMBER?")
    assert session(repo, store, rope_yarn=4.0).stats["cache_hit"] is True
    assert len(store.entries()) == 2


def test_the_eval_report_says_which_factor_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    repo = make_repo(tmp_path / "repo")
    rt = Oracle(())
    rt.tasks = build_workspace(str(repo), rt.tokenizer, context_tokens=20000, n_tasks=9, seed=3).tasks
    seen = []
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: seen.append(cfg.rope_yarn) or rt)
    doc = json.loads(run_eval("eval", repo, "--json", *ONE, "--rope-yarn", "4").stdout)
    assert doc["meta"]["rope_yarn"] == 4.0 and seen == [4.0]
    assert "model fake-model with YaRN rope x4," in run_eval("eval", repo, *ONE, "--rope-yarn", "4").stdout
    assert json.loads(run_eval("eval", repo, "--json", *ONE).stdout)["meta"]["rope_yarn"] == 1.0


def test_ask_config_refuses_a_factor_below_one():
    with pytest.raises(SettingError, match="finite factor >= 1"):
        AskConfig(rope_yarn=0.99)
    assert AskConfig().rope_yarn == 1.0
