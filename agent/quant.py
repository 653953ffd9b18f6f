"""Quantized models for the CPU: quantize once at conversion, store small, load without fp32 copies.

Every ``nn.Linear`` and the input embedding is stored in 4 bits where that loses nothing against int8,
else in int8. The rule, per matrix: :func:`agent.int4.quantize` (groups of 32 input values, a scale and a
zero each, rounded to bf16) when its relative error is no larger than int8 per output channel's; that
holds for the tensors a GGUF stores as Q4_K/Q4_0/Q4_1 (their grid is recovered exactly) and fails for
Q6_K/Q8_0 or full-precision ones, which stay int8. A 4-bit matrix is a :class:`agent.int4.Int4Linear`
(or ``Int4Embedding``); an int8 one a :class:`QuantLinear` (one scale per output channel) or
:class:`QuantEmbedding` (one scale per row). A tied output layer shares the embedding's tensors (a row of
the embedding is an output channel of the head). Activations run in :func:`activation_dtype`: bf16 where
the CPU computes it natively, else fp32. Decode (a few rows) runs torch's weight-only kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``), which read the stored bytes; prefill (many
rows) dequantizes the layer once per call and runs the dense GEMM (bench/RESULTS.md, "Int8 weight-only
matmul on the CPU"; bench/int8_matmul.py).

A quantized directory holds ``config.json``, the tokenizer files, ``generation_config.json`` and
``model.int8.safetensors`` (its name kept from format 1, which was int8 only and still loads).
Knows nothing of where models come from (agent/pull.py), attention or prompts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agent import int4, residency
from agent.catalog import ModelError

WEIGHTS_FILE = "model.int8.safetensors"
FORMAT = "moba-ask-quant/2"  # 4 bits where lossless against int8, else int8
INT8_FORMAT = "moba-ask-int8/1"  # every matrix int8: still loads; the note says how to get the smaller form
SCALES_DTYPE = torch.bfloat16  # 4-bit scales and zeros as stored (and as the kernel takes them with bf16 activations)
_KERNEL_K_MULTIPLE = 16  # the int8 kernel returns garbage (or crashes) for other input widths
_ROWS = 4096  # rows quantized to int8 at a time (bounds the conversion's memory on a 150K-row embedding)
_ERROR_VALUES = 1 << 20  # values compared at a time when measuring the int8 error (4 MiB slices, in cache)
ALIGN = 64  # bytes; the int8 kernel crashes on weights that start elsewhere (32 works, 4 and 28 crash)


class QuantCacheError(ModelError):
    """A quantized model directory is unreadable or does not match its config. One line naming the fix."""


class QuantLinear(nn.Module):
    """``y = x @ (qweight * scale[:, None]).T + bias`` with int8 ``qweight`` [out, in] and ``scale`` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= int4.KERNEL_MAX_ROWS and self.in_features % _KERNEL_K_MULTIPLE == 0:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scale)
        else:
            y = F.linear(rows, self.qweight.to(x.dtype)) * self.scale  # int8 -> bf16 is exact; scale the output
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class QuantEmbedding(nn.Module):
    """Rows of an int8 table times their scale (times ``embed_scale``, as Gemma's scaled embedding does)."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype, embed_scale: float | None = None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.embed_scale = num, dim, embed_scale
        self.register_buffer("qweight", torch.empty(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num, dtype=dtype, device=device))

    release = None  # set by load() for a memory-mapped table: pages it out while looking up (residency.looked_up)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = residency.looked_up(ids, self._rows, self.release)
        return out * self.embed_scale if self.embed_scale is not None else out

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


def activation_dtype() -> torch.dtype:
    """bf16 when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), else fp32."""
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    native = native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def quantized_by_default(device: str | None, dtype) -> bool:
    """The one default: int8 weights on the CPU unless a dtype is asked for (``--dtype float32`` gives
    full precision); full weights on CUDA. ``device`` None means the default device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dtype is None and str(device).startswith("cpu")


def note(model: nn.Module, dtype: torch.dtype, path: Path) -> str:
    """The runtime note saying what the quantized path chose for ``model`` (loaded from ``path``)."""
    acts = "bf16 (the CPU computes bf16 natively)" if dtype == torch.bfloat16 else "fp32 (no native bf16 on this CPU)"
    kinds = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding, int4.Int4Linear, int4.Int4Embedding))]
    four = sum(isinstance(m, (int4.Int4Linear, int4.Int4Embedding)) for m in kinds)
    weights = (f"4-bit (groups of {int4.GROUP}) for {four} of {len(kinds)} matrices, where the model's file is 4-bit; "
               "int8 per channel for the rest") if four else "int8 per channel"
    old = (f" (an int8-only cache from an older moba-ask: delete {path} to rebuild it, 4-bit where the model's "
           "file is 4-bit: smaller and leaner)") if _format(path) == INT8_FORMAT else ""
    return f"weights: {weights}{old}, quantized once from the model's files; activations {acts}; --dtype float32 for full precision"


