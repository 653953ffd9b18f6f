"""The streamed GGUF conversion (agent/convert.py, through agent.pull.quantize): the same quantized cache as
quantizing transformers' fp32 model, without ever building that model; broken files and architectures it
does not stream."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent import pull, quant
from agent.catalog import ModelError
from tests.agent import conftest
from tests.agent.conftest import write_tiny_gguf

VARIANTS = {  # llama-arch: q/k are un-permuted from the GGUF's order
    "f32-tied": {},
    "q4_0-untied": {"hidden": 64, "ffn": 128, "qtype": gguf.GGMLQuantizationType.Q4_0, "output": True},
    "q4_1-tied": {"hidden": 64, "ffn": 128, "qtype": gguf.GGMLQuantizationType.Q4_1},
    "q8_0-untied": {"hidden": 64, "ffn": 128, "qtype": gguf.GGMLQuantizationType.Q8_0, "output": True},
}


def through_fp32_model(source: Path, dest: Path) -> Path:
    """The cache as transformers' whole fp32 model quantizes it (the path the streamed one replaces)."""
    dest.mkdir()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    del model.config.quantization_config
    quant.save(model, tok, dest)
    return dest


def tensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path / quant.WEIGHTS_FILE), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def refuse(*args, **kwargs):
    raise AssertionError("the fp32 model was built")


@pytest.fixture
def no_fp32_model(monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_cache_is_the_fp32_models_bit_for_bit(variant, tmp_path, monkeypatch):
    source = write_tiny_gguf(tmp_path / f"{variant}.gguf", **VARIANTS[variant])
    old = through_fp32_model(source, tmp_path / "old")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    new = pull.quantize(source, tmp_path / "new")
    monkeypatch.undo()
    (meta_old, old_t), (meta_new, new_t) = tensors(old), tensors(new)
    assert meta_new == meta_old == {"format": quant.FORMAT}
    assert sorted(new_t) == sorted(old_t)
    assert all(new_t[k].dtype == old_t[k].dtype and torch.equal(new_t[k], old_t[k]) for k in old_t)
    if variant.startswith("q4"):
        assert any(k.endswith(".qweight4") for k in new_t)
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((new / name).read_text()) == json.loads((old / name).read_text()), name
    assert (new / "tokenizer.json").read_bytes() == (old / "tokenizer.json").read_bytes()
    ids = torch.randint(0, 261, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (quant.load(d, torch.float32, "sdpa")(ids).logits for d in (old, new))
    assert torch.equal(a, b)


def truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def truncate_tensors(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 5000])


def not_a_gguf(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 not a model at all" * 10)


@pytest.mark.parametrize("damage", [truncate_header, truncate_tensors, not_a_gguf])
def test_broken_gguf_is_a_one_line_model_error_leaving_nothing(damage, tmp_path, no_fp32_model):
    (tmp_path / "src").mkdir()
    source = write_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    damage(source)
    with pytest.raises(ModelError) as err:
        pull.quantize(source, tmp_path / "out" / "q8")
    msg = str(err.value)
    assert "\n" not in msg and str(source) in msg and "check the file" in msg
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_gguf_missing_a_weight_is_refused_not_filled_at_random(tmp_path, monkeypatch, no_fp32_model):
    every = conftest._tiny_tensors
    monkeypatch.setattr(conftest, "_tiny_tensors", lambda *a: [t for t in every(*a) if t[0] != "blk.1.ffn_up.weight"])
    source = write_tiny_gguf(tmp_path / "cut.gguf")
    with pytest.raises(ModelError, match=r"no tensor for model\.layers\.1\.mlp\.up_proj\.weight") as err:
        pull.quantize(source, tmp_path / "q8")
    assert "\n" not in str(err.value) and not (tmp_path / "q8").exists()


def test_an_architecture_it_does_not_stream_goes_the_old_way_and_says_so(tmp_path, monkeypatch, capfd):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    old = through_fp32_model(source, tmp_path / "old")
    from agent import convert

    monkeypatch.setattr(convert, "_STREAMED_PROCESSORS", ())
    capfd.readouterr()
    new = pull.quantize(source, tmp_path / "new")
    notes = [line for line in capfd.readouterr().err.splitlines() if "cannot stream" in line]
    assert len(notes) == 1 and "LlamaTensorProcessor for 'llama'" in notes[0] and "whole fp32 model" in notes[0]
    assert all(torch.equal(a, b) for a, b in zip(tensors(old)[1].values(), tensors(new)[1].values()))


def test_int8_rows_a_slice_at_a_time_equal_the_whole_matrix_at_once(monkeypatch):
    monkeypatch.setattr(quant, "_ERROR_VALUES", 1000)  # the error is summed over many slices
    w = torch.randn(quant._ROWS + 300, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    got_q, got_scale = quant._int8_rows(w)
    assert torch.equal(got_q, qweight) and torch.equal(got_scale, scale)
    whole = ((qweight.double() * scale.double()[:, None] - w.double()).norm() / w.double().norm()).item()
    assert quant._int8_error(qweight, scale, w) == pytest.approx(whole, rel=1e-6)


def test_a_tensor_dequantized_a_slice_at_a_time_equals_it_whole(tmp_path, monkeypatch):
    from agent import convert

    monkeypatch.setattr(convert, "_ROWS", 100)
    source = write_tiny_gguf(tmp_path / "q.gguf", **VARIANTS["q4_1-tied"])
    for t in gguf.GGUFReader(source).tensors:
        whole = gguf.dequantize(t.data, t.tensor_type)
        assert np.array_equal(convert._dequantized(t), whole) and convert._dequantized(t).dtype == np.float32


def test_the_gguf_metadata_is_parsed_once_and_the_reader_put_back(tmp_path, monkeypatch, no_fp32_model):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    parse, opened = gguf.GGUFReader, []

    def counted(path, *args, **kwargs):
        opened.append(Path(path).name)
        return parse(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    pull.quantize(source, tmp_path / "q8")
    assert opened == ["tiny.gguf"]  # transformers' config, tokenizer and tensor-processor loaders read it too
    assert gguf.GGUFReader is counted
    from agent import convert

    with convert._parsed_once(source, "the reader"):
        assert gguf.GGUFReader(str(source)) == "the reader" and gguf.GGUFReader(other) != "the reader"
        with pytest.raises(ValueError):
            gguf.GGUFReader(tmp_path / "q8" / "config.json")  # another file is parsed as before
    assert gguf.GGUFReader is counted


def test_each_tensors_fp32_copy_is_gone_before_the_next_is_read(tmp_path, monkeypatch, no_fp32_model):
    import weakref

    from agent import convert

    source = write_tiny_gguf(tmp_path / "tiny.gguf", **VARIANTS["q4_0-untied"])
    read, alive_at_read = convert._dequantized, []
    earlier: list[weakref.ref] = []

    def tracked(tensor):
        alive_at_read.append(sum(ref() is not None for ref in earlier))
        values = read(tensor)
        earlier.append(weakref.ref(values))
        return values

    monkeypatch.setattr(convert, "_dequantized", tracked)
    pull.quantize(source, tmp_path / "q8")
    assert len(alive_at_read) > 10 and set(alive_at_read) == {0}
