"""4-bit weights (agent/int4.py) and how agent.quant chooses them: torch's packed layout read back, the grid
of a 4-bit GGUF tensor recovered exactly, the rule (4 bits only where lossless against int8), a model whose
weights are 4-bit representable running the 4-bit kernel at decode with logits within tolerance, tied
heads, old int8-only caches and a layout this torch does not use."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from agent import int4, load, quant
from agent.config import AskConfig
from agent.engine import Engine, Sampling
from agent.runtime import runtime_notes
from tests.agent.test_quant import LOGIT_REL_RMS, CountOps, rel_rms, saved


def on_grid(n: int, k: int, levels: int = 16, seed: int = 0) -> torch.Tensor:
    """A weight [n, k] whose groups of 32 lie on grids of ``levels`` steps (a Q4_K/Q4_1 tensor, dequantized),
    most groups using only part of the 16 levels."""
    g = torch.Generator().manual_seed(seed)
    lo_q = torch.randint(0, 4, (n, k // 32, 1), generator=g)
    q = (lo_q + torch.randint(0, levels - 4, (n, k // 32, 32), generator=g)).float()
    step = torch.rand(n, k // 32, 1, generator=g) * 0.01 + 0.001
    low = -torch.rand(n, k // 32, 1, generator=g) * 0.05
    return (q * step + low).view(n, k)


def grid_model(tied: bool = True):
    """A small Qwen2 whose every matrix is 4-bit representable and 4-bit shaped (rows a multiple of 64)."""
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 2:
                p.copy_(on_grid(*p.shape, seed=i) * (10 if "embed" in name else 1))
    return model


@pytest.mark.parametrize("shape", [(64, 32), (128, 64), (256, 1536), (8960, 64)])
def test_unpack_reads_torchs_packed_layout(shape):
    q = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert int4.layout_is_known() and torch.equal(int4.unpack(packed, *shape), q.to(torch.uint8))


def test_the_grid_of_a_4bit_tensor_is_recovered_exactly():
    w = on_grid(128, 256)
    packed, sz, err = int4.quantize(w, torch.float32)
    assert err < 1e-6 and torch.allclose(int4.dequantize(packed, sz, torch.float32), w, atol=1e-6)
    _, _, err_bf16 = int4.quantize(w, torch.bfloat16)  # scales and zeros rounded as stored
    assert err_bf16 < 0.01
    ids = torch.tensor([[0, 31, 32, 63, 64, 127]])
    assert torch.allclose(int4.rows(packed, sz, ids)[0], w[ids[0]], atol=1e-6)


def test_4_bits_only_where_they_lose_nothing_against_int8():
    assert set(quant._matrix(on_grid(128, 256))) == {"qweight4", "scales_zeros"}
    six_bit = on_grid(128, 256, levels=64)  # a Q6_K tensor: 64 levels per group
    assert set(quant._matrix(six_bit)) == {"qweight", "scale"}
    assert set(quant._matrix(torch.randn(128, 256))) == {"qweight", "scale"}
    assert set(quant._matrix(on_grid(96, 256))) == {"qweight", "scale"}  # rows not a multiple of 64


@pytest.mark.parametrize("tied", [True, False])
def test_a_4bit_model_runs_the_4bit_kernel_at_decode_within_tolerance(tied, tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    full = grid_model(tied)
    q = saved(full, AutoTokenizer.from_pretrained(tokenizer_path), tmp_path / "q", dtype=torch.bfloat16, attn="sdpa")
    fours = [m for m in q.modules() if isinstance(m, (int4.Int4Linear, int4.Int4Embedding))]
    linears = sum(isinstance(m, int4.Int4Linear) for m in q.modules())
    assert isinstance(q.get_input_embeddings(), int4.Int4Embedding) and len(fours) == linears + 1
    assert not any(isinstance(m, (quant.QuantLinear, quant.QuantEmbedding, torch.nn.Linear)) for m in q.modules())
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_rms(q(ids).logits, full(ids).logits) < LOGIT_REL_RMS
    engine = Engine(q, capacity=200, chunk_size=64)
    with CountOps() as prefill:
        logits = engine.prefill(ids[0].tolist())
    with CountOps() as decode:
        engine.generate(logits, Sampling(max_new_tokens=2))
    # prefill: 64 and 36 rows through the dense GEMM; the head runs the kernel on the last row of each chunk
    assert prefill.counts["_weight_int4pack_mm_for_cpu"] == 2 and prefill.counts["mm"] == 2 * (linears - 1)
    assert decode.counts["_weight_int4pack_mm_for_cpu"] == 2 * linears and "mm" not in decode.counts
    assert "_weight_int8pack_mm" not in decode.counts


def test_an_int8_only_cache_from_format_1_loads_and_the_note_says_how_to_shrink_it(tokenizer_path, tmp_path,
                                                                                    monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(int4, "supports", lambda *shape: False)  # what format 1 wrote: every matrix int8
    dest = tmp_path / "q"
    saved(grid_model(), AutoTokenizer.from_pretrained(tokenizer_path), dest)
    weights = dest / quant.WEIGHTS_FILE
    save_file(load_file(str(weights)), str(weights), metadata={"format": quant.INT8_FORMAT})
    monkeypatch.undo()
    model = quant.load(dest, torch.bfloat16, "sdpa")
    assert not any(isinstance(m, int4.Int4Linear) for m in model.modules())
    info = type("Info", (), {"quantized": True, "dtype": torch.bfloat16, "path": dest})()
    (note,) = [n for n in runtime_notes(AskConfig(device="cpu"), model, info, "cpu") if n.startswith("weights:")]
    assert note.startswith("weights: int8 per channel (an int8-only cache") and f"delete {dest}" in note


def test_a_4bit_cache_this_torch_cannot_read_is_a_one_line_error(tokenizer_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    dest = tmp_path / "q"
    saved(grid_model(), AutoTokenizer.from_pretrained(tokenizer_path), dest)
    monkeypatch.setattr(int4, "layout_is_known", lambda: False)
    with pytest.raises(quant.QuantCacheError) as err:
        quant.load(dest, torch.bfloat16, "sdpa")
    assert "\n" not in str(err.value) and "packed as another torch build" in str(err.value)
    assert "delete that directory" in str(err.value)


@pytest.fixture(scope="module")
def tokenizer_path(tiny_gguf, tmp_path_factory):
    """A directory with the tiny GGUF's tokenizer (any tokenizer will do: the tests feed token ids)."""
    from transformers import AutoTokenizer

    dest = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).save_pretrained(dest)
    return dest


