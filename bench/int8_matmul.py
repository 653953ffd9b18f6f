"""One 1536x8960 linear layer (Qwen2.5-1.5B's MLP shape) on the CPU at batch 1 and batch 512: fp32 and
bf16 F.linear against torch's weight-only kernels (int8 per channel: _weight_int8pack_mm; int4 groups of
32: _weight_int4pack_mm_for_cpu) and int8 cast to the activation dtype, F.linear, output times the
scale (agent/quant.py's prefill path). The choice
in agent/quant.py rests on it. Prints milliseconds per call and the relative error against fp32.
Run: python -m bench.int8_matmul
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

N, K, GROUP = 8960, 1536, 32


def _ms(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def _int4(w: torch.Tensor):
    g = w.view(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
    zero = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def _cells(x, wd, w8, s, w4, z, reps: int) -> list[float]:
    return [_ms(lambda: F.linear(x, wd), reps),
            _ms(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s), reps),
            _ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, GROUP, z), reps),
            _ms(lambda: F.linear(x, w8.to(x.dtype)) * s, reps)]


def main() -> None:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    s8 = w.abs().amax(1) / 127
    w8 = torch.round(w / s8[:, None]).to(torch.int8)
    w4, sz = _int4(w)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    print("| rows | dtype | F.linear | int8pack_mm | int4pack_mm | int8 cast + F.linear x scale |\n|---|---|---|---|---|---|")
    for rows, reps in ((1, 50), (512, 5)):
        for dt in (torch.float32, torch.bfloat16):
            cells = _cells(torch.randn(rows, K).to(dt), w.to(dt), w8, s8.to(dt), w4, sz.to(dt), reps)
            print(f"| {rows} | {str(dt)[6:]} | " + " | ".join(f"{c:.1f} ms" for c in cells) + " |", flush=True)
    x = torch.randn(4, K)
    ref = F.linear(x, w)
    for name, out in (("int8", torch.ops.aten._weight_int8pack_mm(x, w8, s8)),
                      ("int4", torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, GROUP, sz))):
        print(f"{name} relative error vs fp32: {((out - ref).norm() / ref.norm()).item():.4f}")


if __name__ == "__main__":
    main()
