"""Tensor parallelism over the ranks that `moba-ask --gpus N` (or torchrun) starts, on PyTorch distributed
and transformers' tensor-parallel plan (`tp_plan="auto"`, DTensor weights).

Rank r holds a contiguous run of the query heads, [r * Hq/N, (r+1) * Hq/N), and of the KV heads they read,
so each rank's MoBA attention, KV cache (agent.kvcache.MobaCache) and block means cover only its heads and
routing needs no traffic between ranks; the MLP and attention outputs are summed by the plan's all-reduces.
Here: the process group (NCCL with one GPU per rank, gloo on the CPU), the checks that fail before any
weight loads (GPUs, NCCL, heads divisible by the ranks), the sharded load's arguments, `ParallelEngine`
(rank 0 picks every token and the others take it), and the gather of per-head routing evidence over the
ranks so citations see what one process would. `launch` starts the ranks on this host.
Nothing here runs unless WORLD_SIZE > 1: one process never initializes torch.distributed.
Knows nothing of files, prompts or the CLI.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from agent.config import SettingError
from agent.engine import Engine, Sampling
from moba.capture import RoutingRecorder, active_recorder
from moba.hf import HEAD_OFFSET, MobaParams


class ParallelError(SettingError):
    """Tensor parallelism cannot run as asked. The message is one line that names the fix."""


@dataclass(frozen=True)
class World:
    """The ranks torchrun's environment describes: this process's rank, all ranks, those on this host."""

    rank: int
    size: int
    local_rank: int
    local_size: int


def world() -> World | None:
    """The World of this process, or None when it runs alone (WORLD_SIZE unset or 1).

    Raises ParallelError when WORLD_SIZE asks for ranks but RANK/LOCAL_RANK are not set as torchrun sets them.
    """
    env = os.environ
    try:
        size = int(env.get("WORLD_SIZE") or 1)
        if size <= 1:
            return None
        return World(int(env["RANK"]), size, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE") or size))
    except (KeyError, ValueError):
        raise ParallelError("WORLD_SIZE, RANK and LOCAL_RANK are not set as torchrun sets them: start the ranks "
                            "with `moba-ask --gpus N ...` or `torchrun --nproc_per_node N ...`") from None


def setup(w: World, device: str) -> str:
    """Join the process group of `w` and return this rank's device: cuda:LOCAL_RANK over NCCL when `device`
    is CUDA, the CPU over gloo otherwise. From here on ranks other than 0 write nothing to stdout or stderr
    (rank 0 speaks for all). Raises ParallelError for a --device cuda:N, a torch without NCCL, fewer
    CUDA devices on this host than ranks, or CPU ranks on a machine whose accelerator is visible."""
    if torch.device(device).type == "cuda":
        dev = _cuda_device(w, device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=dev)
    else:
        _check_cpu_ranks(device)
        dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    if w.rank:
        _silence()
    return str(dev)


def _check_cpu_ranks(device: str) -> None:
    """Ranks on the CPU need a machine without a visible accelerator: transformers' tensor-parallel plan puts
    the shards on the accelerator it detects, whatever --device says (found on a 2-GPU host)."""
    found = torch._C._get_accelerator().type
    if found != "cpu":
        raise ParallelError(f"--device {device} with several ranks on a machine with {found} devices: transformers "
                            f"would shard the model onto {found} anyway; leave --device out to run the ranks on the "
                            f"GPUs, or hide them (CUDA_VISIBLE_DEVICES= ) to run them on the CPU")


def _cuda_device(w: World, device: str) -> torch.device:
    if torch.device(device).index is not None:
        raise ParallelError(f"--device {device}: with {w.size} ranks each rank uses cuda:LOCAL_RANK; "
                            "use --device cuda or leave --device out")
    if not dist.is_nccl_available():
        raise ParallelError("tensor parallelism on CUDA needs NCCL and this torch build has none: install a "
                            "CUDA build of torch, or run the ranks on the CPU with --device cpu")
    have = torch.cuda.device_count()
    if have < w.local_size:
        raise ParallelError(f"{w.local_size} ranks were started on this host but it has {have} CUDA device(s): "
                            f"use --gpus {have} or fewer" if have else
                            f"{w.local_size} ranks were started on this host but torch sees no CUDA device: "
                            "run on a GPU machine, or add --device cpu")
    dev = torch.device("cuda", w.local_rank)
    torch.cuda.set_device(dev)
    return dev


def check_gpus(n: int) -> None:
    """Before starting n ranks: raise ParallelError when ranks are already running (torchrun), this torch has
    no NCCL, or this host has fewer than n CUDA devices."""
    if world() is not None:
        raise ParallelError(f"--gpus {n} under torchrun: the ranks are already started; drop --gpus")
    if not dist.is_nccl_available():
        raise ParallelError(f"--gpus {n} needs NCCL and this torch build has none: install a CUDA build of torch")
    have = torch.cuda.device_count()
    if have < n:
        raise ParallelError(f"--gpus {n}: this machine has {have} CUDA device(s): use --gpus {have} or fewer"
                            if have > 1 else f"--gpus {n}: this machine has {have} CUDA device(s): leave --gpus out")


def _silence() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def leader() -> bool:
    """True for the process that writes output files: a lone process, or rank 0."""
    return not dist.is_initialized() or dist.get_rank() == 0


def check_heads(config, ranks: int) -> None:
    """Raise ParallelError unless the query heads and the KV heads of `config` divide evenly over `ranks`."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    q = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or q
    if q % ranks or kv % ranks:
        fits = [n for n in range(1, min(q, kv) + 1) if q % n == 0 and kv % n == 0]
        raise ParallelError(f"the model has {q} query and {kv} KV heads, which {ranks} ranks cannot split evenly: "
                            f"use --gpus {' or '.join(map(str, fits))}")


