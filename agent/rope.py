"""YaRN rope scaling of a loaded transformers model (`stretch`): its rope parameters become type "yarn"
(factor f, original_max_position_embeddings = the window it was trained on) and its rotary embeddings are
rebuilt from them, so that a model trained on N positions reads f x N. Qwen's model cards extend Qwen2.5
from 32,768 to 131,072 positions this way (factor 4).

Works on the `rope_parameters` dict of transformers 5.x configs (5.17 and 5.24 alike; a config.json's
legacy `rope_scaling` is moved there when the config loads) and on the `inv_freq` / `attention_scaling`
of their rotary modules. Knows nothing of the CLI, packing or MoBA.
"""

from __future__ import annotations

import torch

from agent.config import SettingError


def stretch(model, factor: float) -> int:
    """Make `model`'s rope YaRN with `factor` (> 1), in place; return its new window, factor x the
    trained one (config.max_position_embeddings is set to it).

    Raises SettingError for a model without RoPE, with rope parameters per layer type, or whose rope
    is already scaled (scaling it again would be silent and wrong).
    """
    cfg = model.config.get_text_config()
    name = type(model).__name__
    params = _plain_rope(cfg, name)
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
                and hasattr(m, "attention_scaling")]
    if not rotaries:
        raise SettingError(f"--rope-yarn: {name} has no rotary embedding module to rescale; leave --rope-yarn at 1")
    window = cfg.max_position_embeddings
    cfg.rope_parameters = dict(params, rope_type="yarn", factor=float(factor),
                               original_max_position_embeddings=window)
    cfg.max_position_embeddings = round(window * factor)
    for rotary in rotaries:
        _rebuild(rotary, cfg)
    return cfg.max_position_embeddings


def trained_window(model) -> int:
    """The window `model` was trained on: the original one of a stretched model, else its window."""
    cfg = model.config.get_text_config()
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("original_max_position_embeddings") or cfg.max_position_embeddings


def _plain_rope(cfg, name: str) -> dict:
    """The model's one global, unscaled rope parameter dict; SettingError otherwise."""
    params = getattr(cfg, "rope_parameters", None)
    if not params:
        raise SettingError(f"--rope-yarn: {name} has no rotary position embedding (RoPE) to scale; leave --rope-yarn at 1")
    if any(isinstance(v, dict) for v in params.values()):
        raise SettingError(f"--rope-yarn: {name} has rope parameters per layer type ({', '.join(params)}), which "
                           "--rope-yarn does not rescale; leave it at 1")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise SettingError(f"--rope-yarn: {name}'s rope is already scaled ({kind}, factor {params.get('factor')}); "
                           "scaling it again would be wrong: leave --rope-yarn at 1")
    return params


def _rebuild(rotary, cfg) -> None:
    """Give one rotary module the YaRN frequencies and cos/sin scaling of `cfg`, on its device."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](cfg, rotary.inv_freq.device)
    rotary.register_buffer("inv_freq", inv_freq, persistent=False)
    if isinstance(getattr(rotary, "original_inv_freq", None), torch.Tensor):
        rotary.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
    rotary.attention_scaling = scaling
    rotary.rope_type = "yarn"
    rotary.max_seq_len_cached = cfg.max_position_embeddings
