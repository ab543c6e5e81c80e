#!/usr/bin/env bash
# The GPU column of bench/README.md in one call:
#
#   bench/gpu.sh OUTDIR [--smoke]
#
# Writes OUTDIR/env.jsonl (the machine: GPU name and memory, library versions, whether faiss sees
# a GPU, CPUs), then runs each step under its own time budget (`timeout`), printing one progress
# line per step to stderr and teeing the step's JSON lines into OUTDIR/<step>.jsonl (stdout and
# stderr of the step in OUTDIR/<step>.log). Every <step>.jsonl ends with one status record,
# {"step", "status": "passed"|"failed"|"timeout"|"skipped", "reason", "seconds", "budget_s"};
# OUTDIR/summary.jsonl gathers them and counts them. A step that fails or runs out of time is
# recorded and the next one runs; a step whose prerequisite is missing is skipped with the reason.
#
#   1 device            pytest tests/test_device.py (CUDA against the CPU; counts from junit XML)
#   2 prepare           the demo corpus (demo/corpus.py) and a randomly initialised model of Gemma 3
#                       270M's exact configuration (bench/gpu_model.py), the real Gemma 3 tokenizer
#                       if .whl/gemma3-270m-tokenizer.tar.xz was carried, else a BPE trained there
#   3 ingestion         bench/ingestion.py --device cuda, random JumpReLU SAE of 16,384, L0 64
#   4 cooccurrence_16k  bench/cooccurrence.py --device cuda, F 16,384, 1,500 active per block
#   5 cooccurrence_65k  the same at F 65,536, 3,000 active (saecat and the Python baseline)
#   6 blockpairs        bench/blockpairs.py --device cuda: the complete 16k table out of core and in
#                       memory (tables compared), then out of core alone, top 64 partners, 65k and 131k
#   7 neighbors_gpu     bench/neighbors.py, 16k and 65k catalogs, exact search on faiss-gpu
#   8 neighbors_cpu     the same searches with SAECAT_INDEX_DEVICE=cpu on the same machine
#   9 ray               bench/ray_fanout.py --device cuda over 1, 2, ... GPUs (2 or more GPUs only)
#
# The budgets (seconds) add up to 500 (blockpairs' 60 taken from ingestion and Ray, 30 each), and
# all steps together stop at GPU_SH_TOTAL (510, 8.5 minutes, the env record included). Exit status
# 0 when every step that ran passed, else 1.
#
# --smoke (or SMOKE=1) runs every step at tiny sizes on the CPU (device cpu; a tiny Gemma 3 whose
# tokenizer is trained on the spot; Ray on CPU workers if ray is installed), writing the same
# files: tests/test_bench_gpu.py runs it. Knobs: PYTHON (default python3), GPU_SH_STEPS (a list of
# step names: the others are recorded as skipped), GPU_SH_BUDGET_<step> (seconds),
# GPU_SH_TOTAL, GPU_SH_TOKENIZER (a tokenizer folder or .tar.xz for step 2), GPU_SH_FACTS (tests
# only: "CUDA=1 GPUS=1 FAISS_GPUS=0 RAY=0" overrides what the env step found).
set -euo pipefail

usage() { echo "usage: bench/gpu.sh OUTDIR [--smoke]" >&2; exit 2; }
OUTDIR="" SMOKE=${SMOKE:-0}
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [[ -z $OUTDIR ]] || usage; OUTDIR=$arg ;;
  esac