def shard_kwargs(path) -> dict:
    """from_pretrained arguments that shard the model at `path` over the ranks with transformers' own
    tensor-parallel plan; checks its heads first (ParallelError)."""
    from transformers import AutoConfig
    from transformers.distributed import DistributedConfig

    check_heads(AutoConfig.from_pretrained(path), dist.get_world_size())
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def mark_heads(model) -> None:
    """Tell every attention module (`moba.hf.HEAD_OFFSET`) the global index of its first query head, so
    routing capture weighs this rank's heads with their own citation weights."""
    cfg = model.config.get_text_config()
    offset = dist.get_rank() * (cfg.num_attention_heads // dist.get_world_size())
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj"):
            setattr(module, HEAD_OFFSET, offset)


class ParallelEngine(Engine):
    """An Engine for one rank of a tensor-parallel model: the same calls on every rank, in step.

    Rank 0 picks each token (greedy or sampled) and broadcasts it, and its `on_token` answer (stop or go)
    too, so the ranks never diverge. After `generate`, the active routing recorder holds every head's
    evidence (`gather_evidence`). The KV cache holds this rank's KV heads only (`kv_heads`).
    decode: as Engine's ("auto": a CUDA graph per rank on GPUs, its all-reduces captured with it; measured
    on 2 x H200 in bench/RESULTS.md, bench/tp_gpu.py).
    """

    def __init__(self, model, capacity: int, chunk_size: int | None = None, decode: str = "auto",
                 params: MobaParams | None = None):
        super().__init__(model, capacity, chunk_size, decode, params)
        self.kv_heads //= dist.get_world_size()
        self._gathered: RoutingRecorder | None = None

    def pick(self, logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
        return int(_from_rank0(super().pick(logits, sampling, gen), self.device))

    @torch.no_grad()
    def generate(self, logits, sampling, stop_ids=frozenset(), on_token=None) -> list[int]:
        def agreed(tok: int) -> bool:
            return bool(_from_rank0(bool(on_token(tok)), self.device))

        out = super().generate(logits, sampling, stop_ids, agreed if on_token else None)
        rec = active_recorder()
        if rec is not None and rec is not self._gathered:
            gather_evidence(rec, self.device)
            self._gathered = rec
        return out


def _from_rank0(value: int | bool, device) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t)


def gather_evidence(rec: RoutingRecorder, device) -> None:
    """Turn `rec`, recorded on this rank's query heads, into what one process records, in place and on
    every rank: per-head block and gate mass and each record's blocks and scores concatenated over the
    ranks along the head dim (rank order is head order), the key mass and tail mass summed over the ranks. Two
    all_gathers and one all_reduce however many layers and records there are. The recorder's deferred
    mass is computed first (`RoutingRecorder.finish`)."""
    rec.finish()
    layers = sorted(rec.records)
    records = [r for layer in layers for r in rec.records[layer]]
    mass = [rec.head_mass[k] for k in sorted(rec.head_mass)] + [rec.gate_mass[k] for k in sorted(rec.gate_mass)]
    floats = _gather_heads(mass + [r.scores for r in records], device)
    blocks = _gather_heads([r.blocks for r in records], device)
    n = rec.key_mass.numel()
    sums = torch.cat([rec.key_mass, torch.nn.functional.pad(rec.tail_mass, (0, n - rec.tail_mass.numel()))])
    sums = sums.to(device)
    dist.all_reduce(sums)
    rec.key_mass = sums[:n].cpu()
    if rec.tail_start is not None:
        rec.tail_mass = sums[n:].cpu()
    for store in (rec.head_mass, rec.gate_mass):
        for k in sorted(store):
            store[k] = floats.pop(0)
    gathered = iter(zip(floats, blocks, strict=True))
    for layer in layers:
        rec.records[layer] = [replace(r, scores=s, blocks=b) for r, (s, b) in zip(rec.records[layer], gathered)]


def _gather_heads(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Every rank's copy of each tensor [H_local, ...], concatenated over ranks along dim 0, on the CPU."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    parts = [p.cpu() for p in parts]
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(torch.cat([p[offset : offset + n].view(t.shape) for p in parts]))
        offset += n
    return out


def notes(w: World | None, device: str) -> list[str]:
    """What a tensor-parallel run does differently from one process (stated once on stderr)."""
    if w is None:
        return []
    where = f"{w.size} GPUs" if device.startswith("cuda") else f"{w.size} CPU processes"
    return [f"tensor parallel over {where}: each rank holds 1/{w.size} of the query and KV heads; the context "
            "cache is off (a KV cache split over ranks is not stored)"]


def launch(ranks: int, argv: list[str]) -> int:
    """Run `python ARGV...` as `ranks` ranks on this host, as torchrun --standalone does, and return the
    exit code: 0, or rank 0's when it failed (its one-line error is already on stderr); when another rank
    failed first and rank 0 was stopped, one line on stderr names that rank."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    # the elastic agent logs each rank's failure and each signal; rank 0 (or _failure_code) says it in one line
    logs = {name: logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
            if name.startswith("torch.distributed.elastic")}
    levels = {name: log.level for name, log in logs.items()}
    for log in logs.values():
        log.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*argv)
    except ChildFailedError as e:
        return _failure_code(e, ranks)
    except SignalException as e:  # Ctrl-C or a kill: the ranks were stopped with it
        print(f"Error: stopped by signal {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        for name, log in logs.items():
            log.setLevel(levels[name])
    return 0


def _failure_code(e, ranks: int) -> int:
    rank, failure = e.get_first_failure()
    own = e.failures.get(0)
    if own is not None and own.exitcode > 0:
        return own.exitcode
    print(f"Error: rank {rank} of {ranks} stopped with exit code {failure.exitcode} (ranks other than 0 print "
          "nothing; the others were stopped)", file=sys.stderr)
    return failure.exitcode if failure.exitcode > 0 else 1
