#!/usr/bin/env bash
# What only a GPU can measure, as stages that fit one call of a time-limited GPU lease.
#
#   bash experiments/gpu_call.sh DATA_DIR STAGE[:MINUTES] ...
#   bash experiments/gpu_call.sh .gpu/data paper:9        # one 10-minute call
#   bash experiments/gpu_call.sh .gpu/data accuracy:7
#
# Measured on an H200 (2026-11-26): the `accuracy` call took 4.2 minutes, wheels included (early
# stopping ended it; the 17 steps compiled cold in 112 s), `memory` more than the 3.4 minutes it
# was given (its shapes took 2.3), and the full-size paper table did not fit: its probe alone took
# over 5.3 minutes, hence the `--gpu` preset below. On 2026-11-27 `paper:9` (the `--gpu` preset)
# took 7.9 minutes, its probe 2.3-2.5 of them, a second call finishing its sweep 2.8 (see
# PAPER_WORKDIR), and `kernels` 3.3; with every run in a process of its own and the committed
# probe's estimates, 6.5 and 3.1 minutes. Other stage times are estimates: the
# deadline keeps a call inside its limit whatever they turn out to be.
#
# DATA_DIR holds the IAM-OnDB export `iam_ondb.npz` (`python -m handwriting build ...`, README
# "On a GPU machine without TFDS or network"). The export alone is read: copy that one file (49 MB)
# to the GPU machine, not the folder the build wrote it to, which also holds the TFDS build (65 MB
# more). Each stage writes its results under
# $RESULTS_DIR (default experiments/results/ on a GPU machine; elsewhere it must be set, so that
# a dry run leaves the committed GPU results alone) with the device named, then copies them to
# $OUT when that is set:
#   startup        compiling `experiments/iam.py` K = 8 sequentially, in parallel, overlapped and
#                  from the persistent cache (20 steps per run; 5 runs, three of them compiling
#                  all 15 steps cold: perhaps 5 minutes)              -> benchmark_compile_gpu.md
#   paper:M        the paper's table within M minutes: `experiments.paper --gpu` (resampled
#                  lines, K up to 4; $PAPER_PRESET: others, e.g. --tiny for a dry run, empty for
#                  the full preset), a probe, then equal epochs, at least 8, for every run
#                  that fits ($PAPER_MIN_EPOCHS: another least count); the probe is kept
#                  (paper_gpu_probe.json), and a later call on the same kind of GPU can skip it
#                  with PAPER_PRESET="--gpu --estimates FILE" (with "--epochs 12" and
#                  PAPER_MIN_EPOCHS=12: exactly 12 epochs a run, or the run left out).
#                  $PAPER_WORKDIR (default: a new /tmp/gpu-call/paper) in an ignored folder of
#                  the checkout, e.g. .gpu/paper, outlives the call on a machine still warm: the
#                  same stage in the next call finishes the sweep (its finished runs reused, the
#                  rest at the first call's epoch count)
#                                        -> paper_gpu.{md,csv,png}, paper_gpu_probe.json
#   recipe:M       accuracy candidates, M minutes each, by validation CER against wall time
#                  ($RECIPE_CANDIDATES, default: the base against a token budget as large as
#                  iam.py:gpu's, at K = 2; 2 candidates at M = 2.5: perhaps 8 minutes)
#                                                                 -> recipe_full_gpu.{md,csv,png}
#   accuracy:M     `experiments/iam.py:gpu` ($ACCURACY_CONFIG: another, e.g. experiments/iam.py:cpu)
#                  trained for at most M minutes (less where the call would have under 90 s
#                  left for the test split), then its best checkpoint's test CER (testset_f);
#                  $ACCURACY_TAG names a variant's files, e.g. dropout04 with
#                  CONFIG_OVERRIDES=--config.model.dropout_rate=0.4
#                               -> accuracy_gpu[_TAG].json, accuracy_gpu[_TAG]_metrics.jsonl
#   flags          the default step beside XLA flags that might cut its per-iteration launches
#                  (perhaps 3 minutes)                          -> benchmark_step_gpu_flags.md
#   kernels        the LSTM and CTC kernels' launch variants (prefetch among them) against the
#                  scan, then the step's anatomy with the fastest (3.3 minutes on an H200)
#                                                               -> benchmark_step_gpu_kernels.md
#   epoch          the kernels' launch variants (as `kernels`: 0.5 minutes on an H200, two variants
#                  fewer, benchmark_step_gpu_kernels.md), then one IAM-OnDB
#                  epoch, `optimal` K = 8 with a float32 and a bfloat16 model (the LSTM kernel,
#                  `auto`'s for bfloat16, at the fastest launch), against PyTorch cuDNN on random
#                  padded batches (compiles of 16 steps: perhaps 5 minutes)
#                                                                -> benchmark_epoch_gpu.md
#   memory         XLA's buffer plan of `experiments/iam.py:gpu`'s train step on the GPU: 6 shapes,
#                  one bucket against K = 4 at 32 lines and at its token budget (16 compiles, no
#                  step run: more than 3.4 minutes)                 -> benchmark_memory_gpu.md
# Stages run in the order given; a stage that fails is reported and the next one still runs. All
# of them end by $DEADLINE_S seconds (default 570, inside a 10-minute call): a command still
# running then gets SIGINT (train.py checkpoints and stops), and each stage's results are copied
# to $OUT as soon as it ends, so what finished comes back even if the call is cut short. Ctrl-C
# or SIGTERM does the same at once to the running stage, then ends the call (exit code 130).
# $CONFIG_OVERRIDES (e.g. "--config.data.train_limit=64 --config.model.hidden_size=16", values
# without spaces) reach the startup, accuracy and memory stages' configs, $STEP_PRESET (default
# "defaults"; "tiny" on a CPU) the flags and kernels stages' shapes and $PAPER_PRESET the paper
# stage's: a dry run on a CPU before spending the GPU. Each stage starts from an empty workdir
# under /tmp/gpu-call, and only result files this call wrote are copied to $OUT.
set -uo pipefail

