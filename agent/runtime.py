"""Turn an AskConfig into a Runtime: load the model with attn_implementation="moba", write the
MoBA parameters onto its config, and make engines. Knows nothing of files or prompts.
"""

from __future__ import annotations

import torch

from agent.cachefs import fingerprint
from agent.config import AskConfig
from agent.engine import Engine
from agent.session import Runtime
from moba.hf import MobaParams, configure


def device_of(config: AskConfig) -> str:
    """The configured device, else "cuda" when available, else "cpu"."""
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def moba_params(config: AskConfig, num_layers: int) -> MobaParams:
    """MoBA settings for the model; attention="dense" makes every layer dense (routing is still scored);
    "auto" loads as "moba", and dense_layers None as none, until `agent.config.resolve` and the
    runtime's retune settle them for the packed context."""
    dense = tuple(range(num_layers)) if config.attention == "dense" else config.dense_layers or ()
    return MobaParams(config.block_size, config.top_k, config.sink_blocks, dense, config.qa_policy,
                      config.local_blocks, config.gate_subblocks)


def load_runtime(config: AskConfig) -> Runtime:
    """Load `config.model` (pulled on first use) and return a Runtime. Raises agent.models.ModelError."""
    from agent import models

    name = config.model or models.default_model()
    device = device_of(config)
    model, tok, info = models.load_model(name, device=device, dtype=config.dtype, attn_implementation="moba")
    identity = fingerprint(info.path)
    configure(model.config, moba_params(config, info.num_layers))
    return Runtime(
        tokenizer=tok,
        make_engine=lambda capacity: Engine(model, capacity, config.chunk_size),
        name=info.name,
        chat=info.has_chat_template,
        max_positions=info.max_position_embeddings,
        stop_ids=stop_ids(tok, model),
        retune=lambda c: configure(model.config, moba_params(c, info.num_layers)),
        device=device,
        identity=identity,
    )


def stop_ids(tokenizer, model) -> frozenset[int]:
    """EOS ids from the generation config and tokenizer, plus chat end-of-turn tokens it knows."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for name in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return frozenset(ids)
