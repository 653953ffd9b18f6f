"""Engine and MobaCache on tiny random models: chunking, cropping, block means, decoding."""

import pytest
import torch

from agent.engine import Engine, Sampling, sample
from agent.kvcache import CacheFullError, MobaCache
from moba import block_means
from tests.tinymodels import tiny_model

ARCHS = ["llama", "qwen2", "gemma3"]


def ids_of(n, seed=1):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_shot(arch):
    m = tiny_model(arch, block_size=16, top_k=3, sink_blocks=1)
    ids = ids_of(230)
    a = Engine(m, capacity=300, chunk_size=37).prefill(ids)
    b = Engine(m, capacity=300, chunk_size=4096).prefill(ids)
    with torch.inference_mode():
        full = m(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(b, full, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_crop_and_reprefill_equals_fresh_prefill(arch):
    m = tiny_model(arch, block_size=16, top_k=3, sink_blocks=1)
    ctx, q1, q2 = ids_of(150, 1), ids_of(23, 2), ids_of(31, 3)
    e = Engine(m, capacity=400, chunk_size=64)
    e.prefill(ctx)
    e.prefill(q1)
    e.generate(e.last_logits, Sampling(max_new_tokens=5))
    e.truncate(len(ctx))
    assert e.length == 150
    again = e.prefill(q2)
    fresh = Engine(m, capacity=400, chunk_size=64).prefill(ctx + q2)
    assert torch.allclose(again, fresh, atol=1e-4)


def test_cache_means_track_the_keys_after_updates_and_truncation():
    m = tiny_model("llama", block_size=16, top_k=3)
    e = Engine(m, capacity=200, chunk_size=10)
    e.prefill(ids_of(133))
    e.truncate(70)
    e.prefill(ids_of(41, 5))
    layer = e.cache.layers[1]
    keys = layer.keys[:, :, : layer.filled]
    assert torch.allclose(layer.block_means(), block_means(keys, 16), atol=1e-5)
    assert layer.block_means().shape[2] == 111 // 16


def test_greedy_generation_matches_transformers_generate():
    m = tiny_model("qwen2", block_size=16, top_k=3, sink_blocks=1)
    ids = ids_of(120)
    e = Engine(m, capacity=200, chunk_size=50)
    got = e.generate(e.prefill(ids), Sampling(max_new_tokens=12))
    ref = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert got == ref[0, 120:].tolist()


def test_stop_ids_and_streaming_callback():
    m = tiny_model("llama", block_size=16, top_k=3)
    e = Engine(m, capacity=200)
    logits = e.prefill(ids_of(50))
    full = e.generate(logits, Sampling(max_new_tokens=6))
    e.truncate(50)
    seen = []
    part = e.generate(logits, Sampling(max_new_tokens=6), stop_ids={full[3]}, on_token=seen.append)
    assert part == full[: full.index(full[3])] and seen == part
    e.truncate(50)
    assert e.generate(logits, Sampling(max_new_tokens=6), on_token=lambda t: True) == full[:1]


def test_sampling_is_seeded_and_top_p_restricts():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    draws = {sample(logits, Sampling(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {0, 1}
    assert sample(logits, Sampling(temperature=1.0, top_p=0.01), torch.Generator().manual_seed(0)) == 0
    assert sample(logits, Sampling()) == 0


def test_cache_full_is_a_clear_error_and_kv_bytes_formula():
    m = tiny_model("llama", block_size=16, top_k=3)
    e = Engine(m, capacity=40)
    with pytest.raises(CacheFullError, match="holds 40 tokens"):
        e.prefill(ids_of(41))
    assert e.kv_bytes(1000) == 2 * 3 * 2 * 16 * 1000 * 4


def test_cache_writes_in_place_without_reallocation():
    c = MobaCache(num_layers=1, capacity=64, block_size=8)
    k = torch.randn(1, 2, 10, 4)
    c.update(k, k, 0)
    buf = c.layers[0].keys.data_ptr()
    keys, _ = c.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)
    assert c.layers[0].keys.data_ptr() == buf and keys.shape[2] == 15 and keys.data_ptr() == buf
    assert keys._moba_block_means.shape == (1, 2, 1, 4)