if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { print }' "$0" >&2
  exit 2
fi
data_dir=$1
shift
for spec in "$@"; do
  stage=${spec%%:*}
  if [[ ! $stage =~ ^(startup|paper|recipe|accuracy|flags|kernels|epoch|memory)$ ]]; then
    echo "error: unknown stage $stage (startup, paper:M, recipe:M, accuracy:M, flags, kernels, epoch, memory)" >&2
    exit 2
  fi
  if [[ $stage =~ ^(paper|recipe|accuracy)$ && ! $spec =~ ^[a-z]+:([0-9]+\.?[0-9]*|\.[0-9]+)$ ]]; then
    echo "error: $spec: the $stage stage needs its minutes, e.g. $stage:4" >&2
    exit 2
  fi
done
read -r -a overrides <<<"${CONFIG_OVERRIDES:-}"
# The committed *_gpu results are a GPU's: a dry run elsewhere writes to a scratch folder.
if [[ -z ${RESULTS_DIR:-} ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no GPU here (nvidia-smi): set RESULTS_DIR to a scratch folder for a dry run" >&2
  exit 2
fi
results=${RESULTS_DIR:-experiments/results}
mkdir -p "$results" /tmp/gpu-call
stamp=/tmp/gpu-call/started
touch "$stamp"
deadline=${DEADLINE_S:-570}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
failed=()

# Ctrl-C or SIGTERM: the running command gets SIGINT, as at the deadline (train.py checkpoints
# and stops, a sweep reports what finished), then the call ends with what it has.
interrupted=0
command_pid=
stop_command() {
  interrupted=1
  [[ -n $command_pid ]] && kill -INT -- -"$command_pid" 2>/dev/null
}
trap stop_command INT TERM

# Runs a command with what is left until the deadline (status 124 if nothing is left). `timeout`
# runs it in a process group of its own, which the deadline's SIGINT and stop_command's reach
# whole (a sweep's workers too).
within_deadline() {
  local left=$((deadline - SECONDS))
  if ((left <= 0)); then
    echo "no time left for: $*" >&2
    return 124
  fi
  timeout --signal=INT --kill-after=15 "$left" "$@" &
  command_pid=$!
  local status
  wait "$command_pid"
  status=$?
  while kill -0 "$command_pid" 2>/dev/null; do # a trapped signal ended the wait, not the command
    wait "$command_pid"
    status=$?
  done
  command_pid=
  return "$status"
}

# M minutes, or what the call has left after `reserve` seconds if that is less (none: 0).
minutes_left() {
  awk -v m="$1" -v left=$((deadline - SECONDS - $2)) \
    'BEGIN { left /= 60; m = m < left ? m : left; print (m > 0 ? m : 0) }'
}

run_stage() {
  local stage=$1 minutes=$2
  case $stage in
    startup)
      within_deadline python -m experiments.benchmark_compile --config=experiments/iam.py --num-buckets 8 \
        --repeats 1 --config.max_steps=20 --config.progress_bar=False \
        --config.data.data_dir="$data_dir" --out "$results/benchmark_compile_gpu.md" "${overrides[@]}"
      ;;
    paper)
      # The sweep plans to its own budget: no more than the call has left, less 30 s to report.
      minutes=$(minutes_left "$minutes" 30)
      [[ $minutes == 0 ]] && echo "no time left for the paper stage" >&2 && return 124
      local preset
      read -r -a preset <<<"${PAPER_PRESET---gpu}" # set but empty: the full preset
      local workdir=${PAPER_WORKDIR:-/tmp/gpu-call/paper}
      within_deadline python -m experiments.paper "${preset[@]}" --min-epochs "${PAPER_MIN_EPOCHS:-8}" \
        --budget-minutes "$minutes" --data-dir "$data_dir" --workdir "$workdir" \
        --out "$results/paper_gpu"
      local swept=$?
      cp "$workdir/probe.json" "$results/paper_gpu_probe.json" 2>/dev/null
      return $swept
      ;;
    recipe)
      # K = 2: every candidate compiles cold twice (its probe, its run) inside the call; lines
      # resampled as iam.py:gpu's, and its token budget against 32 lines a step
      within_deadline python -m experiments.recipe --preset full --data-dir "$data_dir" \
        --minutes-per-run "$minutes" --workdir /tmp/gpu-call/recipe \
        --base bucketing.num_buckets=2,data.features.resample_spacing=0.2 \
        --candidates "${RECIPE_CANDIDATES:-base,tokens_27648}" \
        --out "$results/recipe_full_gpu"
      ;;
    accuracy)
      local workdir=/tmp/gpu-call/accuracy config=${ACCURACY_CONFIG:-experiments/iam.py:gpu}
      local name=accuracy_gpu${ACCURACY_TAG:+_$ACCURACY_TAG}
      # Training ends in time for the test split: 90 s kept to load, compile and score it.
      minutes=$(minutes_left "$minutes" 90)
      [[ $minutes == 0 ]] && echo "no time left for the accuracy stage" >&2 && return 124
      within_deadline python train.py --config="$config" --workdir="$workdir" \
        --config.data.data_dir="$data_dir" --config.max_minutes="$minutes" \
        --config.progress_bar=False "${overrides[@]}" >"$workdir.train.json"
      local trained=$?
      # the epochs come back even when the deadline cut the run short
      cp "$workdir/metrics.jsonl" "$results/${name}_metrics.jsonl" 2>/dev/null
      ((trained == 0)) &&
        within_deadline python train.py --config="$config" --workdir="$workdir" \
          --config.data.data_dir="$data_dir" --mode=evaluate --split=test "${overrides[@]}" \
          >"$workdir.test.json" &&
        python -c 'import json, os, sys; json.dump({"config": " ".join(sys.argv[5:]),
          "max_minutes": float(sys.argv[1]), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "train": json.load(open(sys.argv[2])), "test": json.load(open(sys.argv[3]))},
          open(sys.argv[4], "w"), indent=2)' \
          "$minutes" "$workdir.train.json" "$workdir.test.json" "$results/$name.json" \
          "$config" "${overrides[@]}"
      ;;
    flags)
      within_deadline python -m experiments.benchmark_step --preset "${STEP_PRESET:-defaults}" \
        --xla-flags "Triton GEMM for every dot=--xla_gpu_triton_gemm_any=true" \
        --xla-flags "loop double buffering=--xla_gpu_enable_while_loop_double_buffering=true" \
        --out "$results/benchmark_step_gpu_flags.md"
      ;;
    kernels)
      within_deadline python -m experiments.benchmark_step --preset "${STEP_PRESET:-defaults}" \
        --tune --out "$results/benchmark_step_gpu_kernels.md"
      ;;
    epoch)
      within_deadline python -m experiments.benchmark_step --preset "${STEP_PRESET:-defaults}" \
        --tune --no-anatomy --epoch --epoch-strategies optimal --epoch-dtypes float32,bfloat16 \
        --data-dir "$data_dir" --out "$results/benchmark_epoch_gpu.md"
      ;;
    memory)
      within_deadline python -m experiments.benchmark_memory --quick --config=experiments/iam.py:gpu \
        --config.data.data_dir="$data_dir" --out "$results/benchmark_memory_gpu.md" "${overrides[@]}"
      ;;
  esac
}

for spec in "$@"; do
  stage=${spec%%:*}
  minutes=${spec#*:}
  [[ $minutes == "$spec" ]] && minutes=0
  echo "=== $stage ($minutes min) at $(date +%T)"
  rm -rf "/tmp/gpu-call/$stage" "/tmp/gpu-call/$stage".*.json
  run_stage "$stage" "$minutes" || failed+=("$stage")
  if [[ -n ${OUT:-} ]]; then
    find "$results" -maxdepth 1 -name '*gpu*' -newer "$stamp" -exec cp {} "$OUT"/ \;
  fi
  if ((interrupted)); then
    echo "interrupted during $stage: the stages after it did not run" >&2
    exit 130
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