def is_quantized_dir(path: Path) -> bool:
    """Whether ``path`` is a quantized model directory written by :func:`save`."""
    return (Path(path) / WEIGHTS_FILE).is_file()


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``qweight`` and fp32 ``scale`` per row, _ROWS rows at a time (the temporaries stay a slice)."""
    w = weight.detach().float()
    qweight, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
    for r in range(0, w.shape[0], _ROWS):
        rows = w[r : r + _ROWS]
        scale[r : r + _ROWS] = rows.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight[r : r + _ROWS] = (rows / scale[r : r + _ROWS, None]).round_().clamp_(-127, 127)
    return qweight, scale


def _int8_error(qweight: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> float:
    """The relative (Frobenius) error of the int8 weight against ``w``, as :func:`agent.int4.quantize` measures
    its own: summed about _ERROR_VALUES values at a time, so the temporaries stay a slice (a whole 150K-row
    table's would be 0.9 GB, at the conversion's peak)."""
    err = norm = 0.0
    step = max(1, _ERROR_VALUES // max(w.shape[1], 1))
    for r in range(0, w.shape[0], step):
        rows = w[r : r + step]
        err += qweight[r : r + step].float().mul_(scale[r : r + step, None]).sub_(rows).square_().sum().item()
        norm += rows.square().sum().item()
    return (err / max(norm, 1e-30)) ** 0.5


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state to store for ``model`` (float weights): every parameter as :func:`stored` keeps it (a tied
    output layer once, as the embedding) and the persistent buffers."""
    state = persistent_buffers(model)
    for name, param in model.named_parameters():
        state.update(stored(model, name, param))
    return state


