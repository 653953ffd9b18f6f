#!/usr/bin/env bash
# moba-ask eval on CPU: two real repositories (PyPI sdists made git repos), smollm2-135m at 4K and
# ~8K context tokens, qwen2.5-coder-1.5b at 8K and 16K, plus MoBA block-size/top-k/sink variants.
#
# Usage: bench/eval_cpu.sh STAGE [OUT]   STAGE: repos | smollm | qwen8k | qwen16k | variants | table
#   repos:    fetch itsdangerous 2.2.0 and packaging 24.2 sdists into $REPOS and git-commit them
#   table:    one markdown table of every OUT/*.json run (the -o documents), on stdout; the last
#             columns rank the gold file among the routing citations alone (text citations left out)
#             and count the different first routing citations (path:line) over the tasks
#   others:   run the evals; each run writes OUT/<name>.md (table), .json (-o) and .err (progress)
# Env: REPOS (default /work/evalrepos), MOBA (default moba-ask), OMP_NUM_THREADS (default 1: on a
# shared 2-core machine, two torch threads stall on every op whenever another process holds a core;
# one measured case: 4.4 s vs 0.29 s for the same routing-capture call).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
STAGE=${1:?stage: repos, smollm, qwen8k, qwen16k or variants}
OUT=${2:-/work/evalruns}
REPOS=${REPOS:-/work/evalrepos}
MOBA=${MOBA:-moba-ask}
mkdir -p "$OUT"

fetch() {  # fetch NAME VERSION: sdist -> $REPOS/NAME-VERSION as a git repository
  mkdir -p "$REPOS/sdists"
  pip download --no-deps --no-binary=:all: "$1==$2" -d "$REPOS/sdists"
  tar xzf "$REPOS/sdists/$1-$2.tar.gz" -C "$REPOS"
  (cd "$REPOS/$1-$2" && git init -q && git add -A && git -c user.name=eval -c user.email=eval@localhost commit -qm sdist)
}

run() {  # run NAME REPO MODEL CONTEXT TASKS [extra flags...]
  local name=$1 repo=$2 model=$3 ctx=$4 tasks=$5
  shift 5
  echo "$(date -u +%FT%TZ) start $name" >&2
  local t0=$SECONDS
  $MOBA eval "$REPOS/$repo" --model "$model" --context-tokens "$ctx" --tasks "$tasks" --seed 0 \
    --max-new-tokens 48 -o "$OUT/$name.json" "$@" > "$OUT/$name.md" 2> "$OUT/$name.err"
  echo "$(date -u +%FT%TZ) done $name in $((SECONDS - t0)) s" >&2
}

ITS=itsdangerous-2.2.0
PKG=packaging-24.2
case $STAGE in
  repos)
    fetch itsdangerous 2.2.0
    fetch packaging 24.2 ;;
  smollm)
    run smollm-its-4k $ITS smollm2-135m 4096 12
    run smollm-pkg-4k $PKG smollm2-135m 4096 12
    run smollm-its-8k $ITS smollm2-135m 7600 12
    run smollm-pkg-8k $PKG smollm2-135m 7600 12 ;;
  qwen8k)
    run qwen-its-8k $ITS qwen2.5-coder-1.5b 8192 8
    run qwen-pkg-8k $PKG qwen2.5-coder-1.5b 8192 8 ;;
  qwen16k)
    run qwen-its-16k $ITS qwen2.5-coder-1.5b 16384 6
    run qwen-pkg-16k $PKG qwen2.5-coder-1.5b 16384 6 ;;
  variants)
    for repo in its:$ITS pkg:$PKG; do
      run "qwen-${repo%%:*}-8k-b512k3" "${repo#*:}" qwen2.5-coder-1.5b 8192 8 --attention moba-hybrid,moba \
        --block-size 512 --top-k 3
    done
    for repo in its:$ITS pkg:$PKG; do
      for v in "b512k3 --block-size 512 --top-k 3" "b128k12 --block-size 128 --top-k 12" "sink0 --sink-blocks 0"; do
        # shellcheck disable=SC2086
        run "smollm-${repo%%:*}-8k-${v%% *}" "${repo#*:}" smollm2-135m 7600 12 --attention moba-hybrid,moba ${v#* }
      done
    done ;;
  table)
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
cols = ["answer_exact", "hit_at_1", "hit_at_3", "mrr", "line_precision", "line_recall", "bogus_citations",
        "bm25_hit_at_1", "random_hit_at_1"]
print("| run | pack tokens | tasks (fn/def) | config | block/top-k/sinks | dense layers | prefill s | questions s | "
      "exact | hit@1 | hit@3 | MRR | line P | line R | bogus | BM25@1 | random@1 | routing-only hit@1 | "
      "distinct top routing citations |")
print("|" + "---|" * 19)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(path))
    m, n_fn = d["meta"], sum(t["kind"] == "function" for t in d["tasks"])
    for c in d["configs"]:
        x, mt = m["configs"][c["name"]], c["metrics"]
        vals = [f"{mt[k]:.3f}" if isinstance(mt[k], float) else str(mt[k]) for k in cols]
        ranks = [t["results"][c["name"]]["routing_rank"] for t in d["tasks"]]
        vals.append(f"{sum(r == 1 for r in ranks) / len(ranks):.3f}")
        tops = {next(((x["path"], x["start_line"]) for x in t["results"][c["name"]]["citations"]
                      if x["source"] != "text"), None) for t in d["tasks"]}
        vals.append(f"{len(tops)} of {len(d['tasks'])}")
        print(f"| {os.path.basename(path)[:-5]} | {m['pack_tokens']:,} | {len(d['tasks'])} ({n_fn}/{len(d['tasks']) - n_fn}) "
              f"| {c['name']} | {c['block_size']}/{c['top_k']}/{x['sink_blocks']} | {x['dense_layers']} "
              f"| {x['prefill_s']:.0f} | {x['questions_s']:.0f} | " + " | ".join(vals) + " |")
PY
    ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
