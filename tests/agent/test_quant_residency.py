"""agent.residency under the quantized CPU default: a memory-mapped table leaves the process's resident set
after a lookup and reads back the same values, an anonymous tensor is never paged out, an untied
embedding of a loaded model is paged out while it is read (a tied one, which the head reads whole, is not)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agent import int4, residency
from tests.agent.test_quant import saved
from tests.agent.test_quant_int4 import grid_model, tokenizer_path  # noqa: F401  (fixture)


def rss_file_kib() -> int:
    return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                if ln.startswith("RssFile:"))


def test_a_mapped_table_is_paged_out_and_reads_back_the_same(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.arange(16 << 20, dtype=torch.int32).to(torch.uint8)}, str(path))
    with safe_open(str(path), "pt") as f:
        t = f.get_tensor("t")
    assert residency.mapped_from(t, path)
    total = int(t.sum(dtype=torch.int64))
    touched = rss_file_kib()
    residency.page_out([t])
    assert touched - rss_file_kib() > 12 << 10  # most of the 16 MiB left the resident set
    assert int(t.sum(dtype=torch.int64)) == total


def test_an_anonymous_tensor_is_not_taken_for_a_mapped_one(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.ones(1 << 20)}, str(path))
    assert not residency.mapped_from(torch.ones(1 << 20), path)


def test_paged_lookup_gives_the_same_rows():
    table = torch.randn(300, 8)
    ids = torch.randint(0, 300, (2, 150))
    calls = []
    out = residency.looked_up(ids, lambda part: table[part], lambda: calls.append(1))
    assert torch.equal(out, table[ids]) and len(calls) == -(-300 // residency.RELEASE_IDS)


@pytest.mark.parametrize("tied", [False, True])
def test_an_untied_embedding_is_paged_out_while_read(tied, tokenizer_path, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    model = saved(grid_model(tied), AutoTokenizer.from_pretrained(tokenizer_path), tmp_path / "q",
                  dtype=torch.bfloat16, attn="sdpa")
    embed = model.get_input_embeddings()
    assert isinstance(embed, int4.Int4Embedding) and (embed.release is None) == tied
    ids = torch.randint(0, 128, (1, 200))
    expected = int4.rows(embed.qweight4, embed.scales_zeros, ids)
    assert torch.equal(embed(ids), expected)


def test_the_cpu_default_sets_the_lean_allocator(tokenizer_path, tmp_path, monkeypatch):  # noqa: F811
    from transformers import AutoTokenizer

    calls = []
    monkeypatch.setattr(residency, "lean_allocator", lambda: calls.append(1) or True)
    saved(grid_model(), AutoTokenizer.from_pretrained(tokenizer_path), tmp_path / "q")
    assert calls == [1]


def test_each_forward_sets_the_allocator_for_its_rows(monkeypatch):
    """A prefill chunk (many rows) mmaps blocks of 1 MiB or more and trims the heap above 4 MiB, a decode step
    (a few rows) keeps blocks up to 32 MiB and 64 MiB of free heap; mallopt is called only when the kind of
    forward changes, and never without the lean allocator."""
    calls = []
    fake = type("Libc", (), {"mallopt": lambda self, p, v: calls.append((p, v)) or 1})()
    monkeypatch.setattr(residency, "_libc", lambda: fake)
    monkeypatch.setattr(residency, "_lean", {"on": False, "rows": ""})
    rows = lambda ids: torch.zeros(*ids.shape, 4)  # noqa: E731
    residency.looked_up(torch.arange(1), rows, None)
    assert calls == []  # the allocator was not made lean: nothing is touched
    residency._lean.update(on=True, rows="many")
    for n in (1, 1, 512, 300, 1):
        residency.looked_up(torch.arange(n), rows, None)
    mmap_at, trim_at = residency._M_MMAP_THRESHOLD, residency._M_TRIM_THRESHOLD
    step = [(mmap_at, 32 << 20), (trim_at, 16 << 20)]
    assert calls == step + [(mmap_at, 1 << 20), (trim_at, 4 << 20)] + step


_HEAP_PROBE = """
import ctypes, sys, torch, transformers
from pathlib import Path
from agent import quant, residency
libc = residency._libc()
libc.mallopt(residency._M_MMAP_THRESHOLD, 32 << 20)  # glibc's own thresholds once its dynamic mmap threshold
libc.mallopt(residency._M_TRIM_THRESHOLD, 64 << 20)  # has reached its maximum (as after importing torch)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
with torch.device("meta"):  # imports what building the model imports, with no weights on the CPU
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sys.argv[1]))
import accelerate
before, built = libc.mallinfo2().arena, []
swap = quant._swap_modules
quant._swap_modules = lambda *a, **k: built.append(libc.mallinfo2().arena) or swap(*a, **k)
quant.load(Path(sys.argv[1]), torch.bfloat16, "sdpa")
print(built[0] - before)
"""


def test_building_the_model_leaves_no_hole_in_the_heap(tokenizer_path, tmp_path):  # noqa: F811
    """The weights transformers creates on the CPU while the model is built (init_empty_weights then moves them to
    meta) must be mapped and unmapped, not taken from the heap: freed there they left a hole the size of the model
    (2.2 GB for the 1.5B one) that the KV cache and the prefill's buffers were later carved from, and stayed
    resident (16K peaks of 2,434-2,450 MiB against 2,208-2,215; bench/RESULTS.md). Run in a fresh process,
    whose heap has no holes of its own yet."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    libc = residency._libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33 or later (mallopt, mallinfo2)")
    cfg = Qwen2Config(vocab_size=128, hidden_size=1024, intermediate_size=4096, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    weights = sum(p.numel() * 2 for p in model.parameters() if p.numel() * 2 >= 1 << 20)  # bf16 blocks of 1 MiB+
    saved(model, AutoTokenizer.from_pretrained(tokenizer_path), tmp_path / "q", dtype=torch.bfloat16, attn="sdpa")
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, str(tmp_path / "q")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout.split()[-1])
    assert weights > 24 << 20 and grown < weights // 8, f"the heap grew by {grown >> 20} MiB while the model was built"
