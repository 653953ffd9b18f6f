"""GGUF Q4_K/Q6_K blocks dequantized by agent/kquants.py: the gguf package's numpy values, bit for bit, on
random blocks (every scale and level pattern) and through agent/convert.py a slice of rows at a time."""

import gguf
import numpy as np
import pytest

from agent import convert, kquants

TYPES = {gguf.GGMLQuantizationType.Q4_K: 144, gguf.GGMLQuantizationType.Q6_K: 210}
HALVES = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q6_K: (208,)}


def random_blocks(qtype, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Rows of random blocks whose fp16 scales are finite (any sign, tiny to large); every other byte random."""
    rng = np.random.default_rng(seed)
    size = TYPES[qtype]
    data = rng.integers(0, 256, (rows * blocks_per_row, size), dtype=np.uint8)
    for at in HALVES[qtype]:
        halves = (rng.standard_normal(len(data)) * 10.0 ** rng.integers(-6, 4, len(data))).astype(np.float16)
        data[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks_per_row * size)


def kquant_values(data: np.ndarray, qtype) -> np.ndarray:
    out = np.full((data.shape[0], kquants.values_per_row(qtype, data)), np.nan, np.float32)
    kquants.dequantize(data, qtype, out)
    return out


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_random_blocks_give_the_gguf_packages_values_bit_for_bit(qtype):
    data = random_blocks(qtype, rows=48, blocks_per_row=3)
    want = gguf.dequantize(data, qtype)
    got = kquant_values(data, qtype)
    assert got.shape == want.shape == (48, 3 * 256) and got.dtype == np.float32
    assert np.isfinite(want).all() and np.array_equal(got.view(np.int32), want.view(np.int32))


def test_only_whole_q4_k_and_q6_k_blocks_are_taken():
    q4k = random_blocks(gguf.GGMLQuantizationType.Q4_K, 2, 1)
    assert kquants.supports(gguf.GGMLQuantizationType.Q4_K, q4k)
    assert not kquants.supports(gguf.GGMLQuantizationType.Q4_K, q4k[:, :-1])  # not whole blocks
    assert not kquants.supports(gguf.GGMLQuantizationType.Q4_0, q4k)
    assert not kquants.supports(gguf.GGMLQuantizationType.Q4_K, q4k.view(np.float32))
    assert not kquants.supports(gguf.GGMLQuantizationType.Q4_K, q4k[0])


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_a_file_tensor_dequantized_a_slice_at_a_time_is_the_gguf_packages(qtype, tmp_path, monkeypatch):
    data = random_blocks(qtype, rows=10, blocks_per_row=2, seed=1)
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(convert, "_ROWS", 3)  # slices of 3 rows, the last one short
    (tensor,) = gguf.GGUFReader(path).tensors
    got = convert._dequantized(tensor)
    assert got.shape == (10, 512) and np.array_equal(got.view(np.int32), gguf.dequantize(data, qtype).view(np.int32))
