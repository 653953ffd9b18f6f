"""One rank of tests/agent/test_parallel.py (run by it, alone or as a rank of agent.parallel.launch):
load MODEL_DIR through agent.runtime, prefill a context, record the routing of a question and a greedy
answer, decode it again on the static-shape path, then sample an answer with no seed; rank 0 (or the lone process) saves what it saw to OUT.
Usage: python tests/agent/tp_worker.py MODEL_DIR OUT
"""

import sys

import torch

from agent.config import AskConfig
from agent.engine import Sampling
from agent.runtime import load_runtime
from moba.capture import RoutingRecorder, capture_routing

CONTEXT, QUESTION, ANSWER = 230, 21, 12


def ids_of(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model_dir: str) -> dict:
    cfg = AskConfig(model=model_dir, device="cpu", attention="moba", block_size=16, top_k=3, sink_blocks=1,
                    dense_layers=(-1,), qa_policy="moba", chunk_size=64, dtype="float32")  # as the ranks load it
    rt = load_runtime(cfg)
    engine = rt.make_engine(CONTEXT + QUESTION + 2 * ANSWER)
    vocab = engine.config.vocab_size
    weights = torch.rand(engine.config.num_hidden_layers, engine.config.num_attention_heads,
                         generator=torch.Generator().manual_seed(7))
    context_logits = engine.prefill(ids_of(CONTEXT, 1, vocab))
    rec = RoutingRecorder(start=CONTEXT, per_head=True, head_weights=weights, tail_start=CONTEXT + QUESTION)
    with capture_routing(rec):
        question_logits = engine.prefill(ids_of(QUESTION, 2, vocab))
        greedy = engine.generate(question_logits, Sampling(max_new_tokens=ANSWER))
    engine.truncate(CONTEXT + QUESTION)
    engine.decode = "static"  # the static-shape step a CUDA graph captures, run eagerly
    static = engine.generate(question_logits, Sampling(max_new_tokens=ANSWER))
    engine.decode = "dynamic"
    engine.truncate(CONTEXT + QUESTION)
    sampled = engine.generate(question_logits, Sampling(max_new_tokens=ANSWER, temperature=5.0, top_p=1.0))
    layers = sorted(rec.records)
    return dict(context_logits=context_logits, question_logits=question_logits, greedy=greedy, static=static, sampled=sampled,
                key_mass=rec.key_mass, tail_mass=rec.tail_mass, mass=rec.evidence("mass"), gate=rec.evidence("gate"),
                blocks=[torch.cat([r.blocks for r in rec.records[k]], 1) for k in layers],
                scores=[torch.cat([r.scores for r in rec.records[k]], 1) for k in layers],
                kv_heads=engine.kv_heads, local_kv_heads=engine.cache.layers[0].keys.shape[1], notes=rt.notes)


if __name__ == "__main__":
    import torch.distributed as dist

    seen = run(sys.argv[1])
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(seen, f"{sys.argv[2]}.rank{rank}")
