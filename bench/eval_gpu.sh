#!/usr/bin/env bash
# moba-ask eval on the GPU: every evaluation repository of bench/eval_repos.py in one process (one model
# load), both context sizes, every config, the same seeded tasks; the -o document is rewritten after each
# repository and size, so a run cut short keeps what it measured (bench/eval_merge.py joins split runs).
#
# Usage: bench/eval_gpu.sh OUT [extra moba-ask eval flags...]
#   writes OUT/eval.md (tables), OUT/eval.json (-o document), OUT/eval.err (progress, a line every ~10 s)
# Env: REPOS    directory of NAME-VERSION/<package> trees [default: evalrepos; unpacked from
#               evalrepos.tgz (bench/eval_repos.py bundle) when absent]
#      MODEL    [default: qwen2.5-coder-1.5b]        SIZES    [default: 16384,30000]
#      TASKS    in all per size, split over the repositories [default: 150]
#      CONFIGS  [default: dense,moba,moba:qa=dense,moba:qa=dense+dense=last3]
#      MAX_NEW  [default: 48]   SEED [default: 0]   MOBA [default: moba-ask]   NAME [default: eval]
set -euo pipefail
OUT=${1:?usage: bench/eval_gpu.sh OUT [extra eval flags]}
shift
REPOS=${REPOS:-evalrepos}
MODEL=${MODEL:-qwen2.5-coder-1.5b}
SIZES=${SIZES:-16384,30000}
TASKS=${TASKS:-150}
CONFIGS=${CONFIGS:-dense,moba,moba:qa=dense,moba:qa=dense+dense=last3}
MAX_NEW=${MAX_NEW:-48}
SEED=${SEED:-0}
MOBA=${MOBA:-moba-ask}
NAME=${NAME:-eval}
if [ ! -d "$REPOS" ]; then
  mkdir -p "$REPOS" && tar xzf evalrepos.tgz -C "$REPOS"
fi
mkdir -p "$OUT"
PATHS=$(python -m bench.eval_repos paths "$REPOS")
echo "$(date -u +%FT%TZ) start: $MOBA eval $PATHS --model $MODEL --context-tokens $SIZES --tasks $TASKS" \
  "--attention $CONFIGS --max-new-tokens $MAX_NEW --seed $SEED $*" >&2
# shellcheck disable=SC2086  # PATHS is a list of directories without spaces
$MOBA eval $PATHS --model "$MODEL" --context-tokens "$SIZES" --tasks "$TASKS" --attention "$CONFIGS" \
  --max-new-tokens "$MAX_NEW" --seed "$SEED" -o "$OUT/$NAME.json" "$@" > "$OUT/$NAME.md" 2> "$OUT/$NAME.err"
echo "$(date -u +%FT%TZ) done: $OUT/$NAME.md" >&2
