"""Where one MoBA decode step's GPU time goes: 1 query (28 heads) over 1M keys (4 KV heads), D 128, bf16,
block 4096, top-k 12, cached block means; CUDA-event mean over 50 calls, then the torch profiler's kernel table.
Run (GPU): python3 -m bench.decode_profile
"""

import torch
from torch.profiler import ProfilerActivity, profile

import moba
from moba.routing import block_means


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 4, 1 << 20, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    means = block_means(k, 4096)
    step = lambda: moba.moba_attention(q, k, v, block_size=4096, top_k=12, key_means=means)  # noqa: E731
    for _ in range(20):
        step()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(50):
        step()
    e.record()
    torch.cuda.synchronize()
    print(f"decode step: {s.elapsed_time(e) / 50:.3f} ms (mean of 50, back to back)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
