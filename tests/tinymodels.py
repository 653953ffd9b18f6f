"""Tiny random transformers models (Llama, Qwen2, Gemma3) built from configs, for tests."""

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

import moba  # noqa: F401  (registers attn_implementation="moba")

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**COMMON, head_dim=16)
    if arch == "qwen2":
        return Qwen2Config(**COMMON)
    if arch == "gemma3":
        return Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
        )
    raise ValueError(arch)


def tiny_model(arch: str, attn: str = "moba", seed: int = 0, **moba_cfg):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    for key, val in moba_cfg.items():
        setattr(cfg, f"moba_{key}", val)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()
