"""One 1536x8960 linear layer (Qwen2.5-1.5B's MLP shape) on the CPU at batch 1 and batch 512: fp32 and
bf16 F.linear against torch's weight-only kernels (int8 per channel: _weight_int8pack_mm; int4 groups of
32: _weight_int4pack_mm_for_cpu, packed by agent.int4.quantize), int8 cast to the activation dtype,
F.linear, output times the scale (agent/quant.py's int8 prefill path) and agent.int4.dequantize + F.linear
(the 4-bit prefill path). The choices in agent/quant.py and agent/int4.py rest on it. Prints milliseconds per call and the relative error against fp32.
Run: python -m bench.int8_matmul
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from agent import int4

N, K, GROUP = 8960, 1536, int4.GROUP


def _ms(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def _cells(x, wd, w8, s, w4, z, reps: int) -> list[float]:
    return [_ms(lambda: F.linear(x, wd), reps),
            _ms(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s), reps),
            _ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, GROUP, z), reps),
            _ms(lambda: F.linear(x, w8.to(x.dtype)) * s, reps),
            _ms(lambda: F.linear(x, int4.dequantize(w4, z, x.dtype)), reps)]


def main() -> None:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    s8 = w.abs().amax(1) / 127
    w8 = torch.round(w / s8[:, None]).to(torch.int8)
    w4, sz, _ = int4.quantize(w, torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    print("| rows | dtype | F.linear | int8pack_mm | int4pack_mm | int8 cast + F.linear x scale | int4 dequantize + F.linear |\n|---|---|---|---|---|---|---|")
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
