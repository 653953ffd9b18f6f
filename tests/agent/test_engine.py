"""Engine and MobaCache on tiny random models: chunking, cropping, block means, decoding."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

import moba
from agent.decoder import StaticDecoder
from agent.engine import Engine, Sampling, cache_bytes, sample
from agent.kvcache import CacheFullError, MobaCache
from moba import block_means
from moba.cachekeys import block_means_of
from moba.hf import MobaParams, dense_queries, moba_params
from tests.tinymodels import COMMON, tiny_model

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
    assert block_means_of(keys).shape == (1, 2, 1, 4)


class OpTrace(TorchDispatchMode):
    """Every aten call as (name, scalar arguments, tensor shapes/dtypes/strides): what a CUDA graph bakes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func.name(), _sig(args), _sig(sorted(kwargs.items()))))
        return func(*args, **kwargs)


def _sig(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.stride())
    if isinstance(x, (list, tuple)):
        return tuple(_sig(y) for y in x)
    return repr(x)


HOST_SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


def _steps_agree(dyn, sta, tokens):
    for t in tokens:
        a, b = dyn.step(t), sta.step(t)
        assert torch.allclose(a, b, atol=1e-4), (dyn.length, (a - b).abs().max())
    assert dyn.length == sta.length


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_equals_dynamic_across_blocks_and_truncate(arch):
    m = tiny_model(arch, block_size=16, top_k=3, sink_blocks=1)
    dyn = Engine(m, capacity=300, chunk_size=64, decode="dynamic")
    sta = Engine(m, capacity=300, chunk_size=64, decode="static")
    dense = Engine(tiny_model(arch, block_size=16, top_k=64), capacity=300)  # covers every block
    for e in (dyn, sta, dense):
        e.prefill(ids_of(140))
    assert sta.decode_path == "static" and dyn.decode_path == "dynamic"
    a, b, c = dyn.step(7), sta.step(7), dense.step(7)
    assert torch.allclose(a, b, atol=1e-4) and (b - c).abs().max() > 1e-3  # sparse, not dense
    _steps_agree(dyn, sta, ids_of(25, 2))  # 140 -> 165: crosses the block boundaries at 144 and 160
    for e in (dyn, sta):
        e.truncate(97)
        e.prefill(ids_of(14, 3))
    _steps_agree(dyn, sta, ids_of(6, 4))
    for e in (dyn, sta):
        e.truncate(60)
    logits = [e.prefill(ids_of(3, 5)) for e in (dyn, sta)]
    got = [e.generate(x, Sampling(max_new_tokens=20)) for e, x in zip((dyn, sta), logits)]
    assert got[0] == got[1]


def test_static_step_is_graph_safe(monkeypatch):
    """The captured region issues the same ops with the same scalars at every length (a block
    boundary and a truncate included) and never reads a value back to the host."""
    m = tiny_model("qwen2", block_size=16, top_k=3, sink_blocks=1, dense_layers=[1])
    e = Engine(m, capacity=300, chunk_size=64, decode="static")
    e.prefill(ids_of(141))
    traces = []
    forward = StaticDecoder._forward

    def traced(self):
        with OpTrace() as tr:
            out = forward(self)
        traces.append(tr.ops)
        return out

    monkeypatch.setattr(StaticDecoder, "_forward", traced)
    for t in ids_of(5, 2):  # positions 141 .. 145, across the boundary at 144
        e.step(t)
    e.truncate(30)
    e.step(7)
    assert len(traces) == 6 and all(tr == traces[0] for tr in traces)
    assert not {op[0] for op in traces[0]} & HOST_SYNCS


def test_decode_path_choice_and_fallbacks():
    m = tiny_model("llama", block_size=16, top_k=3, qa_policy="dense")
    e = Engine(m, capacity=41)
    assert e.decode == "dynamic"  # "auto" on CPU
    e.decode = "static"
    assert e.decode_path == "dynamic"  # no buffers yet
    e.prefill(ids_of(40))
    assert e.decode_path == "static"
    with moba.capture_routing(moba.RoutingRecorder()):
        assert e.decode_path == "dynamic"
    with moba.capture_routing(moba.RoutingRecorder(start=0, end=40)):  # span ends before the next token
        assert e.decode_path == "static"
    with moba.capture_routing(moba.RoutingRecorder(start=0, end=41)):
        assert e.decode_path == "dynamic"
    with dense_queries():
        assert e.decode_path == "static"  # the static step attends densely (test below)
    e.step(1)
    with pytest.raises(CacheFullError, match="holds 41 tokens"):
        e.step(2)
    with pytest.raises(ValueError, match="CUDA"):
        e.decode = "graph"
    with pytest.raises(ValueError, match="unknown decode path"):
        e.decode = "fast"
    with pytest.raises(ValueError, match="moba"):
        Engine(tiny_model("llama", "sdpa"), capacity=40, decode="static")


def test_static_decode_under_the_dense_answer_policy_is_dense_decode():
    """Inside dense_queries() with qa_policy "dense" the static step attends every key in every layer: the
    dynamic path's tokens, not the sparse static step's; leaving the policy brings the sparse step back."""
    m = tiny_model("qwen2", block_size=16, top_k=2, sink_blocks=1, qa_policy="dense")
    dyn = Engine(m, capacity=400, chunk_size=64, decode="dynamic")
    sta = Engine(m, capacity=400, chunk_size=64, decode="static")
    for e in (dyn, sta):
        e.prefill(ids_of(300))
    with dense_queries():
        assert sta.decode_path == "static"
        dense = [e.step(7).clone() for e in (dyn, sta)]
        _steps_agree(dyn, sta, ids_of(20, 2))
    sparse = sta.step(9).clone(), dyn.step(9)
    assert torch.allclose(*dense, atol=1e-4)
    assert torch.allclose(*sparse, atol=1e-4)
    for e in (dyn, sta):
        e.truncate(301)
    with dense_queries():
        again = sta.step(9)
    assert (again - sparse[0]).abs().max() > 1e-3  # the same token, dense vs sparse


