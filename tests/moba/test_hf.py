"""attn_implementation="moba" inside tiny random Llama, Qwen2 and Gemma3 models."""

import pytest
import torch
from transformers import DynamicCache

import moba
import moba.ops
import moba.portable
import moba.static
from moba.hf import MobaParams, configure, dense_queries, moba_params
from tests.moba.mobatest import attended_blocks, force_sparse, spy
from tests.tinymodels import tiny_model

ARCHS = ["llama", "qwen2", "gemma3"]


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_moba_covering_all_blocks_equals_sdpa_on_the_sparse_path(monkeypatch, arch):
    ids = torch.randint(0, 97, (1, 180))
    ref = tiny_model(arch, "sdpa")
    m = tiny_model(arch, "moba", block_size=16, top_k=64)
    sparse_chunks = force_sparse(monkeypatch)
    assert torch.allclose(logits(m, ids), logits(ref, ids), atol=1e-4)
    assert sparse_chunks
    del sparse_chunks[:]
    gen_ref = ref.generate(ids, max_new_tokens=8, do_sample=False)
    gen = m.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(gen, gen_ref)
    assert len(sparse_chunks) >= 8  # the prefill and every decode step


def test_covering_top_k_takes_the_dense_shortcut_and_equals_the_sparse_path(monkeypatch):
    ids = torch.randint(0, 97, (1, 180))
    m = tiny_model("llama", "moba", block_size=16, top_k=64)
    with pytest.MonkeyPatch.context() as mp:
        force_sparse(mp)
        sparse = logits(m, ids)
    dense_calls = spy(monkeypatch, moba.ops, "dense_attention")
    sparse_chunks = spy(monkeypatch, moba.portable, "_attend_chunk")
    out = logits(m, ids)
    assert len(dense_calls) == m.config.num_hidden_layers and not sparse_chunks
    assert torch.allclose(out, sparse, atol=1e-4)


