#!/usr/bin/env bash
# The GPU check of issue 17: one command, at most 8 minutes on one H100, each part under its own
# time limit, and always a report: OUTDIR/gpu_report.json and OUTDIR/gpu_report.md (plus
# OUTDIR/gpu_check.log, every part's output).
#
#   benchmarks/gpu_check.sh OUTDIR            on a CUDA machine, from the repository root or anywhere
#   benchmarks/gpu_check.sh --dry-run OUTDIR  the same script on a CPU with tiny sizes and short limits
#                                             (CI runs it: tests/test_gpu_check.py)
#
# Parts: (1) facts: the device, driver, torch, CUDA, cuDNN; (2) gpu_tests: `pytest -m gpu tests/gpu`
# (with pytest-xdist where installed, else in one process); (3) sab-omni bench: Lightweight bf16 at a batch that fills the GPU, the 1b preset (vocab 50,000,
# 2048 tokens) in bf16 with compile off and on and in fp16, each against HF GPT-2 of the same
# dimensions in the same process, MFU against the data-sheet peak and a matmul peak measured in
# the run; Lightweight with Muon (its Newton-Schulz FLOPs counted); (4) a real 200-step training run of
# Lightweight, its loss curve in the report; (5) generation tokens/s and MBU against HF generate. Runs from the source tree
# (PYTHONPATH), so nothing needs installing: the GPU machine has no network.
# Environment: PYTHON (default python3), GPU_CHECK_LIGHT_BATCH (Lightweight's sequences of 1024 a step,
# default 64: 65k tokens, about 10 GiB by the estimator, room left for the HF peer in the same process),
# GPU_CHECK_1B_BATCH (the 1b preset's sequences of 2048, default 4: about 38 GiB), GPU_CHECK_TOTAL_S (the
# deadline for all parts, default 470 s).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 2  # the bench and the tests write nothing here; the check's own files go to $WORK
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
: >"$OUT/gpu_check.log"

if [[ $DRY == 1 ]]; then
  # Tiny sizes on the CPU: every part runs its real command line. The GPU tests run their CPU
  # variants (SAB_GPU_CHECK_DRY_RUN=1), but for the two that start processes (the CPU suite covers
  # both: tests/test_resume.py, tests/test_distributed.py); compile is switched off by
  # TORCHDYNAMO_DISABLE (an Inductor build takes minutes on a small CPU). Parts run two at a time:
  # on a CPU their timings mean nothing, and each spends most of its time importing torch.
  export SAB_GPU_CHECK_DRY_RUN=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  LANES=2
  DEVICE=cpu; LIGHT=(--preset tiny --seq-len 32 --batch-size 2); BIG=(--preset tiny --seq-len 64 --batch-size 2)
  STEPS=(--steps 1 --warmup 1); TEST_ARGS=(-k "not sigkill and not fsdp2"); NOCOMPILE=(env TORCHDYNAMO_DISABLE=1)
  GEN_LIGHT=(--preset tiny --prompt-len 8 --new-tokens 8); GEN_BIG=(--preset tiny --prompt-len 16 --new-tokens 8)
  TRAIN_RUN=(--preset tiny --seq_len 32 --batch_size 4 --gradient_accumulation_steps 1 --num_samples 200
             --max_steps 20 --log_interval 2)
  L_FACTS=60; L_TESTS=150; L_LIGHT=90; L_BIG=90; L_COMPILE=90; L_FP16=90; L_MUON=90; L_TRAIN=120; L_GEN=90
  L_GEN_BIG=90; TOTAL_S=${GPU_CHECK_TOTAL_S:-1200}
else
  DEVICE=cuda; B1=${GPU_CHECK_1B_BATCH:-4}; LANES=1  # one part at a time: the timings are the point
  LIGHT=(--preset lightweight --seq-len 1024 --batch-size "${GPU_CHECK_LIGHT_BATCH:-64}")
  BIG=(--preset 1b --vocab-size 50000 --seq-len 2048 --batch-size "$B1")
  STEPS=(--steps 3 --warmup 1); NOCOMPILE=()
  # tests side by side where pytest-xdist is installed (the lent machine's python may lack it): else one process
  TEST_ARGS=(); "$PY" -c "import xdist" 2>/dev/null && TEST_ARGS=(-n 3 --dist loadfile)
  GEN_LIGHT=(--preset lightweight --prompt-len 128 --new-tokens 256)
  GEN_BIG=(--preset 1b --vocab-size 50000 --prompt-len 128 --new-tokens 256)
  # a real training run: 200 optimizer steps of Lightweight on the synthetic set, its loss curve in the report
  TRAIN_RUN=(--preset lightweight --seq_len 512 --batch_size 32 --gradient_accumulation_steps 1 --num_samples 8000
             --max_steps 200 --log_interval 10)
  # Each part's own limit, and a deadline for all: the limits add up to 465 s within the 470 s deadline,
  # so the check ends within 8 minutes whatever happens inside a part (a part that starts late gets
  # what is left; with nothing left it is skipped).
  L_FACTS=10; L_TESTS=110; L_LIGHT=30; L_BIG=40; L_COMPILE=100; L_FP16=40; L_MUON=35; L_TRAIN=50; L_GEN=20
  L_GEN_BIG=30; TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
