"""Turn an AskConfig into a Runtime: check the device (and join the ranks of a tensor-parallel run,
agent/parallel.py), load the model with attn_implementation="moba", write the MoBA settings onto its
config (`agent.config.params_for`), make engines, and say (as notes) where the model will not run what
was asked: the default device falling back to CPU, sliding-window layers kept dense, the portable path
instead of the Triton kernels; and that YaRN rope scaling (--rope-yarn) changed the model and its window.
Knows nothing of files or prompts.
"""

from __future__ import annotations

import torch

from agent import parallel, quant
from agent.cachefs import fingerprint
from agent.config import AskConfig, SettingError, check_layers, params_for
from agent.engine import Engine
from agent.rope import trained_window
from agent.session import Runtime
from moba.hf import configure


class DeviceError(SettingError):
    """The requested device does not exist here. The message is one line that names the fix."""


def device_of(config: AskConfig) -> str:
    """The configured device, checked, else "cuda" when available, else "cpu".

    Raises DeviceError for an unknown device, or a CUDA device this machine does not have: only the
    default choice falls back to the CPU, never an explicit --device.
    """
    if config.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(config.device)
    except RuntimeError:
        raise DeviceError(f"unknown device {config.device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {config.device!r} is not supported: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {config.device}: torch sees no CUDA device here; use --device cpu "
                          "(or leave --device out to use CUDA only when present)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {config.device}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return str(dev)


def load_runtime(config: AskConfig) -> Runtime:
    """Load `config.model` (pulled on first use) and return a Runtime.

    Under torchrun's environment (WORLD_SIZE > 1) the model is sharded over the ranks (agent.parallel).
    With config.rope_yarn > 1 the rope is YaRN and max_positions that factor times the trained window.
    Raises agent.catalog.ModelError, DeviceError, agent.parallel.ParallelError, or SettingError for dense
    layers outside the model or a model --rope-yarn cannot scale.
    """
    from agent import catalog, load

    device = device_of(config)
    ranks = parallel.world()
    if ranks:
        device = parallel.setup(ranks, device)
    name = config.model or catalog.default_model(device)
    model, tok, info = load.load_model(name, device=device, dtype=config.dtype, attn_implementation="moba",
                                       sharded=ranks is not None, rope_yarn=config.rope_yarn)
    identity = fingerprint(info.path)
    check_layers(config.dense_layers or (), info.num_layers)
    configure(model.config, params_for(config, info.num_layers))
    if ranks:
        parallel.mark_heads(model)
    engine = parallel.ParallelEngine if ranks else Engine
    return Runtime(
        tokenizer=tok,
        make_engine=lambda capacity, params=None: engine(model, capacity, config.chunk_size, params=params),
        name=info.name,
        chat=info.has_chat_template,
        max_positions=info.max_position_embeddings,
        num_layers=info.num_layers,
        stop_ids=stop_ids(tok, model),
        retune=lambda c: configure(model.config, params_for(c, info.num_layers)),
        device=device,
        identity=identity,
        notes=tuple(parallel.notes(ranks, device) + runtime_notes(config, model, info, device)),
    )


def runtime_notes(config: AskConfig, model, info, device: str) -> list[str]:
    """One line per way this run differs from what the flags ask (stated on stderr and in --json)."""
    notes = []
    if config.rope_yarn != 1:
        notes.append(f"rope: YaRN factor {config.rope_yarn:g} is on: the window is now {info.max_position_embeddings:,} "
                     f"tokens ({trained_window(model):,} trained); answers differ from the unscaled model's at any length")
    if config.device is None and device == "cpu":
        notes.append("device: no CUDA device found, running on the CPU (--device chooses)")
    if getattr(info, "quantized", False):
        notes.append(quant.note(model, info.dtype, info.path))
    windowed = sum(1 for m in model.modules() if hasattr(m, "layer_idx") and getattr(m, "sliding_window", None))
    if windowed:
        notes.append(f"{windowed} of {info.num_layers} attention layers have a sliding window: they keep it, "
                     "computed densely, not MoBA")
    if device.startswith("cuda"):
        notes += _kernel_notes(info, device)
        if config.local_blocks or config.gate_subblocks != 1:
            notes.append("--local-blocks/--gate-subblocks: the Triton kernels implement the plain gate only, so "
                         "MoBA runs on the portable PyTorch path (slower)")
    return notes


def _kernel_notes(info, device: str) -> list[str]:
    try:
        from moba.triton.launcher import HEAD_DIMS, gluon_withheld, serves
    except ImportError:
        return ["Triton cannot be imported: MoBA runs on the portable PyTorch path (slower)"]
    if serves(info.dtype, info.head_dim):
        if gluon_withheld(device, info.head_dim):
            return ["MoBA attention uses the Triton tile kernel, not the Gluon one (~3% faster at 1M), which runs only on "
                    "a GPU in EXCLUSIVE_PROCESS compute mode (it has hung when processes share a GPU; "
                    "`nvidia-smi -c EXCLUSIVE_PROCESS` to take it; bench/RESULTS.md)"]
        return []
    dims = "/".join(map(str, HEAD_DIMS))
    return [f"the Triton kernels take fp16/bf16 with head dim {dims}; this model ({str(info.dtype).split('.')[-1]}, "
            f"head dim {info.head_dim}) runs MoBA on the portable PyTorch path (slower)"]


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
