"""How much of exact attention each MoBA gate keeps, on a real model's own queries and keys (CPU).

For eval repositories packed as `moba-ask eval` packs them, one dense forward over the prompt (context,
then each task's question turn against the cached context) records every layer's queries and keys before
RoPE (forward hooks on q_proj/k_proj; RoPE is applied here, exactly as the model does). Then, per layer,
query head and recorded query (the question turn's tokens, and context positions sampled at random):
- recall: the share of the query's exact softmax attention that falls in the blocks a gate selects (own
  block + sinks + routed), at the same attended-key budget for every variant (block 512: the nearest above);
- gold: for question tokens, whether a selected block overlaps the gold lines, and the share of the
  attention on the gold blocks that the selection keeps.
Gate variants: the block mean of rotated keys (the op's gate), the best of 2 / 4 sub-block means, the mean
of keys pooled before RoPE and rotated to the block's centre ("pre"), the same scored without position
("pre_nopos"), the previous block always kept ("local1"), block 128 / 512 at the same budget, and two
ceilings that no gate can read cheaply: each block's best single key ("maxkey") and the exact block mass
("oracle"); for scale, own + sink blocks alone ("fixed") and the op's gate at twice the keys ("top12").
Intervals: bootstrap over tasks. The model runs once (--save); --load re-scores without it. The weights
load in the CPU default form (int8, bf16 activations); the scores are computed in fp32.

Run:
  python -m bench.gate_recall /tmp/r/flask-3.0.3/src/flask /tmp/r/mpmath-1.3.0/mpmath --tasks 8 \\
      --context-tokens 16384 --save /tmp/gate_caps -o bench/results/gate-recall-16k.json
  python -m bench.gate_recall --load /tmp/gate_caps -o bench/results/gate-recall-16k.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

BLOCK, TOP_K, SINKS = 256, 6, 1  # the GPU defaults (moba.hf.MobaParams)
BUDGET = (TOP_K + SINKS) * BLOCK  # attended keys: own + routed + sinks
VARIANTS = ("mean", "sub2", "sub4", "pre", "pre_nopos", "local1", "block128", "block512", "maxkey", "oracle",
            "fixed", "top12")


def capture(repos: list[str], model_name: str, context_tokens: int, n_tasks: int, seed: int, samples: int,
            out: Path) -> None:
    """One forward per repository (context once, each question turn on top); writes <repo>.pt files."""
    from transformers import DynamicCache

    from agent.config import AskConfig
    from agent.evaluate.tasks import build_workspace
    from agent.load import load_model
    from agent.session import Runtime, Session

    model, tok, info = load_model(model_name, device="cpu", attn_implementation="sdpa")
    runtime = Runtime(tok, lambda *a: None, info.name, True, info.max_position_embeddings,
                      model.config.num_hidden_layers)
    layers = model.model.layers
    rec: dict[str, list] = {"q": [None] * len(layers), "k": [None] * len(layers)}
    for i, layer in enumerate(layers):
        layer.self_attn.q_proj.register_forward_hook(_hook(rec["q"], i))
        layer.self_attn.k_proj.register_forward_hook(_hook(rec["k"], i))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads,
            "inv_freq": model.model.rotary_emb.inv_freq.float().tolist(),
            "scaling": float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))}
    for root in repos:
        t0 = time.time()
        ws = build_workspace(root, tok, context_tokens=context_tokens, n_tasks=n_tasks, seed=seed)
        session = Session(runtime, ws.pack, AskConfig(model=model_name, attention="dense"))
        ids = list(session.prefix_ids) + [int(i) for i in ws.pack.ids]
        cache = DynamicCache()
        with torch.inference_mode():
            model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        n = len(ids)
        keys = [k[0] for k in rec["k"]]  # [n, Hkv*D] each
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randint(2 * BLOCK, n, (samples,), generator=gen).sort().values
        ctx_q = [q[0][picks] for q in rec["q"]]
        questions = []
        for t in ws.tasks:
            turn = session._encode(session._split(session._render([], t.question))[1])
            with torch.inference_mode():
                model(torch.tensor([turn]), past_key_values=cache, use_cache=True, logits_to_keep=1,
                      position_ids=torch.arange(n, n + len(turn))[None])
            cache.crop(-len(turn))
            start, _ = ws.pack.source_map.line_tokens(t.path, t.start_line)
            end = ws.pack.source_map.line_tokens(t.path, t.end_line)[1]
            shift = len(session.prefix_ids)
            questions.append({"id": t.id, "kind": t.kind, "depth": t.depth, "gold": (start + shift, end + shift),
                              "q": [q[0] for q in rec["q"]], "k": [k[0] for k in rec["k"]], "len": len(turn)})
        torch.save({"meta": meta, "repo": Path(root).name, "n": n, "keys": keys, "picks": picks, "ctx_q": ctx_q,
                    "questions": questions}, out / f"{Path(root).name}.pt")
        print(f"{Path(root).name}: {n:,} tokens, {len(ws.tasks)} questions, {time.time() - t0:.0f} s", flush=True)


def _hook(store: list, i: int):
    def keep(module, args, output):
        store[i] = output.detach().to(torch.bfloat16)
    return keep


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE as Qwen2/Llama apply it (halves rotated): x [..., T, D], pos [T] (float positions allowed)."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def gates(q: torch.Tensor, q_pre: torch.Tensor, k: torch.Tensor, k_pre: torch.Tensor, inv_freq: torch.Tensor,
          logits: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Gate scores [Hq, S, n_full] of every variant at one block size; q [Hq, S, D] rotated, k [Hq, T, D]."""
    n_full = k.shape[1] // block
    kb = k[:, : n_full * block].reshape(k.shape[0], n_full, block, -1)
    out = {"mean": mean_gate(q, k, block)}
    for s in (2, 4):
        sub = kb.reshape(k.shape[0], n_full, s, block // s, -1).mean(3)  # [H, n, s, D]
        out[f"sub{s}"] = torch.einsum("hqd,hnsd->hqns", q, sub).amax(-1)
    pre = k_pre[:, : n_full * block].reshape(k.shape[0], n_full, block, -1).mean(2)
    centre = torch.arange(n_full) * block + (block - 1) / 2
    out["pre"] = q @ rotate(pre, centre, inv_freq).transpose(1, 2)
    out["pre_nopos"] = q_pre @ pre.transpose(1, 2)
    lg = logits[..., : n_full * block]
    out["maxkey"] = lg.reshape(*lg.shape[:2], n_full, block).amax(-1)
    return out


def mean_gate(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """The op's gate: q against the mean rotated key of every complete block, [Hq, S, n_full]."""
    n_full = k.shape[1] // block
    return q @ k[:, : n_full * block].reshape(k.shape[0], n_full, block, -1).mean(2).transpose(1, 2)


def recall(gate: torch.Tensor, mass: torch.Tensor, own: torch.Tensor, n_route: int,
           local: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of attention in own + sink + routed blocks [H, S], the blocks chosen [H, S, n_blocks]);
    gate [H, S, n_full], mass [H, S, n_blocks]."""
    n_full = gate.shape[-1]
    ids = torch.arange(n_full)
    past = ids[None, :] < own[:, None]  # [S, n_full]
    routed = gate.masked_fill(~past[None] | (ids < SINKS)[None, None], float("-inf"))
    if local:
        near = past & (ids >= SINKS)[None] & (ids[None] >= own[:, None] - local)
        routed = routed.masked_fill(near[None], float("inf"))
    k = min(n_route, n_full)
    val, idx = routed.topk(k, -1)
    chosen = torch.zeros(mass.shape, dtype=torch.bool)
    chosen.scatter_(-1, idx.masked_fill(val == float("-inf"), 0), (val > float("-inf")))
    chosen[..., :SINKS] |= past[None, :, :SINKS].expand(chosen.shape[0], -1, -1)
    chosen.scatter_(-1, own[None, :, None].expand(chosen.shape[0], -1, 1), True)
    return (mass * chosen).sum(-1), chosen


def score_layer(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, meta: dict,
                gold: tuple[int, int] | None) -> dict[str, list[float]]:
    """`_scores` of every variant for pre-RoPE queries q [S, Hq*D] at positions pos over keys k [T, Hkv*D]."""
    H, Hkv = meta["heads"], meta["kv_heads"]
    inv_freq = torch.tensor(meta["inv_freq"])
    D = q.shape[-1] // H
    q_pre = q.float().reshape(-1, H, D).transpose(0, 1)  # [H, S, D]
    k_pre = k.float().reshape(-1, Hkv, D).transpose(0, 1).repeat_interleave(H // Hkv, 0)  # [H, T, D]
    T = k_pre.shape[1]
    qr = rotate(q_pre, pos.float(), inv_freq) * meta["scaling"]
    kr = rotate(k_pre, torch.arange(T).float(), inv_freq) * meta["scaling"]
    logits = (qr @ kr.transpose(1, 2)) / math.sqrt(D)
    logits = logits.masked_fill(torch.arange(T)[None, None, :] > pos[None, :, None], float("-inf"))
    prob = logits.softmax(-1)
    res = {}
    for block in (BLOCK, 128, 512):
        n_blocks = math.ceil(T / block)
        pad = n_blocks * block - T
        mass = torch.nn.functional.pad(prob, (0, pad)).reshape(H, -1, n_blocks, block).sum(-1)
        own = pos // block
        n_route = math.ceil(BUDGET / block) - SINKS - 1  # 512: 2048 keys, the nearest budget above
        if block != BLOCK:
            res[f"block{block}"] = _scores(*recall(mean_gate(qr, kr, block), mass, own, n_route), mass, gold, block)
            continue
        g = gates(qr, q_pre, kr, k_pre, inv_freq, logits, block)
        g["oracle"] = mass[..., : g["mean"].shape[-1]]
        for name, gate in g.items():
            res[name] = _scores(*recall(gate, mass, own, n_route), mass, gold, block)
        for name, n, local in (("local1", n_route, 1), ("fixed", 0, 0), ("top12", 2 * n_route + 1, 0)):
            res[name] = _scores(*recall(g["mean"], mass, own, n, local=local), mass, gold, block)
    return res


def _scores(rec: torch.Tensor, chosen: torch.Tensor, mass: torch.Tensor, gold, block: int) -> list[float]:
    """[mean recall, gold-block hit rate, gold mass kept, gold mass] (the gold ones nan/0 without gold)."""
    if gold is None:
        return [float(rec.mean()), float("nan"), 0.0, 0.0]
    blocks = torch.arange(gold[0] // block, gold[1] // block + 1)
    blocks = blocks[blocks < chosen.shape[-1]]
    on_gold = mass[..., blocks]
    return [float(rec.mean()), float(chosen[..., blocks].any(-1).float().mean()),
            float((on_gold * chosen[..., blocks]).sum()), float(on_gold.sum())]


def analyse(files: list[Path]) -> list[dict]:
    """One row per (repository, task or "context", layer) with every variant's (recall, gold hit)."""
    rows = []
    for f in files:
        cap = torch.load(f, weights_only=False)
        meta, n = cap["meta"], cap["n"]
        for layer, k in enumerate(cap["keys"]):
            r = score_layer(cap["ctx_q"][layer], k, cap["picks"], meta, None)
            rows.append({"repo": cap["repo"], "task": "context", "layer": layer, **{v: r[v] for v in VARIANTS}})
            for qs in cap["questions"]:
                keys = torch.cat([k, qs["k"][layer]], 0)
                pos = torch.arange(n, n + qs["len"])
                r = score_layer(qs["q"][layer], keys, pos, meta, tuple(qs["gold"]))
                rows.append({"repo": cap["repo"], "task": qs["id"], "kind": qs["kind"], "depth": qs["depth"],
                             "layer": layer, **{v: r[v] for v in VARIANTS}})
        print(f"scored {cap['repo']}", flush=True)
    return rows


def summary(rows: list[dict], seed: int = 0, draws: int = 2000) -> dict:
    """Per variant: mean recall on question and context queries, the gold-block hit rate and the share of
    the gold blocks' attention kept, each with a bootstrap 95% interval over tasks (context rows: over
    repositories) and the paired difference against "mean"."""
    rng = np.random.default_rng(seed)
    out = {}
    for part in ("question", "context"):
        sel = [r for r in rows if (r["task"] == "context") == (part == "context")]
        units = sorted({(r["repo"], r["task"]) for r in sel})
        idx = {u: i for i, u in enumerate(units)}
        sums = {v: np.zeros((len(units), 4)) for v in VARIANTS}
        cnt = np.zeros(len(units))
        for r in sel:
            i = idx[(r["repo"], r["task"])]
            cnt[i] += 1
            for v in VARIANTS:
                sums[v][i] += r[v]
        metrics = {"recall": lambda a, cnt=cnt: a[:, 0] / cnt}
        if part == "question":
            metrics["gold"] = lambda a, cnt=cnt: a[:, 1] / cnt
            metrics["gold_mass"] = lambda a: a[:, 2] / np.maximum(a[:, 3], 1e-12)
        boots = rng.integers(0, len(units), (draws, len(units)))
        for metric, f in metrics.items():
            for v in VARIANTS:
                x, d = f(sums[v]), f(sums[v]) - f(sums["mean"])
                out[f"{part} {metric} {v}"] = {
                    "value": round(float(x.mean()), 4), "ci": _ci(x[boots].mean(1)),
                    "vs_mean": round(float(d.mean()), 4), "vs_mean_ci": _ci(d[boots].mean(1)), "units": len(units)}
    return out


def _ci(draws: np.ndarray) -> list[float]:
    return [round(float(q), 4) for q in np.percentile(draws, [2.5, 97.5])]


def per_layer(rows: list[dict]) -> str:
    """Attention missed by the op's gate (1 - recall of "mean") and by own + sink blocks alone, per layer."""
    lines = ["| layer | missed, question | missed, context | own + sink only, question |", "|---|---|---|---|"]
    for layer in sorted({r["layer"] for r in rows}):
        q = [r for r in rows if r["layer"] == layer and r["task"] != "context"]
        c = [r for r in rows if r["layer"] == layer and r["task"] == "context"]
        lines.append(f"| {layer} | {1 - np.mean([r['mean'][0] for r in q]):.3f} | "
                     f"{1 - np.mean([r['mean'][0] for r in c]):.3f} | {1 - np.mean([r['fixed'][0] for r in q]):.3f} |")
    return "\n".join(lines)


def table(s: dict) -> str:
    cols = ("question recall", "question gold", "question gold_mass", "context recall")
    head = ("| gate | question recall | vs mean | gold block selected | vs mean | gold attention kept | vs mean "
            "| context recall | vs mean |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for v in VARIANTS:
        cells = []
        for col in cols:
            e = s[f"{col} {v}"]
            cells += [f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]",
                      f"{e['vs_mean']:+.3f} [{e['vs_mean_ci'][0]:+.3f}, {e['vs_mean_ci'][1]:+.3f}]"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact(report: dict) -> str:
    """The report as JSON, row values to 5 digits, one row a line."""
    rows = [{k: [round(x, 5) for x in v] if isinstance(v, list) else v for k, v in r.items()} for r in report["rows"]]
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    return f'{{"summary": {json.dumps(report["summary"], indent=1)},\n"rows": [\n{body}\n]}}\n'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repos", nargs="*")
    ap.add_argument("-m", "--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--context-tokens", type=int, default=16384)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=192, help="context queries sampled per repository")
    ap.add_argument("--save", type=Path, help="capture into this directory (then score)")
    ap.add_argument("--load", type=Path, help="score the captures in this directory (no model)")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    if a.save:
        capture(a.repos, a.model, a.context_tokens, a.tasks, a.seed, a.samples, a.save)
    src = a.load or a.save
    if src is None:
        ap.error("give --save DIR (capture, then score) or --load DIR (score saved captures)")
    rows = analyse(sorted(src.glob("*.pt")))
    s = summary(rows, a.seed)
    print(table(s))
    print(per_layer(rows))
    if a.output:
        a.output.write_text(compact({"summary": s, "rows": rows}))


if __name__ == "__main__":
    main()