def test_gemma_sliding_window_is_kept():
    ids = torch.randint(0, 97, (1, 120))
    m = tiny_model("gemma3", "moba", block_size=16, top_k=64)
    windowless = tiny_model("gemma3", "moba", block_size=16, top_k=64)
    windowless.config.sliding_window = 10_000
    for layer in windowless.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = 10_000
    assert (logits(m, ids) - logits(windowless, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_model_matches_spec_backend(arch):
    ids = torch.randint(0, 97, (1, 150))
    m = tiny_model(arch, "moba", block_size=8, top_k=3, sink_blocks=1)
    out = logits(m, ids)
    moba.set_backend("naive")
    try:
        ref = logits(m, ids)
    finally:
        moba.set_backend("auto")
    assert torch.allclose(out, ref, atol=1e-4)
    dense = tiny_model(arch, "sdpa")
    assert (out - logits(dense, ids)).abs().max() > 1e-3  # sparsity guard


def test_decode_with_dynamic_cache_is_sparse_and_matches_full_forward():
    ids = torch.randint(0, 97, (1, 130))
    m = tiny_model("llama", "moba", block_size=8, top_k=3)
    cache = DynamicCache(config=m.config)
    with torch.inference_mode():
        m(ids[:, :129], past_key_values=cache, use_cache=True)
        step = m(ids[:, 129:], past_key_values=cache, use_cache=True).logits[0, -1]
    assert torch.allclose(step, logits(m, ids)[0, -1], atol=1e-4)


def test_params_come_from_config_with_defaults():
    m = tiny_model("llama", "moba")
    assert moba_params(m.config) == MobaParams()
    configure(m.config, MobaParams(block_size=32, top_k=4, sink_blocks=0, dense_layers=(-1,), qa_policy="dense"))
    p = moba_params(m.config)
    assert (p.block_size, p.top_k, p.sink_blocks, p.dense_layers, p.qa_policy) == (32, 4, 0, (-1,), "dense")


def _routed(model, ids, forced: bool) -> list:
    """Every layer record of one forward run of model (inside `dense_queries()` when forced)."""
    rec = moba.RoutingRecorder()
    with moba.capture_routing(rec), dense_queries(forced):
        logits(model, ids)
    return [r for recs in rec.records.values() for r in recs]


def test_dense_layers_and_qa_policy():
    ids = torch.randint(0, 97, (1, 150))
    ref = logits(tiny_model("qwen2", "sdpa"), ids)  # the independent dense reference
    sparse = tiny_model("qwen2", "moba", block_size=8, top_k=2, qa_policy="moba")
    sparse_out = logits(sparse, ids)
    assert (sparse_out - ref).abs().max() > 1e-3
    dense_last = tiny_model("qwen2", "moba", block_size=8, top_k=2, dense_layers=[-1])
    assert not torch.allclose(logits(dense_last, ids), sparse_out, atol=1e-4)
    assert not torch.allclose(logits(dense_last, ids), ref, atol=1e-4)
    all_dense = tiny_model("qwen2", "moba", block_size=8, top_k=2, dense_layers=[0, 1, 2])
    assert torch.allclose(logits(all_dense, ids), ref, atol=1e-5)
    policy = tiny_model("qwen2", "moba", block_size=8, top_k=2, qa_policy="dense")
    assert torch.allclose(logits(policy, ids), sparse_out)  # outside dense_queries: MoBA
    with dense_queries():
        assert torch.allclose(logits(policy, ids), ref, atol=1e-5)
        assert torch.equal(logits(sparse, ids), sparse_out)  # the "moba" policy stays sparse inside
    assert all(r.dense for r in _routed(policy, ids, forced=True))
    records = _routed(sparse, ids, forced=True)
    assert records and not any(r.dense for r in records)
    own = torch.arange(150) // 8
    for r in records:  # own block + top_k - 1 routed + 1 sink, out of own + 1 causal blocks
        n = attended_blocks(moba.Routing(r.blocks[None], r.scores[None]), 19).sum(-1)[0]
        assert (n <= 3).all() and (n[:, own >= 3] == 3).all()


def test_recorder_shapes_and_ranges():
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=3, sink_blocks=1, dense_layers=[2])
    rec = moba.RoutingRecorder(start=90, layers={0, 2})
    with moba.capture_routing(rec):
        logits(m, ids)
    assert set(rec.records) == {0, 2}
    r0, r2 = rec.records[0][0], rec.records[2][0]
    assert not r0.dense and r2.dense
    assert r0.blocks.shape == (4, 10, 4) and r0.scores.shape == (4, 10, 4)
    assert torch.equal(r0.positions, torch.arange(90, 100))
    assert torch.equal(r0.blocks[..., 0], (r0.positions // 8).expand(4, 10).int())
    assert ((r0.blocks[..., 1:] >= -1) & (r0.blocks[..., 1:] < (r0.positions // 8)[None, :, None])).all()
    assert rec.key_mass.shape == (100,)
    assert torch.isclose(rec.key_mass.sum(), torch.tensor(2 * 4 * 10.0), atol=1e-3)  # 2 layers x 4 heads x 10 queries
    assert rec.key_mass[:8].sum() > 0  # the sink block
    assert rec.block_hits()


def test_no_recorder_records_nothing():
    m = tiny_model("llama", "moba", block_size=8, top_k=3)
    rec = moba.RoutingRecorder()
    logits(m, torch.randint(0, 97, (1, 60)))
    assert rec.records == {} and moba.capture.active_recorder() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-query dense kernel runs on CUDA")
def test_dense_decode_step_on_cuda_equals_sdpa(monkeypatch):
    """A dense layer's decode step (one query, bf16, head dim 64) runs the GQA-grouped Triton kernel over
    slices of the keys and matches SDPA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import moba.triton.dense_decode
    from tests.tinymodels import COMMON

    calls = spy(monkeypatch, moba.hf, "static_dense_decode")
    launches = spy(monkeypatch, moba.triton.dense_decode, "dense_decode")
    models = []
    for attn in ("moba", "sdpa"):
        torch.manual_seed(0)
        cfg = LlamaConfig(**{**COMMON, "hidden_size": 256}, head_dim=64)
        cfg.moba_block_size, cfg.moba_top_k, cfg.moba_dense_layers = 8, 2, [0, 1, 2]
        models.append(AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16).to("cuda"))
    ids = torch.randint(0, 97, (1, 5000), device="cuda")
    outs = []
    with torch.inference_mode():
        for m in models:
            cache = DynamicCache(config=m.config)
            m(ids[:, :-1], past_key_values=cache)
            outs.append(m(ids[:, -1:], past_key_values=cache).logits.float())
    assert len(calls) == 3 and len(launches) == 3  # every layer's step ran the dense decode kernel
    assert (outs[0] - outs[1]).abs().max() < 0.05 * outs[1].abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_unread_layers_compute_no_attention_and_leave_the_others_exact(arch):
    ids = torch.randint(0, 97, (1, 90))
    m = tiny_model(arch, "moba", block_size=16, top_k=3, sink_blocks=1)
    seen = []
    hooks = [layer.self_attn.register_forward_hook(lambda mod, a, out: seen.append((mod.layer_idx, out[0])))
             for layer in m.get_decoder().layers]
    try:
        logits(m, ids)
        full = dict(seen)
        seen.clear()
        with moba.hf.unread_outputs([-1]):
            logits(m, ids)
        skipped = dict(seen)
    finally:
        for h in hooks:
            h.remove()
    last = len(full) - 1
    assert all(torch.equal(skipped[i], full[i]) for i in range(last))
    attn = m.get_decoder().layers[last].self_attn
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    zero_attention = torch.zeros(*full[last].shape[:2], heads * head_dim)
    assert torch.equal(skipped[last], attn.o_proj(zero_attention))
    assert not torch.equal(skipped[last], full[last])


def test_an_unread_layer_the_recorder_wants_is_computed():
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=3, sink_blocks=1)
    rec = moba.RoutingRecorder(start=90, layers={2})
    with moba.capture_routing(rec), moba.hf.unread_outputs([2]):
        logits(m, ids)
    assert set(rec.records) == {2} and rec.records[2][0].blocks.shape[1] == 10