fi

DEADLINE=$(($(date +%s) + TOTAL_S))
cat >"$WORK/meta.json" <<EOF
{"script": "benchmarks/gpu_check.sh", "dry_run": $([[ $DRY == 1 ]] && echo true || echo false),
 "command": "benchmarks/gpu_check.sh $([[ $DRY == 1 ]] && echo '--dry-run ')OUTDIR",
 "started": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "start_s": $(date +%s), "root": "$ROOT"}
EOF

report() {
  timeout 60 "$PY" "$ROOT/benchmarks/gpu_report.py" build "$WORK" "$OUT" >>"$OUT/gpu_check.log" 2>&1 \
    || echo "gpu_check: the report could not be written (see gpu_check.log)" >&2
}

# part NAME LIMIT_S COMMAND...: run COMMAND under `timeout` (its whole process group), stdout to
# NAME.out, stderr to NAME.log, one row in parts.tsv; then rewrite the report. With LANES > 1 it
# returns at once and the part runs in the background (at most LANES at a time).
SEQ=0
part() {
  SEQ=$((SEQ + 1))
  if ((LANES > 1)); then
    while (($(jobs -rp | wc -l) >= LANES)); do wait -n; done
    run_part "$SEQ" "$@" &
  else
    run_part "$SEQ" "$@"
  fi
}

run_part() {
  local seq=$1 name=$2 limit=$3 left
  shift 3
  left=$((DEADLINE - $(date +%s) - 5))  # 5: what --kill-after may add
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/gpu_check.log"
  local t0 rc status
  t0=$(date +%s%N)
  if ((limit < 1)); then
    echo "no time left before the check's deadline" >"$WORK/$name.log"
    : >"$WORK/$name.out"
    rc=0 status=skipped limit=0
  else
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log"
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status=timeout ;;
      *) status=failed ;;
    esac
  fi
  { echo "== $name: $status (exit $rc)"; cat "$WORK/$name.out" "$WORK/$name.log"; } >>"$OUT/gpu_check.log"
  cat "$WORK/$name.out" >>"$WORK/$name.log"  # a failed part's report shows both streams
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$seq" "$name" "$status" "$rc" $((($(date +%s%N) - t0) / 1000000)) "$limit" \
    "$(printf '%q ' "$@" | tr '\t\n' '  ' | cut -c1-400)" >>"$WORK/parts.tsv"
  echo "   $status in $((($(date +%s%N) - t0) / 1000000000)) s"
  report
}

BENCH=("$PY" -m sab_byon_omni bench --device "$DEVICE" --json)

part facts "$L_FACTS" "$PY" "$ROOT/benchmarks/gpu_report.py" facts
# -v: one line per test as it ends, so a run the part's limit cuts short still reports each test done
# (gpu_report.py reads them when the JUnit file, written at the end, is missing)
part gpu_tests "$L_TESTS" "$PY" -m pytest "$ROOT/tests/gpu" -m gpu -v -rA -p no:cacheprovider \
  --rootdir "$ROOT" --junitxml "$WORK/junit.xml" "${TEST_ARGS[@]}"
part bench_lightweight_bf16 "$L_LIGHT" "${BENCH[@]}" "${LIGHT[@]}" --precision bf16 "${STEPS[@]}" --compare hf
part bench_1b_bf16 "$L_BIG" "${BENCH[@]}" "${BIG[@]}" --precision bf16 "${STEPS[@]}" --compare hf
part bench_1b_bf16_compile "$L_COMPILE" "${NOCOMPILE[@]}" "${BENCH[@]}" "${BIG[@]}" --precision bf16 "${STEPS[@]}" \
  --compile --compare hf
part bench_1b_fp16 "$L_FP16" "${BENCH[@]}" "${BIG[@]}" --precision fp16 "${STEPS[@]}" --compare hf
part bench_lightweight_muon "$L_MUON" "${BENCH[@]}" "${LIGHT[@]}" --precision bf16 "${STEPS[@]}" --optimizer muon
part train_200 "$L_TRAIN" "$PY" -m sab_byon_omni train "${TRAIN_RUN[@]}" --device "$DEVICE" --precision bf16 \
  --progress false --checkpoint_dir "$WORK/train_200"
part generate_lightweight "$L_GEN" "${BENCH[@]}" --mode generate "${GEN_LIGHT[@]}" --precision bf16 "${STEPS[@]}" \
  --compare hf
part generate_1b "$L_GEN_BIG" "${BENCH[@]}" --mode generate "${GEN_BIG[@]}" --precision bf16 "${STEPS[@]}" --compare hf

wait
report
echo "report: $OUT/gpu_report.md and $OUT/gpu_report.json"
# Exit 0 when every part ran (the report says what each found); 1 when a part failed or timed out.
! grep -qv $'\tok\t' "$WORK/parts.tsv"
