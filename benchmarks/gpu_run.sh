#!/usr/bin/env bash
# The GPU benchmark driver: runs the pieces in priority order,
# each under `timeout` and a deadline taken from what is left of BUDGET, writing results and logs
# under $OUT as they finish.
#
#   bash benchmarks/gpu_run.sh [STAGE ...]        (repo root on the GPU machine)
#
# Stages, in the order given (default: load engine refs engine2 dream):
#   load     write the LLaDA-8B-shaped random bf16 checkpoint (sharded, /tmp/ckpt), bench_load_8b.py
#   engine   bench_engine.py on it, phases $PHASES1 (A: dual/none fixed, P: profiles, C: dual/none
#            threshold, D: prefix/dllm_cache/d2cache fixed, E: forced tokens/step 2 and 4, T: D's threshold)
#   refs     bench_refs.py: LLaDA generate.py, Fast-dLLM loops, dLLM-Cache hooks (needs .refs/ and
#            .refwhl/ carried: tests/golden/fetch_refs.sh and the pip download in benchmarks/README.md)
#   engine2  bench_engine.py, phases $PHASES2 (what the engine stage left, then F: prompt 1024 + gen 1024),
#            skipping configurations already recorded
#   dream    write the Dream-7B-shaped checkpoint and run bench_engine.py on it ($DREAM_PHASES)
# Files under $OUT: run.log, load_8b.json, engine_raw.jsonl, refs_raw.jsonl, prof.tgz (profiles, traces).
# SHAPE / DREAM_SHAPE / ENGINE_ARGS override the presets (the CPU smoke test uses the tiny ones).
set -u
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-520}
SHAPE=${SHAPE:-llada-8b}
DREAM_SHAPE=${DREAM_SHAPE:-dream-7b}
PHASES1=${PHASES1:-A,P,C,D,E,T}
PHASES2=${PHASES2:-A,C,D,E,T,F}
DREAM_PHASES=${DREAM_PHASES:-A,C,D}
RESERVE_REFS=${RESERVE_REFS:-110}
ENGINE_ARGS=${ENGINE_ARGS:-}
REFS_ARGS=${REFS_ARGS:-}
CK=${CK:-/tmp/ckpt}
PROF=/tmp/bench_prof
mkdir -p "$PROF"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
exec > >(tee -a "$OUT/run.log") 2>&1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(load engine refs engine2 dream)

echo "== $(date -u +%FT%TZ) stages: ${stages[*]}; budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c 'import torch, transformers, safetensors; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "safetensors", safetensors.__version__)'
df -h /tmp | tail -1; free -g | head -2

ckpt() {  # ckpt SHAPE -> writes $CK/SHAPE unless present
  [ -f "$CK/$1/config.json" ] && return 0
  timeout 200 python3 benchmarks/make_random_checkpoint.py --shape "$1" --out "$CK/$1" --report "$OUT/ckpt_$1.json"
}

engine() {  # engine SHAPE PHASES DEADLINE [extra args]
  local shape=$1 phases=$2 dl=$3; shift 3
  [ "$dl" -lt 30 ] && { echo "== skip engine $shape $phases: ${dl}s left"; return 0; }
  echo "== engine $shape phases $phases deadline ${dl}s (left $(left)s)"
  timeout $((dl + 40)) python3 benchmarks/bench_engine.py --ckpt "$CK/$shape" --shape-name "$shape" \
    --out "$OUT/engine_raw.jsonl" --phases "$phases" --deadline-s "$dl" --profile-dir "$PROF" --trace \
    --skip-existing $ENGINE_ARGS "$@"
  echo "== engine $shape rc=$? (left $(left)s)"
}

for st in "${stages[@]}"; do
  case $st in
    load)
      echo "== load (left $(left)s)"
      [ -f "$CK/$SHAPE/config.json" ] || rm -rf "$CK/$SHAPE"
      timeout 240 python3 benchmarks/bench_load_8b.py --ckpt "$CK/$SHAPE" --shape "$SHAPE" --out "$OUT/load_8b.json"
      echo "== load rc=$? (left $(left)s)";;
    engine)
      ckpt "$SHAPE"
      engine "$SHAPE" "$PHASES1" $(( $(left) - RESERVE_REFS - 25 ));;
    refs)
      l=$(( $(left) - 15 ))
      [ "$l" -lt 40 ] && { echo "== skip refs: ${l}s left"; continue; }
      ckpt "$SHAPE"
      echo "== refs (left $(left)s)"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/refsite .refwhl/*.whl \
        2>&1 | grep -v "WARNING: Running pip as" || true
      PYTHONPATH=/tmp/refsite TORCHDYNAMO_DISABLE=1 timeout "$l" python3 benchmarks/bench_refs.py \
        --ckpt "$CK/$SHAPE" --shape-name "$SHAPE" --out "$OUT/refs_raw.jsonl" --deadline-s $((l - 10)) $REFS_ARGS
      echo "== refs rc=$? (left $(left)s)";;
    engine2)
      ckpt "$SHAPE"
      engine "$SHAPE" "$PHASES2" $(( $(left) - ${RESERVE_AFTER:-20} ));;
    dream)
      [ "$(left)" -lt 90 ] && { echo "== skip dream: $(left)s left"; continue; }
      ckpt "$DREAM_SHAPE"
      engine "$DREAM_SHAPE" "$DREAM_PHASES" $(( $(left) - 20 )) --profile-batches 1;;
    *) echo "unknown stage $st";;
  esac
  tar czf "$OUT/prof.tgz" -C "$PROF" . 2>/dev/null
done
tar czf "$OUT/prof.tgz" -C "$PROF" . 2>/dev/null
ls -la "$OUT"
echo "== done in $(( $(date +%s) - T0 ))s"