done
[[ -n $OUTDIR ]] || usage

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
OUT=$(cd "$OUTDIR" && pwd)
rm -f "$OUT"/*.jsonl "$OUT"/*.log "$OUT"/*.xml
# The model loader refuses a temporary folder whose path names a model family (ingest/model.py).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/saecat-gpu-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# sae-lens imports wandb at import time and uses it only to train: an empty stand-in where it is missing.
if ! "$PY" -c "import wandb" >/dev/null 2>&1; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/bench/gpu_stubs"
fi

TOTAL=${GPU_SH_TOTAL:-510}
MIN_BUDGET=10
STEPS=(device prepare ingestion cooccurrence_16k cooccurrence_65k blockpairs neighbors_gpu neighbors_cpu ray)
declare -A BUDGET=([device]=45 [prepare]=40 [ingestion]=70 [cooccurrence_16k]=50 [cooccurrence_65k]=45
                   [blockpairs]=60 [neighbors_gpu]=90 [neighbors_cpu]=40 [ray]=60)
declare -A LABEL=([device]="tests/test_device.py" [prepare]="corpus + random Gemma 3 270M"
                  [ingestion]="ingestion overhead, 16k SAE" [cooccurrence_16k]="co-occurrence 16k"
                  [cooccurrence_65k]="co-occurrence 65k" [blockpairs]="out-of-core pair pass 16k, 65k+131k top 64"
                  [neighbors_gpu]="neighbours 16k+65k, faiss on the GPU"
                  [neighbors_cpu]="neighbours 16k+65k, faiss on the CPU" [ray]="Ray fan-out over GPUs")
declare -A STATUS=()
SELECTED=" ${GPU_SH_STEPS:-${STEPS[*]}} "
SELECTED=${SELECTED//,/ }
START=$SECONDS
N=${#STEPS[@]}
I=0

say() { printf '%s\n' "$*" >&2; }

# record STEP STATUS REASON [SECONDS BUDGET [LOG]]: the status line, appended to STEP.jsonl and
# summary.jsonl (a failed step's reason ends with the last line of its LOG).
record() {
  local args=(status "$1" "$2" --reason "$3")
  [[ -n ${4:-} ]] && args+=(--seconds "$4" --budget "$5")
  [[ -n ${6:-} ]] && args+=(--log "$6")
  "$PY" "$ROOT/bench/gpu_report.py" "${args[@]}" | tee -a "$OUT/$1.jsonl" >>"$OUT/summary.jsonl"
  STATUS[$1]=$2
}

# step NAME REASON-TO-SKIP COMMAND...: runs COMMAND under the step's budget unless REASON is set.
step() {
  local name=$1 skip=$2
  shift 2
  I=$((I + 1))
  local var="GPU_SH_BUDGET_$name"
  local budget=${!var:-${BUDGET[$name]}}
  local left=$((TOTAL - (SECONDS - START)))
  ((budget <= left)) || budget=$left
  if [[ $SELECTED != *" $name "* ]]; then skip="not selected (GPU_SH_STEPS)"; fi
  if [[ -z $skip ]] && ((left < MIN_BUDGET)); then
    skip="out of time: ${left} s left of GPU_SH_TOTAL=${TOTAL}"
  fi
  if [[ -n $skip ]]; then
    say "[$I/$N] ${LABEL[$name]}: skipped: $skip"
    record "$name" skipped "$skip"
    return 0
  fi
  printf '[%d/%d] %s (budget %d s) ... ' "$I" "$N" "${LABEL[$name]}" "$budget" >&2
  local log="$OUT/$name.log" t0=$SECONDS rc=0
  printf '$ %s\n' "$*" >"$log"
  set +e
  timeout --kill-after=10 "$budget" "$@" 2>>"$log" | tee -a "$log" | { grep --line-buffered '^{' || true; } \
    | tee -a "$OUT/$name.jsonl"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    say "done in $took s"
    record "$name" passed "" "$took" "$budget"
  elif ((rc == 124 || rc == 137)); then
    say "timed out after $took s"
    record "$name" timeout "ran past its budget of $budget s" "$took" "$budget" "$log"
  else
    say "failed (exit $rc) after $took s; see $name.log"
    record "$name" failed "exit $rc" "$took" "$budget" "$log"
  fi
}

# Each prints the reasons a step cannot run, the first one first; the step is skipped with the first.
need_cuda() { ((SMOKE || CUDA)) || echo "no CUDA device"; }
need_prepared() {
  need_cuda
  [[ ${STATUS[prepare]:-} == passed ]] || echo "no model: the prepare step did not pass"
}
# The model, SAE and text of the ingestion and Ray steps.
CORPUS=$WORK/stdlib.jsonl
MODEL=$WORK/random-270m
SAE=$ROOT/demo/sae  # the demo's TopK SAE (3,072 latents, blocks.5.hook_resid_post, d_in 640)

# ------------------------------------------------------------------ the machine
say "bench/gpu.sh: $( ((SMOKE)) && echo "smoke run (tiny sizes, CPU)" || echo "full run" ), results in $OUT"
CUDA=0 GPUS=0 FAISS_GPUS=0 RAY=0
if timeout 120 "$PY" "$ROOT/bench/gpu_report.py" env --shell "$WORK/facts.sh" >"$OUT/env.jsonl" 2>"$OUT/env.log"; then
  # shellcheck disable=SC1091
  source "$WORK/facts.sh"
else
  echo '{"step": "env", "status": "failed", "reason": "bench/gpu_report.py env failed: see env.log"}' >>"$OUT/env.jsonl"
fi
# GPU_SH_FACTS="CUDA=1 GPUS=1 FAISS_GPUS=0 RAY=0" pretends, for tests of the skip logic on a CPU.
for fact in ${GPU_SH_FACTS:-}; do
  case ${fact%%=*} in CUDA|GPUS|FAISS_GPUS|RAY) declare "${fact%%=*}=${fact#*=}" ;; *) usage ;; esac
  say "GPU_SH_FACTS: $fact"
done
cat "$OUT/env.jsonl"
say "env: CUDA $CUDA, GPUs $GPUS, faiss GPUs $FAISS_GPUS, ray $RAY ($((SECONDS - START)) s)"
if ((SMOKE)); then DEVICE=cpu; else DEVICE=cuda; fi

# ------------------------------------------------------------------ 1 device tests
device_tests() {
  local rc=0
  "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_device.py" --junitxml="$OUT/device.xml" >&2 || rc=$?
  [[ -f $OUT/device.xml ]] && "$PY" "$ROOT/bench/gpu_report.py" junit "$OUT/device.xml"
  return "$rc"
}
export -f device_tests
export PY OUT ROOT
step device "$(need_cuda)" bash -c device_tests

# ------------------------------------------------------------------ 2 prepare
TOKENIZER=${GPU_SH_TOKENIZER:-$ROOT/.whl/gemma3-270m-tokenizer.tar.xz}
if ((SMOKE)); then
  model_args=(--tiny --corpus "$CORPUS" --bpe-docs 400)
elif [[ -e $TOKENIZER ]]; then
  model_args=(--tokenizer "$TOKENIZER")
else
  model_args=(--corpus "$CORPUS")
fi
# The corpus: demo/corpus.py over the standard library; in a smoke run, over its email package
# (~200 documents, plenty for 600 tokens, in a second).
corpus() {
  if ((SMOKE)); then
    "$PY" -c 'import json, sys, sysconfig; from pathlib import Path; from demo.corpus import documents
docs = list(documents(root=Path(sysconfig.get_paths()["stdlib"]) / "email"))
Path(sys.argv[1]).write_text("".join(json.dumps(d) + "\n" for d in docs))
print(json.dumps({"documents": len(docs), "root": "email"}))' "$CORPUS"
  else
    "$PY" -m demo.corpus "$CORPUS"
  fi
}
prepare() {
  set -o pipefail
  corpus | sed 's/^{/{"step": "corpus", /' && "$PY" "$ROOT/bench/gpu_model.py" "$MODEL" "$@"
}
export -f corpus prepare
export SMOKE CORPUS MODEL
step prepare "$(need_cuda)" bash -c 'prepare "$@"' prepare "${model_args[@]}"

# ------------------------------------------------------------------ 3 ingestion overhead
if ((SMOKE)); then
  sizes=(--smoke --width 512 --l0 16 --threads 1)
else
  sizes=(--width 16384 --l0 64 --tokens 65536 --repeats 5)
fi
step ingestion "$(need_prepared | head -1)" "$PY" bench/ingestion.py --device "$DEVICE" --model "$MODEL" --sae "$SAE" \
  --dataset "$CORPUS" "${sizes[@]}" --end-to-end

# ------------------------------------------------------------------ 4, 5 co-occurrence
if ((SMOKE)); then
  c16=(--smoke --numpy-blocks 12) c65=(--smoke --methods saecat python)
else
  # numpy's cost per block is constant (~40 ms at 16k): 64 blocks say it; Python's is ~1 s at 16k, ~4 s at 65k.
  c16=(--features 16384 --blocks 2048 --active 1500 --repeats 3 --numpy-blocks 64 --python-blocks 4 --check-blocks 4)
  c65=(--features 65536 --blocks 512 --active 3000 --repeats 3 --methods saecat python --python-blocks 1
       --check-blocks 1)
fi
step cooccurrence_16k "$(need_cuda)" "$PY" bench/cooccurrence.py --device "$DEVICE" "${c16[@]}"
step cooccurrence_65k "$(need_cuda)" "$PY" bench/cooccurrence.py --device "$DEVICE" "${c65[@]}"

# ------------------------------------------------------------------ 6 out-of-core pair pass
# 256 blocks and a 4 GB budget, as bench/README.md's CPU rows. The complete table only at 16k,
# where both paths hold it: there the GPU's dense pass is checked against the in-memory tiles on
# the GPU. Wider, the out-of-core pass alone with the top 64 partners, as the README's 131k row:
# the complete table (341M pairs at 65k) would spend the budget moving and hashing pairs.
if ((SMOKE)); then
  bp_both=(--smoke) bp_wide=(--smoke --top-partners 8)
else
  bp_both=(--features 16384 --blocks 256)
  bp_wide=(--features 65536 131072 --blocks 256 --top-partners 64)
fi
# blockpairs ARGS... -- ARGS...: bench/blockpairs.py with each list of arguments in turn.
blockpairs() {
  local first=()
  while [[ $1 != -- ]]; do first+=("$1"); shift; done
  shift
  "$PY" bench/blockpairs.py "${first[@]}" && "$PY" bench/blockpairs.py "$@"
}
export -f blockpairs
step blockpairs "$(need_cuda)" bash -c 'blockpairs "$@"' blockpairs --device "$DEVICE" "${bp_both[@]}" -- \
  --device "$DEVICE" --only outofcore "${bp_wide[@]}"

# ------------------------------------------------------------------ 7, 8 neighbours
# 16k and 65k only (the 1M catalog takes minutes to write and index); exact search only (the HNSW
# build is CPU work, and FAISS has no GPU HNSW): DuckDB's scan, FAISS exact per query and in
# batches of 1,000, neighbors().
nb=(--sizes 16k 65k --dir "$WORK/neighbors" --repeats 3)
((SMOKE)) && nb+=(--smoke --threads 1)
faiss_gpu() {
  need_cuda
  ((SMOKE || FAISS_GPUS > 0)) || echo "faiss sees no GPU (faiss-gpu missing, or it cannot load its CUDA 12 libraries)"
}
step neighbors_gpu "$(faiss_gpu | head -1)" "$PY" bench/neighbors.py "${nb[@]}" --only duckdb exact neighbors
# DuckDB's scan does not use the GPU: the CPU step times it only if the GPU step did not, and
# then builds the catalogs too, in the GPU step's time.
if [[ ${STATUS[neighbors_gpu]} == passed ]]; then
  cpu_only=(exact neighbors)
else
  cpu_only=(duckdb exact neighbors)
  : "${GPU_SH_BUDGET_neighbors_cpu:=$((BUDGET[neighbors_cpu] + BUDGET[neighbors_gpu] - 10))}"
fi
step neighbors_cpu "$(need_cuda)" env SAECAT_INDEX_DEVICE=cpu "$PY" bench/neighbors.py "${nb[@]}" \
  --only "${cpu_only[@]}"

# ------------------------------------------------------------------ 9 Ray over GPUs
ray_skip() {
  need_cuda
  ((SMOKE || GPUS >= 2)) || echo "fewer than 2 GPUs ($GPUS)"
  ((RAY)) || echo "ray is not installed"
  need_prepared
}
if ((SMOKE)); then
  ray_args=(--smoke --device cpu --workers 1 --tokens 600 --batch-tokens 600)
else
  workers=()
  for w in 1 2 4 8; do ((w <= GPUS)) && workers+=("$w"); done
  ray_args=(--device cuda --workers "${workers[@]:-1}" --tokens 65536 --repeats 1 --batch-tokens 8192)
fi
step ray "$(ray_skip | head -1)" "$PY" bench/ray_fanout.py --model "$MODEL" --sae "$SAE" --dataset "$CORPUS" \
  "${ray_args[@]}"

# ------------------------------------------------------------------ summary
"$PY" "$ROOT/bench/gpu_report.py" summary "$OUT" | tee -a "$OUT/summary.jsonl" >/dev/null
say "bench/gpu.sh: $(tail -1 "$OUT/summary.jsonl") in $((SECONDS - START)) s"
for s in "${STEPS[@]}"; do
  [[ ${STATUS[$s]} == failed || ${STATUS[$s]} == timeout ]] && exit 1
done
exit 0
