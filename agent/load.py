"""Load a model and its tokenizer for inference, pulling them on first use (agent/pull.py).

:func:`load_model` returns ``(model, tokenizer, ModelInfo)`` with the transformers attention asked for
(``"moba"`` imports ``moba.hf``, which registers it): on the CPU with no dtype asked for, its int8
quantized form (agent/quant.py) with bf16 activations where the CPU has them; otherwise full precision.
:func:`load_tokenizer` returns the tokenizer of a model, or a bare ``tokenizer.json`` as a
``tokenizers.Tokenizer`` (enough to count and pack tokens).
Every failure is a one-line ModelError (a SettingError for a --rope-yarn factor the model cannot take,
`agent.rope`). Knows nothing of packing, prompts or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent import quant, rope
from agent.catalog import ModelError, ModelRef, first_line, resolve
from agent.pull import ensure, local_path, quiet_transformers


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that the engine needs (KV size, context limit, prompt style)."""

    name: str
    path: Path
    has_chat_template: bool
    is_base: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: object
    device: str
    quantized: bool = False


def load_tokenizer(name: str):
    """The tokenizer of ``name``. Raises ModelError.

    A ``tokenizer.json`` file, or a directory holding one but neither config.json nor a .gguf, loads as
    is with `tokenizers`. Anything else names a model (catalog name, hub id, model directory, .gguf): its
    fast (Rust) tokenizer through transformers (e.g. Qwen2 adds an NFC normalizer there), pulled on
    first use.
    """
    from transformers import AutoTokenizer

    bare = _bare_file(name)
    if bare is not None:
        return _load_bare(bare)
    path = _tokenizer_dir(name)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer of {path}: {first_line(e)}: check its config.json and "
                         "tokenizer files, or pull the model again") from e
    if not tok.is_fast:
        raise ModelError(f"model '{name}' has no fast tokenizer (tokenizer.json): pick another model")
    return tok


def _tokenizer_dir(name: str) -> Path:
    """A directory with the model's tokenizer: a form of the model already on disk (a model directory as
    it is, never quantized just for its tokenizer), else the default form, pulled."""
    ref = resolve(name)
    return local_path(ref, quantized=True) or local_path(ref) or ensure(name)


def _bare_file(name: str) -> Path | None:
    """The tokenizer.json that ``name`` names when it is not a model; raises ModelError for a missing one."""
    path = Path(name).expanduser()
    model_dir = path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf")))
    bare = path / "tokenizer.json" if path.is_dir() else path
    if not model_dir and bare.suffix == ".json" and bare.is_file():
        return bare
    if path.suffix == ".json":
        raise ModelError(f"tokenizer file not found: {name}")
    return None


def _load_bare(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for every unreadable or malformed file
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot read tokenizer {path}: {message}") from None


def load_model(name: str, *, device="cpu", dtype=None, attn_implementation: str = "sdpa", sharded: bool = False,
               rope_yarn: float = 1.0):
    """Load ``name`` for inference; return ``(model, tokenizer, ModelInfo)``.

    ``device``: "cpu", "cuda", "cuda:1", ... ``dtype``: a torch dtype or "fp32"/"bf16"/"fp16" for
    full-precision weights in that dtype; default (None) on the CPU: int8 weights with bf16
    activations where the CPU computes bf16 natively, else fp32 (agent.quant.quantized_by_default);
    bf16 on CUDA. ``attn_implementation``: any transformers name, or "moba" (imports ``moba.hf``,
    which registers it). ``sharded``: split the heads over the ranks of the process group
    (`agent.parallel.shard_kwargs`; raises its ParallelError). ``rope_yarn``: a factor > 1 makes the
    rope YaRN and the window (ModelInfo.max_position_embeddings) that many times the trained one
    (`agent.rope.stretch`, which raises SettingError for a model it cannot scale). A missing model is
    pulled with progress bars. Raises ModelError (agent.quant.QuantCacheError for a damaged quantized
    directory).
    """
    if attn_implementation == "moba":
        _import_moba_hf()
    device = str(device)
    path = ensure(name, quantized=quant.quantized_by_default(device, dtype) and not sharded)
    tok = load_tokenizer(str(path))
    quantized = quant.is_quantized_dir(path)
    if quantized:
        if device != "cpu":
            raise ModelError(f"{path} holds quantized (4-bit/int8) weights for the CPU: use --device cpu, or name the model "
                             "itself (catalog name, hub id, .gguf) to load it in full precision")
        act = quant.activation_dtype() if dtype is None else _dtype(dtype, device)
        model = quant.load(path, act, attn_implementation)
    else:
        model = _load_full(path, device, _dtype(dtype, device), attn_implementation, sharded)
    if rope_yarn != 1:
        rope.stretch(model, rope_yarn)
    return model, tok, _info(resolve(name), path, model, tok, device, quantized=quantized)


def _load_full(path: Path, device: str, torch_dtype, attn_implementation: str, sharded: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if sharded:
        from agent.parallel import shard_kwargs

        kwargs.update(shard_kwargs(path))
    elif device != "cpu":
        kwargs["device_map"] = device
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"cannot load {path}: {first_line(e)}: check the directory or pull it again") from e


def _import_moba_hf() -> None:
    try:
        import moba.hf  # noqa: F401
    except ImportError as e:
        raise ModelError(
            f"attn_implementation 'moba' needs moba.hf, which cannot be imported ({e}): use 'sdpa' for now"
        ) from e


def _dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if str(dtype) not in names:
        raise ModelError(f"unknown dtype '{dtype}': use one of {', '.join(names)}")
    return names[str(dtype)]


def _info(ref: ModelRef, path: Path, model, tok, device: str, quantized: bool = False) -> ModelInfo:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    has_template = bool(getattr(tok, "chat_template", None))
    return ModelInfo(
        name=ref.entry.name if ref.entry else ref.name,
        path=path,
        has_chat_template=has_template,
        is_base=ref.entry.is_base_model if ref.entry else not has_template,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        max_position_embeddings=cfg.max_position_embeddings,
        dtype=next(model.parameters()).dtype,
        device=device,
        quantized=quantized,
    )