def cuda_llama(dtype, head_dim, **moba_cfg):
    """A tiny random Llama on CUDA; bf16 with head_dim 64 takes the Triton kernels."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "hidden_size": 4 * head_dim}, head_dim=head_dim)
    for key, val in moba_cfg.items():
        setattr(cfg, f"moba_{key}", val)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba", dtype=dtype)
    return model.to("cuda").eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float32, 16), (torch.bfloat16, 64)])
def test_cuda_graph_decode_gives_the_eager_tokens(dtype, head_dim):
    m = cuda_llama(dtype, head_dim, block_size=32, top_k=3, sink_blocks=1)
    eager = Engine(m, capacity=700, chunk_size=128, decode="dynamic")
    graph = Engine(m, capacity=700, chunk_size=128)
    assert graph.decode == "graph"

    def both(n):
        got = [e.generate(e.last_logits, Sampling(max_new_tokens=n)) for e in (eager, graph)]
        assert got[0] == got[1] and eager.length == graph.length

    for e in (eager, graph):
        e.prefill(ids_of(300))
    both(40)  # 2 eager warm-up steps, then one capture replayed across the boundaries at 320 and 352
    for e in (eager, graph):
        e.truncate(250)
        e.prefill(ids_of(9, 2))
    both(30)
    assert graph._decoder.captures == 1  # the graph outlived truncate and prefill
    graph.params = MobaParams(block_size=32, top_k=2, sink_blocks=0)  # the shared model's config follows
    for e in (eager, graph):
        e.prefill(ids_of(5, 3))
    both(20)
    assert graph._decoder.captures == 2
    if dtype == torch.float32:  # bf16: eager SDPA and the split-K kernel may round a near-tie apart
        for e in (eager, graph):
            e.params = MobaParams(block_size=32, top_k=2, sink_blocks=0, qa_policy="dense")
        with dense_queries():  # the dense answer policy: its own capture, dense attention in every layer
            both(20)
        assert graph._decoder.captures == 3


def test_the_engine_runs_the_params_it_is_given():
    m = tiny_model("llama", block_size=16, top_k=3, sink_blocks=1)
    p = MobaParams(block_size=32, top_k=2, sink_blocks=0)
    e = Engine(m, capacity=100, params=p)
    assert e.params == moba_params(m.config) == p and e.cache.block_size == 32
    c = e.config
    blocks = -(-100 // 32)
    assert cache_bytes(e) == e.kv_bytes() + c.num_hidden_layers * c.num_key_value_heads * blocks * c.head_dim * 4
    assert Engine(m, capacity=100).params == p  # without params: the model's
    e.params = MobaParams(block_size=32, top_k=4, sink_blocks=0)
    assert moba_params(m.config).top_k == 4
    with pytest.raises(ValueError, match="blocks of 32 tokens"):
        e.params = MobaParams(block_size=64)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prefill_without_logits_skips_the_last_layers_work_and_fills_the_same_cache(arch):
    m = tiny_model(arch, block_size=16, top_k=3, sink_blocks=1)
    last = m.get_decoder().layers[-1]
    original, mlp_calls, attention_out = last.mlp, [], []
    original.register_forward_hook(lambda *a: mlp_calls.append(1))
    last.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: attention_out.append(bool(a[0].any())))
    ctx, question = ids_of(230), ids_of(25, 7)
    full, cached = Engine(m, capacity=300, chunk_size=37), Engine(m, capacity=300, chunk_size=37)
    assert full.prefill(ctx) is not None and mlp_calls and all(attention_out)
    mlp_calls.clear(), attention_out.clear()
    assert cached.prefill(ctx, logits=False) is None and cached.last_logits is None
    assert not mlp_calls and len(attention_out) == 7 and not any(attention_out)  # 7 chunks, no attention computed
    for a, b in zip(full.cache.layers, cached.cache.layers, strict=True):
        assert a.filled == b.filled == 230
        assert torch.equal(a.keys[:, :, :230], b.keys[:, :, :230]) and torch.equal(a.values[:, :, :230], b.values[:, :, :230])
    assert last.mlp is original  # put back
    assert torch.equal(full.prefill(question), cached.prefill(question)) and all(attention_out[7:])
    greedy = Sampling(max_new_tokens=6)
    assert full.generate(full.last_logits, greedy) == cached.generate(cached.last_logits, greedy)


def test_other_model_types_skip_only_the_attention_and_the_swap_is_undone_on_errors(monkeypatch):
    import agent.engine

    m = tiny_model("llama", block_size=16, top_k=3, sink_blocks=1)
    last = m.get_decoder().layers[-1]
    original, mlp_calls, attention_out = last.mlp, [], []
    original.register_forward_hook(lambda *a: mlp_calls.append(1))
    last.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: attention_out.append(bool(a[0].any())))
    monkeypatch.setattr(agent.engine, "SKIP_MLP_MODELS", ())
    e = Engine(m, capacity=300, chunk_size=37)
    e.prefill(ids_of(100), logits=False)
    assert mlp_calls and attention_out and not any(attention_out)
    monkeypatch.undo()

    def stop(done, total):
        assert last.mlp is not original  # swapped while the prefill runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Engine(m, capacity=300, chunk_size=37).prefill(ids_of(100), stop, logits=False)
    assert last.mlp is original
    attention_out.clear()
    Engine(m, capacity=300, chunk_size=37).prefill(ids_of(100))
    assert attention_out and all(attention_out)  # the attention runs again after the interrupted block