def test_load_model_default_on_a_4bit_directory_says_4bit(tokenizer_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    dest = tmp_path / "q"
    saved(grid_model(), AutoTokenizer.from_pretrained(tokenizer_path), dest)
    model, _, info = load.load_model(str(dest))
    (note,) = [n for n in runtime_notes(AskConfig(device="cpu"), model, info, "cpu") if n.startswith("weights:")]
    assert note.startswith("weights: 4-bit (groups of 32)") and "int8-only" not in note


def reference_fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid fit as first written, one full-size temporary per step: what int4._fit must equal, bit for bit."""
    n, k = w.shape
    g = w.view(n, k // 32, 32)
    low, span = g.amin(-1), g.amax(-1) - g.amin(-1)
    gaps = g.sort(-1).values.diff(dim=-1)
    gaps = torch.where(gaps > span[..., None] * 1e-3, gaps, torch.inf)
    step = torch.where(torch.isfinite(gaps.amin(-1)), gaps.amin(-1), span)
    levels = (g - low[..., None]) / step.clamp(min=1e-30)[..., None]
    on_grid = ((levels - levels.round()).abs().amax(-1) < 1e-2) & (levels.amax(-1) < 15.5)
    step = torch.where(on_grid, step, span / 15).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / step[..., None]).clamp(0, 15)
    return q.view(n, k).to(torch.int32), step, low


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (-0.0 and 0.0 differ)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a)
    return a.dtype == b.dtype and torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32),
                                                                                    b[~nan].view(torch.int32))


def fit_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    infinite = torch.randn(64, 64, generator=g)
    infinite[0, 3], infinite[1, 5], infinite[2, :32] = torch.inf, -torch.inf, torch.inf
    holes = torch.randn(64, 64, generator=g)
    holes[3, 7] = torch.nan
    return {
        "gaussian": torch.randn(256, 512, generator=g),
        "on grid": on_grid(256, 512, seed=3),
        "on grid, 64 levels": on_grid(256, 512, levels=64, seed=4),
        "constant": torch.full((64, 64), 0.3),
        "zeros and signed zeros": torch.where(torch.rand(64, 64, generator=g) > 0.5, 0.0, -0.0),
        "two levels": torch.where(torch.rand(64, 64, generator=g) > 0.5, 1.0, -2.5),
        "17 levels": torch.randint(0, 17, (64, 64), generator=g).float() * 0.01,  # one level too many
        "a gap at the threshold": torch.tensor([0.0, 1e-3, 1.0] + [0.5] * 29).repeat(64, 2),
        "gaps below the threshold": 1 + torch.randint(0, 3, (64, 64), generator=g) * 1e-7,
        "huge": torch.randn(64, 64, generator=g) * 1e37,
        "subnormal": torch.randn(64, 64, generator=g) * 1e-40,
        "mixed magnitudes": torch.cat([torch.randn(64, 32, generator=g) * 1e30, torch.randn(64, 32, generator=g) * 1e-30], 1),
        "infinities": infinite,
        "a NaN": holes,
    }


@pytest.mark.parametrize("case", list(fit_cases()))
def test_the_grid_fit_equals_the_reference_bit_for_bit(case):
    w = fit_cases()[case]
    assert all(same_bits(a, b) for a, b in zip(int4._fit(w.clone()), reference_fit(w)))


def test_quantizing_a_slice_of_rows_at_a_time_equals_the_whole_matrix_fitted_at_once(monkeypatch):
    w = torch.cat([on_grid(320, 256, seed=5), torch.randn(192, 256, generator=torch.Generator().manual_seed(5))])
    q, step, low = reference_fit(w)
    monkeypatch.setattr(int4, "_FIT_VALUES", 3000)  # slices of 64 rows
    assert int4.fit_rows(256) == int4.BLOCK_N
    packed, sz, err = int4.quantize(w, torch.bfloat16)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(sz, torch.stack((step, low + 8 * step), -1).transpose(0, 1).to(torch.bfloat16))
    whole = (int4.dequantize(packed, sz, torch.float32).double() - w.double()).norm() / w.double().norm()
    assert err == pytest.approx(whole.item(), rel=1e-5)


def test_4_bits_are_given_up_as_soon_as_they_certainly_lose_against_int8(monkeypatch):
    fitted, fit = [], int4._fit
    monkeypatch.setattr(int4, "_fit", lambda rows: fitted.append(len(rows)) or fit(rows))
    monkeypatch.setattr(int4, "_FIT_VALUES", 64 * 256)  # slices of 64 rows
    six_bit = on_grid(640, 256, levels=64)  # a Q6_K tensor: int8 wins
    packed, sz, err = int4.quantize(six_bit, quant.SCALES_DTYPE)
    assert len(fitted) == 10
    qweight, scale = quant._int8_rows(six_bit)
    err8 = quant._int8_error(qweight, scale, six_bit)
    fitted.clear()
    assert err > err8 and int4.quantize(six_bit, quant.SCALES_DTYPE, give_up_above=err8) is None
    assert 1 <= len(fitted) < 5
    assert set(quant._matrix(six_bit)) == {"qweight", "scale"}
    four = int4.quantize(six_bit, quant.SCALES_DTYPE, give_up_above=err)  # never above its own error: kept whole
    assert torch.equal(four[0], packed) and torch.equal(four[1], sz) and four[2] == err


def test_a_matrix_with_a_nan_stays_int8():
    w = on_grid(128, 256)
    w[5, 7] = torch.nan
    assert set(quant._matrix(w)) == {"qweight", "scale"}
