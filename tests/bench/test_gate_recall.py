"""bench/gate_recall.py: its RoPE is the model's, and its recall has the bounds it must have (a budget
covering every block keeps all attention; the exact block mass is the best any gate can pick; own + sink
blocks alone are the least)."""

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from bench import gate_recall as gr

H, HKV, D = 4, 2, 32


def meta():
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return {"heads": H, "kv_heads": HKV, "inv_freq": inv.tolist(), "scaling": 1.0}


def qk(T: int, S: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, HKV * D, generator=g)
    k[: gr.BLOCK] += 2 * torch.randn(HKV * D, generator=g)  # a sink-like first block
    q = torch.randn(S, H * D, generator=g)
    pos = torch.randint(2 * gr.BLOCK, T, (S,), generator=g).sort().values
    return q, k, pos


def test_rotate_is_the_models_rope():
    cfg = Qwen2Config(hidden_size=128, num_attention_heads=H, num_key_value_heads=HKV, rope_theta=1e6)
    emb = Qwen2RotaryEmbedding(cfg)
    x = torch.randn(1, H, 20, cfg.hidden_size // H)
    pos = torch.arange(3000, 3020)[None]
    cos, sin = emb(x, pos)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(gr.rotate(x[0], pos[0].float(), emb.inv_freq), want[0], atol=1e-3)  # transformers: fp32 angles


def test_a_budget_over_every_block_keeps_all_attention():
    q, k, pos = qk(T=gr.BUDGET - 100, S=8, seed=0)
    pos = pos.clamp(max=k.shape[0] - 1)
    res = gr.score_layer(q, k, pos, meta(), gold=(10, 20))
    for v in gr.VARIANTS:
        if v != "fixed":
            assert abs(res[v][0] - 1.0) < 1e-5, v
            assert res[v][1] == 1.0 and abs(res[v][2] - res[v][3]) < 1e-4, v


def test_the_block_mass_bounds_every_gate_and_own_plus_sinks_is_the_floor():
    q, k, pos = qk(T=16 * gr.BLOCK, S=24, seed=1)
    res = gr.score_layer(q, k, pos, meta(), gold=(5 * gr.BLOCK, 5 * gr.BLOCK + 40))
    same_budget = ("mean", "sub2", "sub4", "pre", "pre_nopos", "local1", "maxkey")
    for v in same_budget:
        assert res["fixed"][0] - 1e-6 <= res[v][0] <= res["oracle"][0] + 1e-6, v
    assert res["top12"][0] >= res["mean"][0] - 1e-6
    assert res["fixed"][0] < res["oracle"][0]  # the routed blocks do hold attention here


def test_pooling_before_rope_is_the_rotated_mean_when_nothing_rotates():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(H, 4, D, generator=g), torch.randn(H, 64, D, generator=g)
    still = torch.zeros(D // 2)  # every frequency 0: RoPE is the identity
    logits = q @ k.transpose(1, 2)
    gates = gr.gates(q, q, k, k, still, logits, block=8)
    assert torch.allclose(gates["pre"], gates["mean"], atol=1e-5)
    assert torch.allclose(gates["maxkey"], logits.reshape(H, 4, 8, 8).amax(-1), atol=1e-6)
    turning = torch.full((D // 2,), 0.5)
    assert not torch.allclose(gr.gates(q, q, k, k, turning, logits, block=8)["pre"], gates["mean"], atol=1e-2)
