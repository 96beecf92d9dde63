#!/usr/bin/env bash
# One short training call on a borrowed GPU machine (the `device` tool), from the repository root:
# fine-tunes both shipped models side by side on the corpora that scripts/gpu_kit.py carried, for
# as many steps as fit in MINUTES, and leaves float32 exports and logs in $OUT.
#
#   here:  python scripts/gpu_kit.py pack --out .gpukit ... && python scripts/gpu_kit.py wheels --out .gpukit
#          (.gpukit/ is git-ignored, as the device tool's carried paths must be)
#   there: one call per part while the machine stays warm: each but the last carries its
#          .gpukit/part-N and runs `STAGE=1 bash scripts/gpu_run.sh` (unpack only, seconds);
#          the last carries the last part and runs `MINUTES=9 bash scripts/gpu_run.sh`
#          with timeout_s 600
#
# A part that did not arrive (the machine went back between calls) is simply missing from the
# data: the run trains on what is there. Settings (environment): MINUTES (wall time for this whole
# script, default 9), BATCH (padded seconds per batch, 480), LR (peak, 1e-3), WARMUP (100),
# WEIGHTS (corpus:weight, default "librispeech-train:3 synth-train:0.75"), AUGMENT
# (speed,gain,vtlp), WORKERS (loader processes per run, 7), DEVICE (cuda), MODELS (bigru gru),
# PROBE (steps timed before planning, 40).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
KIT=${KIT:-.gpukit}
DATA=${DATA:-/tmp/gpu-data}
RUNS=${RUNS:-/tmp/gpu-runs}
RES=${OUT:-/tmp/gpu-results}
PY=${PYTHON:-python3}
MINUTES=${MINUTES:-9}
BATCH=${BATCH:-480}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
WEIGHTS=${WEIGHTS:-"librispeech-train:3 synth-train:0.75"}
AUGMENT=${AUGMENT:-speed,gain,vtlp}
WORKERS=${WORKERS:-7}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-"bigru gru"}
PROBE=${PROBE:-40}
mkdir -p "$RES" "$RUNS"

wheels=$(ls -d "$KIT"/part-*/wheels 2>/dev/null | head -n 1)
if [ -n "$wheels" ] && ! $PY -c "import soundfile, jiwer" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY scripts/gpu_kit.py unpack "$KIT" "$DATA" || exit 1
[ "${STAGE:-0}" = 1 ] && exit 0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

train_args=()
for c in "$DATA"/*/; do
    name=$(basename "$c") w=1
    for kv in $WEIGHTS; do [ "${kv%%:*}" = "$name" ] && w=${kv#*:}; done
    train_args+=(--train "$DATA/$name:$w")
done
common=("${train_args[@]}" --batch-seconds "$BATCH" --lr "$LR" --warmup-steps "$WARMUP"
        --augment "$AUGMENT" --device "$DEVICE" --threads 1 --num-workers "$WORKERS")
spec() {  # name -> model arguments, initial weights
    case $1 in
        bigru) echo "--arch bigru --hidden-size 256 --num-layers 3 --init-from models/bigru.pt" ;;
        gru) echo "--arch gru --hidden-size 384 --num-layers 4 --init-from models/gru-stream.pt" ;;
    esac
}

# probe: PROBE steps of each model at once, as the real runs will share the machine
for m in $MODELS; do
    rm -rf "$RUNS/probe-$m"
    # shellcheck disable=SC2046
    $PY -m cli train "${common[@]}" $(spec "$m") --out "$RUNS/probe-$m" --max-steps "$PROBE" \
        --log-every $(( PROBE / 4 )) --save-every 100000 > "$RES/probe-$m.log" 2>&1 &
done
wait
left=$(( MINUTES * 60 - ($(date +%s) - T0) - 75 ))  # start-up, final checkpoint and export
pids=()
for m in $MODELS; do
    steps=$($PY scripts/gpu_kit.py plan "$RUNS/probe-$m/metrics.jsonl" --seconds "$left" --skip 1) || {
        tail -n 5 "$RES/probe-$m.log"; exit 1; }
    echo "$m: $steps steps planned for ${left} s"
    rm -rf "${RUNS:?}/$m"
    # shellcheck disable=SC2046
    timeout -s TERM $(( left + 45 )) $PY -m cli train "${common[@]}" $(spec "$m") --out "$RUNS/$m" \
        --max-steps "$steps" --save-every 100 --keep-last 2 > "$RES/train-$m.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for m in $MODELS; do
    last=$(ls "$RUNS/$m"/checkpoints/step-*.pt 2>/dev/null | tail -n 1)
    [ -n "$last" ] || { echo "$m: no checkpoint"; tail -n 5 "$RES/train-$m.log"; continue; }
    $PY -m cli export --float32 "$last" "$RES/$m-gpu.pt"
    cp "$RUNS/$m/metrics.jsonl" "$RES/metrics-$m.jsonl"
    tail -n 2 "$RES/train-$m.log"
done
echo "done in $(( $(date +%s) - T0 )) s"
