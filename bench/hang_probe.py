"""Does the MoBA Triton path hang when several processes share one GPU, and in which kernel?

Each worker runs `triton_moba_attention` at the eval's shapes in a loop (Qwen2.5-Coder-1.5B: 12 query
heads, 2 KV heads, D 128, bf16; block 256, top-6, 1 sink; the two prefill chunks of a 30K context) and
rewrites a heartbeat file after every call (launched; with --sync, finished). The parent starts --procs
workers on the current GPU, calls a worker hung when its heartbeat has not moved for --stall seconds
(--startup for the first round, which compiles), kills every worker still running at the end and prints
one JSON line: per worker, calls done, whether it hung, where, and the tile kernel that ran. --tile auto is the launcher's own
choice (the Gluon tile kernel only on an EXCLUSIVE_PROCESS GPU, where a second process cannot start, so on
a shared GPU the Triton one); --tile triton forces the Triton tile kernel, --tile gluon the Gluon one on
Hopper whatever the compute mode (the kernel that hung). --sync synchronizes after every kernel launch, so the
heartbeat names the kernel that does not finish, and keeps on the host the last blocks table and CSR
handed to the tile kernel, which a hung worker saves to --out DIR/worker<i>.pt (to check with
tests/moba/test_schedule.py's `empty_tiles`); a hung worker also prints its Python stacks.
Run on the GPU machine: python -m bench.hang_probe --procs 3 --seconds 45 [--tile gluon] [--sync --out DIR]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPES = ((16384, 16384), (13616, 30000))  # (queries, keys) of the two prefill chunks
HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128
MOBA = dict(block_size=256, top_k=6, sink_blocks=1)
KERNELS = {  # every kernel the launcher and build_tiles launch, by module
    "routing": ("_pool_kernel", "_route_kernel"),
    "csr": ("_count_kernel", "_scatter_kernel"),
    "attention": ("_tile_kernel",),
    "hopper": ("_ws_tile_kernel",),
    "decode": ("_decode_kernel", "_merge_kernel"),
}


class Beat:
    """The worker's heartbeat file: calls done and where it is, rewritten atomically."""

    def __init__(self, path: Path):
        self.path, self.state = path, dict(calls=0, shape=None, kernel=None)

    def write(self, **changes) -> None:
        self.state.update(changes)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)


class Synced:
    """kernel[grid](...) that names itself in the heartbeat, launches, then waits for the GPU."""

    def __init__(self, name, kernel, beat: Beat):
        self.name, self.kernel, self.beat = name, kernel, beat

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.beat.write(kernel=self.name)
            launch(*args, **kwargs)
            torch.cuda.synchronize()

        return run


def _instrument(args, beat: Beat, last: dict) -> None:
    import importlib

    import moba.triton.launcher as launcher
    from moba.triton import compute_mode

    if args.tile == "triton":
        launcher._hopper_module = lambda: None  # as where Triton has no Gluon
    elif args.tile == "gluon":
        compute_mode.exclusive_process = lambda ordinal: True  # as on an exclusive-process GPU
    if not args.sync:
        return
    for mod, names in KERNELS.items():
        module = importlib.import_module(f"moba.triton.{mod}")
        for name in names:
            setattr(module, name, Synced(name, getattr(module, name), beat))
    build = launcher.build_tiles

    def kept(blk, *rest, **kw):
        tiles = build(blk, *rest, **kw)
        last.update(blk=blk.cpu(), **{k: v.cpu() if torch.is_tensor(v) else v for k, v in tiles.items()})
        return tiles

    launcher.build_tiles = kept


def _watch(args, index: int, beat: Beat, last: dict) -> None:
    """Save the last CSR and this process's Python stacks once the heartbeat stops for half of --stall."""
    while True:
        time.sleep(1)
        if time.time() - beat.path.stat().st_mtime > args.stall / 2 and beat.state["calls"] > 0:
            if args.out and last:
                saved = dict(last, shape=beat.state["shape"], **MOBA)
                torch.save(saved, Path(args.out) / f"worker{index}.pt")
            faulthandler.dump_traceback(all_threads=True)
            return


def worker(args, index: int) -> None:
    from moba.triton.launcher import tile_kernel, triton_moba_attention

    beat, last = Beat(Path(args.beats) / f"{index}.json"), {}
    beat.write()
    _instrument(args, beat, last)
    torch.manual_seed(index)
    dev, dt = "cuda", torch.bfloat16
    inputs = [(torch.randn(1, HEADS, tq, HEAD_DIM, device=dev, dtype=dt),
               *(torch.randn(1, KV_HEADS, tk, HEAD_DIM, device=dev, dtype=dt) for _ in range(2)))
              for tq, tk in SHAPES]  # fmt: skip
    _, kernel = tile_kernel(*inputs[0], 1)
    beat.write(tile_kernel=getattr(kernel, "func", kernel).__module__)  # what ran, whatever --tile asked
    for i, (q, k, v) in enumerate(inputs):  # compiles; the parent allows --startup for it
        beat.write(shape=list(SHAPES[i]))
        triton_moba_attention(q, k, v, **MOBA)
        torch.cuda.synchronize()
    threading.Thread(target=_watch, args=(args, index, beat, last), daemon=True).start()
    end = time.time() + args.seconds
    while time.time() < end:  # without --sync the host runs ahead until CUDA's launch queue is full
        for i, (q, k, v) in enumerate(inputs):
            beat.write(shape=list(SHAPES[i]))
            triton_moba_attention(q, k, v, **MOBA)
            beat.write(calls=beat.state["calls"] + 1, kernel=None)
    torch.cuda.synchronize()


def parent(args) -> dict:
    beats = Path(args.beats)
    beats.mkdir(parents=True, exist_ok=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.hang_probe", *sys.argv[1:], "--beats", str(beats)]
    procs = [subprocess.Popen([*cmd, "--worker", str(i)]) for i in range(args.procs)]
    start, hung = time.time(), {}
    while any(p.poll() is None for i, p in enumerate(procs) if i not in hung):
        time.sleep(1)
        for i, p in enumerate(procs):
            f = beats / f"{i}.json"
            if p.poll() is not None or i in hung or not f.exists():
                continue
            calls = json.loads(f.read_text())["calls"]
            quiet = time.time() - (f.stat().st_mtime if calls else start)
            if quiet > (args.stall if calls else args.startup):
                hung[i] = quiet
        if time.time() - start > args.seconds + args.startup + args.stall:
            break
    if hung:
        time.sleep(args.stall / 2 + 2)  # a hung worker's watchdog saves its CSR and stacks
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    rows = []
    for i, p in enumerate(procs):
        f = beats / f"{i}.json"
        state = json.loads(f.read_text()) if f.exists() else {}
        rows.append(dict(worker=i, hung=i in hung, exit=p.returncode, **state))
    return dict(tile=args.tile, sync=args.sync, procs=args.procs, seconds=args.seconds, workers=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--stall", type=float, default=20.0)
    ap.add_argument("--startup", type=float, default=150.0)
    ap.add_argument("--tile", choices=("auto", "triton", "gluon"), default="auto")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--beats", default=f"/tmp/hang_probe.{os.getpid()}")
    ap.add_argument("--worker", type=int)
    args = ap.parse_args()
    if args.worker is None:
        print(json.dumps(parent(args)))
    else:
        worker(args, args.worker)


if __name__ == "__main__":
    main()
