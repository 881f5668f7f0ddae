#!/usr/bin/env bash
# The measurements behind docs/BENCHMARKS.md, on a CPU machine. Each command interleaves the
# variants it compares in one process; compare ratios within one command's output only.
set -euo pipefail
lscpu | grep -E "Model name|^CPU\(s\)|L3"
grep -o -w -E "avx2|fma|avx512f|avx512_bf16|avx512_vnni|amx_bf16|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
uptime
# Training step, Lightweight, batch 4 x 1024, fp32, against HF GPT-2 and a plain textbook GPT
# (default threads, then 1 thread); peak RSS of each model's step in a process of its own
sab-omni bench --preset lightweight --seq-len 1024 --batch-size 4 --precision fp32 --steps 5 --warmup 1 --compare hf,minimal --isolated-memory
sab-omni bench --preset lightweight --seq-len 1024 --batch-size 4 --precision fp32 --steps 3 --warmup 1 --compare hf,minimal --threads 1
# The default job (configs/default.yaml): optimizer steps of the real job, projected to an epoch
for b in 0 64; do
  sab-omni bench --mode epoch --config configs/default.yaml --steps 8 --warmup 1 --set data.length_bucket_size=$b
done
# Memory with activation checkpointing; then with a fixed mmap threshold, so RSS follows the live tensors
sab-omni bench --preset lightweight --seq-len 1024 --batch-size 4 --precision fp32 --steps 1 --warmup 1 --activation-checkpointing
for ac in "" --activation-checkpointing; do
  MALLOC_MMAP_THRESHOLD_=65536 sab-omni bench --preset lightweight --seq-len 1024 --batch-size 4 --precision fp32 --steps 1 --warmup 1 $ac
done
# Generation with the KV cache against HF generate (default threads, then 1 thread)
for preset in lightweight small tiny; do
  sab-omni bench --mode generate --preset "$preset" --prompt-len 64 --new-tokens 128 --steps 5 --warmup 1 --compare hf
done
sab-omni bench --mode generate --preset lightweight --prompt-len 64 --new-tokens 128 --steps 5 --warmup 1 --compare hf --threads 1
# Levers, each interleaved in one process
for lever in optimizer rope qkv mlp norm sdpa attention gemv vocab threads compile; do
  echo "## lever: $lever"
  python benchmarks/levers.py "$lever"
done
# Levers on whole training steps (allocator: each variant in processes of its own); the profile by op category (ours against the plain reference, and
# the ceiling of that ratio); the default job's step against its own matmuls alone and its bound
for lever in memory_saving allocator compile_block bf16 profile matmul_floor; do
  echo "## lever: $lever"
  python benchmarks/levers.py "$lever" --reps 3
done
echo "## lever: regroup"
python benchmarks/levers.py regroup --reps 3
uptime
