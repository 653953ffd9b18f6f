"""Quantize a GGUF file into a quantized model directory one tensor at a time, never building the fp32 model.

Each tensor is read from the memory-mapped file and dequantized (Q4_K and Q6_K by agent.kquants, other
types by the gguf package; the same values either way), named and fixed up as transformers' GGUF loader
does (its name map and its per-architecture tensor processor, e.g. the un-permuted q/k of llama-arch
files), quantized at once by agent.quant's per-matrix rule, and its fp32 copy dropped before the next is
read. The peak is the quantized result plus one tensor in fp32, not the whole fp32 model and its state
dict. The config, generation config and tokenizer come from the file's metadata through transformers,
handed the one parse of it this module makes; the model's skeleton, on the meta device, says which
parameters exist, which matrices are quantized and which are tied. The directory written is what
``agent.quant.save`` writes for transformers' fp32 model of the same file, tensor for tensor.

A file this module does not stream (a tensor processor other than those checked here, an architecture
this transformers loads through its newer GGUF path, a transformers without the functions used here)
raises :class:`Unsupported`; the caller converts it through the full model instead. Knows nothing of
where files come from (agent/pull.py), of loading for inference, attention or prompts.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from agent import kquants, quant

# transformers' tensor processors streamed here, checked bit for bit against its fp32 model (TensorProcessor:
# no fix-up, e.g. qwen2; llama: q/k un-permuted); the others go the old way (some merge MoE experts or split heads)
_STREAMED_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")
_ROWS = 128  # rows dequantized at a time: the dequantizers hold several copies of what they are given (in cache)


class Unsupported(Exception):
    """This file cannot be streamed with this transformers; the message says why, in one line."""


def quantize_gguf(gguf_path: Path, dest: Path) -> None:
    """Write ``gguf_path`` quantized into the existing empty directory ``dest`` (as agent.quant.save would).

    Raises Unsupported (see the module docstring) before anything is written; ValueError (a tensor
    missing from the file or of the wrong shape), OSError or struct.error (an unreadable or truncated
    file) while reading it.
    """
    from gguf import GGUFReader

    legacy = _legacy_loader()
    reader = GGUFReader(gguf_path)
    architecture = legacy.read_field(reader, "general.architecture")[0]
    with _parsed_once(gguf_path, reader):
        model, processor = _described(legacy, gguf_path, architecture, dest)
    tensors, mapping = reader.tensors, getattr(reader.data, "_mmap", None)
    del reader  # its parsed metadata (a 150K-token vocabulary: about 0.5 GB) is not needed any more
    names = legacy.get_gguf_hf_weights_map(model, processor)
    quant.write_weights(dest, _quantized_tensors(tensors, mapping, processor, names, model))


def _described(legacy, gguf_path: Path, architecture: str, dest: Path):
    """``(model skeleton, tensor processor)`` for ``gguf_path``, once its config, generation config and
    tokenizer, built from its metadata as transformers builds them, are written to ``dest``."""
    from transformers import AutoConfig, AutoTokenizer

    metadata = legacy.load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    processor = _processor(legacy, architecture, metadata)
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = _skeleton(config)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    quant.write_metadata(dest, model.config, getattr(model, "generation_config", None), tokenizer)
    return model, processor


@contextlib.contextmanager
def _parsed_once(gguf_path: Path, reader) -> Iterator[None]:
    """While inside, transformers' loaders that open ``gguf_path`` with gguf's ``GGUFReader`` (the config, the
    tokenizer and the tensor processor's metadata, up to three times) are handed ``reader``, already parsed:
    each parse of a 150K-token vocabulary takes about 9 s on a 2-core machine. Other files parse as before."""
    import gguf

    parse, wanted = gguf.GGUFReader, os.path.realpath(gguf_path)

    def opened(path, *args, **kwargs):
        same = not args and not kwargs and os.path.realpath(path) == wanted
        return reader if same else parse(path, *args, **kwargs)

    gguf.GGUFReader = opened
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def _legacy_loader():
    """transformers' tensor-by-tensor GGUF loader, whose functions this module calls."""
    try:
        from transformers import modeling_gguf_pytorch_utils as legacy
    except ImportError as e:
        raise Unsupported(f"this transformers has no GGUF tensor loader ({e})") from e
    wanted = ("load_gguf_checkpoint", "get_gguf_hf_weights_map", "read_field", "TENSOR_PROCESSORS", "TensorProcessor")
    missing = [name for name in wanted if not hasattr(legacy, name)]
    if missing:
        raise Unsupported(f"this transformers' GGUF loader lacks {', '.join(missing)}")
    return legacy


def _processor(legacy, architecture: str, config: dict):
    """transformers' tensor processor for ``architecture`` where it fixes up each tensor by itself."""
    cls = legacy.TENSOR_PROCESSORS.get(architecture, legacy.TensorProcessor)
    if cls.__name__ not in _STREAMED_PROCESSORS:
        raise Unsupported(f"transformers' {cls.__name__} for '{architecture}' is not one it streams")
    if _newer_path_loads(architecture):
        raise Unsupported(f"this transformers loads '{architecture}' through its newer GGUF path")
    return cls(config=config)


def _newer_path_loads(architecture: str) -> bool:
    """Whether transformers loads ``architecture`` by its block-keeping GGUF path (5.17+) rather than the
    tensor-by-tensor loader; a transformers without that path loads every architecture the old way."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return is_gguf_arch_supported(architecture)


def _skeleton(config) -> torch.nn.Module:
    """The fp32 model of ``config`` with its parameters on the meta device (no memory; buffers are real),
    tied as transformers ties a loaded model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model


def _quantized_tensors(tensors, mapping, processor, names: dict[str, str], model) -> dict[str, torch.Tensor]:
    """The stored state of ``model``, from the GGUF's ``tensors`` one at a time (``names``: GGUF -> model);
    each one's pages of the file ``mapping`` are handed back once it is read."""
    params, state, seen = dict(model.named_parameters()), quant.persistent_buffers(model), set()
    for tensor in tensors:
        fixed = processor.process(weights=_dequantized(tensor), name=tensor.name)
        _page_out(mapping)
        name, weights = names.get(fixed.name), fixed.weights
        del fixed  # so that this fp32 tensor is gone before the next one is read (the peak: two 150K-row tables)
        if name is None:
            continue  # not a weight of the model (e.g. llama3's rope_freqs), as transformers skips it
        if name not in params:
            raise Unsupported(f"the file's {tensor.name} maps to {name}, which is not a parameter of the model")
        state.update(quant.stored(model, name, _fp32(weights, name, params[name].shape)))
        del weights
        seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise ValueError(f"the file has no tensor for {missing[0]} ({len(missing)} missing): it is incomplete, "
                         "or not a model moba-ask can convert")
    return state


def _page_out(mapping: mmap.mmap | None) -> None:
    """Drop the file's pages from this process (they stay in the page cache): read once, a tensor's pages
    would otherwise stay resident, 1.1 GB for the 1.5B model by the end."""
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _dequantized(tensor) -> np.ndarray:
    """A GGUF tensor's values in fp32, dequantized _ROWS rows at a time (a block never spans rows): Q4_K and
    Q6_K by agent.kquants (the gguf package's values, on every core, written in place), others by gguf."""
    from gguf import dequantize

    data, qtype = tensor.data, tensor.tensor_type
    if data.ndim < 2:
        return dequantize(data, qtype)
    if kquants.supports(qtype, data):
        out = np.empty((data.shape[0], kquants.values_per_row(qtype, data)), np.float32)
        for r in range(0, data.shape[0], _ROWS):
            kquants.dequantize(data[r : r + _ROWS], qtype, out[r : r + _ROWS])
        return out
    parts = (dequantize(data[r : r + _ROWS], qtype) for r in range(0, data.shape[0], _ROWS))
    first = next(parts)
    out = np.empty((data.shape[0], *first.shape[1:]), np.float32)
    out[: len(first)] = first
    for r, part in zip(range(_ROWS, data.shape[0], _ROWS), parts):
        out[r : r + len(part)] = part
    return out


def _fp32(weights: np.ndarray, name: str, shape: torch.Size) -> torch.Tensor:
    """``weights`` as an fp32 tensor of ``shape`` (copied only where read-only or of another dtype)."""
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(f"the file's tensor for {name} is {tuple(weights.shape)}, the model's {tuple(shape)}")
    return torch.from_numpy(np.require(weights, np.float32, ["C", "W"]))
