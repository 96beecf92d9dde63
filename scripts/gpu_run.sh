#!/usr/bin/env bash
# One short training call on a borrowed GPU machine (the `device` tool), from the repository root:
# fine-tunes both shipped models side by side on the corpora that scripts/gpu_kit.py carried, for
# as many steps as fit in MINUTES, and leaves float32 exports and logs in $OUT (6 files).
#
#   here:  python scripts/gpu_kit.py pack --out .gpukit ... && python scripts/gpu_kit.py wheels --out .gpukit
#          (.gpukit/ is git-ignored, as the device tool's carried paths must be). Each call sends
#          the tracked repository (~20 MB) plus one part: keep parts under ~40 MB (64 MiB in all).
#   there: one call per part, in reverse order (part-N first, part-1, the most important data,
#          last), each while the machine is still warm (the reply says warm: true; it goes back
#          30 s after a call). Each call but the last carries its .gpukit/part-K and runs
#          `STAGE=1 bash scripts/gpu_run.sh` (lists what has arrived, seconds). The last carries
#          .gpukit/part-1 and runs `MINUTES=M bash scripts/gpu_run.sh` with timeout_s 60 M + 30,
#          M = (device budget left in s - 60) / 60 rounded down, at most 9.
#
# Without every part of the kit (the machine went back between calls) the run stops before
# training, unless ALLOW_PARTIAL=1. Settings (environment): MINUTES (whole minutes for this
# script, default 9), BATCH (padded seconds per batch, 480), LR (peak, 1e-3), WARMUP (100),
# WEIGHTS (corpus:weight, default "librispeech-train:3 synth-train:0.75"), AUGMENT
# (speed,gain,vtlp), WORKERS (loader processes per run, 7), DEVICE (cuda), MODELS (bigru gru),
# PROBE (steps timed before planning, at least 8, default 40; the run continues from them).
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
die() { echo "gpu_run: $*" >&2; exit 1; }
[ "$PROBE" -ge 8 ] 2>/dev/null || die "PROBE must be a whole number of at least 8"
[ "$MINUTES" -ge 1 ] 2>/dev/null || die "MINUTES must be a whole number of at least 1"
spec() {  # model name -> architecture arguments and the shipped weights it starts from
    case $1 in
        bigru) echo "--arch bigru --hidden-size 256 --num-layers 3|models/bigru.pt" ;;
        gru) echo "--arch gru --hidden-size 384 --num-layers 4|models/gru-stream.pt" ;;
        *) return 1 ;;
    esac
}
for m in $MODELS; do spec "$m" >/dev/null || die "unknown model $m in MODELS (bigru, gru)"; done

expected=$(cat "$KIT"/part-*/kit.json 2>/dev/null | $PY -c "import json,sys; print(max(json.loads(l)['parts'] for l in sys.stdin))") \
    || die "$KIT: no part with a kit.json arrived"
arrived=$(ls -d "$KIT"/part-* | wc -l)
echo "kit: $arrived of $expected parts here: $(cd "$KIT" && echo part-*)"
[ "${STAGE:-0}" = 1 ] && exit 0
[ "$arrived" -ge "$expected" ] || [ "${ALLOW_PARTIAL:-0}" = 1 ] || die "parts are missing (ALLOW_PARTIAL=1 trains on what is here)"

mkdir -p "$RES" "$RUNS"
wheels=$(ls -d "$KIT"/part-*/wheels 2>/dev/null | head -n 1)
if [ -n "$wheels" ] && ! $PY -c "import soundfile, jiwer" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || die "installing the wheels failed"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
rm -rf "$DATA"
$PY scripts/gpu_kit.py unpack "$KIT" "$DATA" || die "unpacking failed"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

train_args=()
for c in "$DATA"/*/; do
    name=$(basename "$c") w=1
    for kv in $WEIGHTS; do [ "${kv%%:*}" = "$name" ] && w=${kv#*:}; done
    train_args+=(--train "$DATA/$name:$w")
done
common=("${train_args[@]}" --batch-seconds "$BATCH" --lr "$LR" --warmup-steps "$WARMUP"
        --augment "$AUGMENT" --device "$DEVICE" --threads 1 --num-workers "$WORKERS")

# probe: PROBE steps of each model at once (as the real runs will share the machine); the real
# runs continue these runs with --resume and a step plan that fits the time left
for m in $MODELS; do
    s=$(spec "$m")
    rm -rf "${RUNS:?}/$m"
    # shellcheck disable=SC2086
    timeout -s TERM 240 $PY -m cli train "${common[@]}" ${s%|*} --init-from "${s#*|}" --out "$RUNS/$m" \
        --max-steps "$PROBE" --log-every $(( PROBE / 4 )) --save-every 100 --keep-last 2 \
        > "$RES/train-$m.log" 2>&1 &
done
wait
left=$(( MINUTES * 60 - ($(date +%s) - T0) - 75 ))  # start-up, final checkpoint and export
pids=()
if [ "$left" -lt 60 ]; then
    echo "only ${left} s left after the probes: no further training"
else
    for m in $MODELS; do
        s=$(spec "$m")
        steps=$($PY scripts/gpu_kit.py plan "$RUNS/$m/metrics.jsonl" --seconds "$left" --skip 1) || {
            echo "$m: the probe did not finish:"; tail -n 5 "$RES/train-$m.log"; continue; }
        steps=$(( steps + PROBE ))
        echo "$m: $steps steps planned (${left} s after the probe)"
        # shellcheck disable=SC2086
        timeout -s TERM $(( left + 45 )) $PY -m cli train "${common[@]}" ${s%|*} --out "$RUNS/$m" \
            --max-steps "$steps" --resume >> "$RES/train-$m.log" 2>&1 &
        pids+=($!)
    done
fi
for p in "${pids[@]}"; do wait "$p"; done
for m in $MODELS; do
    last=$(ls "$RUNS/$m"/checkpoints/step-*.pt 2>/dev/null | tail -n 1)
    [ -n "$last" ] || { echo "$m: no checkpoint"; tail -n 5 "$RES/train-$m.log"; continue; }
    $PY -m cli export --float32 "$last" "$RES/$m-gpu.pt"
    cp "$RUNS/$m/metrics.jsonl" "$RES/metrics-$m.jsonl"
    tail -n 2 "$RES/train-$m.log"
done
echo "done in $(( $(date +%s) - T0 )) s"