def _matrix(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight`` in 4 bits when that loses nothing against int8 per channel (module docstring), else int8."""
    qweight, scale = _int8_rows(weight)
    if int4.supports(*weight.shape):
        err8 = _int8_error(qweight, scale, weight.detach().float())
        four = int4.quantize(weight, SCALES_DTYPE, give_up_above=err8)  # None: its error exceeds err8
        if four is not None and four[2] <= err8:
            return {"qweight4": four[0], "scales_zeros": four[1]}
    return {"qweight": qweight, "scale": scale}


def _quantizable(model: nn.Module, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or module is model.get_input_embeddings()


def _persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in getattr(module, "_non_persistent_buffers_set", set())


def save(model: nn.Module, tokenizer, dest: Path) -> None:
    """Write ``model`` (float weights) quantized, its config, generation config and ``tokenizer`` to ``dest``."""
    write(dest, model.config, getattr(model, "generation_config", None), tokenizer, quantized_state(model))


def write(dest: Path, config, generation_config, tokenizer, state: dict[str, torch.Tensor]) -> None:
    """Write a quantized directory: :func:`write_metadata`, then :func:`write_weights`."""
    write_metadata(dest, config, generation_config, tokenizer)
    write_weights(dest, state)


def write_metadata(dest: Path, config, generation_config, tokenizer) -> None:
    """Write ``config``, ``generation_config`` (None: none) and ``tokenizer`` to ``dest``."""
    config.save_pretrained(dest)
    if generation_config is not None:
        generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def write_weights(dest: Path, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` (:func:`quantized_state`, or agent/convert.py's, built tensor by tensor with
    :func:`stored`) as the directory's weights file, aligned for the int8 kernel."""
    from safetensors.torch import save_file

    save_file(state, str(dest / WEIGHTS_FILE), metadata={"format": FORMAT})
    align_data(dest / WEIGHTS_FILE)


def stored(model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """What :func:`quantized_state` stores for ``model``'s parameter ``name`` holding ``tensor`` (float):
    a quantized matrix for the weight of a Linear or the input embedding, else the tensor in fp32."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "weight" and _quantizable(model, model.get_submodule(owner)):
        return {f"{owner}.{k}": v for k, v in _matrix(tensor).items()}
    return {name: tensor.detach().float().contiguous()}


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers :func:`quantized_state` stores (those saved with the model), in fp32."""
    return {n: b.detach().float().contiguous() for n, b in model.named_buffers() if _persistent(model, n)}


def align_data(path: Path) -> None:
    """Pad a safetensors file's JSON header with spaces (as safetensors itself pads it) so that its data
    starts on an ALIGN-byte boundary: tensors whose sizes are multiples of ALIGN (every weight of the
    catalog models) are then memory-mapped where the int8 kernel can read them, with no copy at load."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        pad = -(8 + n) % ALIGN
        if pad == 0:
            return
        header = f.read(n)
        tmp = path.with_name(path.name + f".align-{os.getpid()}")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", n + pad) + header + b" " * pad)
            shutil.copyfileobj(f, out, 1 << 24)
    os.replace(tmp, path)


def load(path: Path, dtype: torch.dtype, attn_implementation: str):
    """The model in ``path`` (written by :func:`save`) with activations in ``dtype``. Raises QuantCacheError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = _read_state(path, dtype)
    if any(k.endswith(".qweight4") for k in state) and not int4.layout_is_known():
        raise _damaged(path, "its 4-bit weights are packed as another torch build packs them")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _damaged(path, f"config.json: {type(e).__name__}") from e
    residency.lean_allocator()  # before the model is built, so its transient CPU weights leave no hole in the heap
    with _empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    _swap_modules(model, dtype, four_bit={k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight4")})
    _assign(model, state, path)
    _load_generation_config(model, path)
    _page_out_embedding(model, path / WEIGHTS_FILE)
    return model.eval()


def _page_out_embedding(model: nn.Module, weights: Path) -> None:
    """An untied embedding table is read a few rows at a time: while ids are looked up its pages go back
    to the page cache every RELEASE_IDS ids instead of staying resident (on the 1.5B model, up to 139 MiB
    of a 16K prefill's peak). A tied one stays: the output layer reads all of it at every step."""
    embed = model.get_input_embeddings()
    tables = list(embed.buffers())
    if isinstance(model.get_output_embeddings(), (_SharedHead, _SharedHead4)):
        return
    if tables and all(residency.mapped_from(t, weights) for t in tables):
        residency.page_out(tables)
        embed.release = lambda: residency.page_out(tables)


def _read_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            if (f.metadata() or {}).get("format") not in (FORMAT, INT8_FORMAT):
                raise _damaged(path, f"not {FORMAT}")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _damaged(path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e
    return {k: _aligned(v if v.dtype in (torch.int8, torch.uint8) else v.to(dtype)) for k, v in state.items()}


def _format(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError):
        return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its data sits on a 64-byte boundary, else an aligned copy: the int8 kernel
    crashes (SIGSEGV) on weights at other addresses (the 4-bit one is given the same), and a memory-mapped tensor lands wherever the
    file's header length puts it."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _damaged(path: Path, why: str) -> QuantCacheError:
    return QuantCacheError(f"the quantized model in {path} is unreadable ({why}): delete that directory and "
                           "run again (in moba-ask's model cache it is rebuilt from the model's files)")


def _empty_weights():
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _swap_modules(model: nn.Module, dtype: torch.dtype, four_bit: set[str]) -> None:
    """Replace Linear layers and the input embedding by empty quantized modules: 4-bit for the names in
    ``four_bit``, int8 for the rest (a tied head shares the embedding's)."""
    embed = model.get_input_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    qembed = None
    for name, module in list(model.named_modules()):
        if module is embed:
            kind = int4.Int4Embedding if name in four_bit else QuantEmbedding
            qembed = kind(embed.num_embeddings, embed.embedding_dim, dtype, _embed_scale(embed), "meta")
            model.set_submodule(name, qembed)
        elif isinstance(module, nn.Linear):
            kind = int4.Int4Linear if name in four_bit else QuantLinear
            model.set_submodule(name, kind(module.in_features, module.out_features, module.bias is not None, dtype, "meta"))
    if tied and head is not None:
        model.set_output_embeddings(_SharedHead4(qembed) if isinstance(qembed, int4.Int4Embedding) else _SharedHead(qembed))


def _embed_scale(embed: nn.Module) -> float | None:
    scale = getattr(embed, "embed_scale", None)
    return None if scale is None else float(scale)


class _TiedHead:
    """The output layer of a model with tied embeddings: the embedding's table, read as a Linear. Its tensors are
    properties of the subclass that read the embedding's (not a submodule: they are stored once)."""

    def __init__(self, embed):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bias = embed.embedding_dim, embed.num_embeddings, None
        object.__setattr__(self, "_embed", embed)


class _SharedHead(_TiedHead, QuantLinear):
    """A tied int8 head."""

    @property
    def qweight(self) -> torch.Tensor:
        return self._embed.qweight

    @property
    def scale(self) -> torch.Tensor:
        return self._embed.scale


class _SharedHead4(_TiedHead, int4.Int4Linear):
    """A tied 4-bit head."""

    @property
    def qweight4(self) -> torch.Tensor:
        return self._embed.qweight4

    @property
    def scales_zeros(self) -> torch.Tensor:
        return self._embed.scales_zeros


def _assign(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise _damaged(path, f"missing {missing[:3]}, unexpected {extra[:3]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise _damaged(path, str(e).strip().splitlines()[-1].strip()) from e
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise _damaged(path, f"no values for {left[:3]}")


def _load_generation_config(model: nn.Module, path: Path) -> None:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise _damaged(path, f"generation_config.json: {type(e).__name__}") from e
