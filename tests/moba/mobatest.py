"""Input factories and an error metric shared by the moba tests."""

import torch


def make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=device)
    return q, k, v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against the reference b."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def block_local_reference(q, k, v, block_size, scale=None):
    """Causal attention restricted to each query's own block, written independently of moba."""
    Tq, Tk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    qp = torch.arange(Tk - Tq, Tk)[:, None]
    kp = torch.arange(Tk)[None, :]
    mask = (kp <= qp) & (kp // block_size == qp // block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ kf.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ vf
