#!/bin/bash
# One GPU lease, prepared: this library's training arms beside TRL's on the same GPU (throughput.py --device cuda),
# then gpu_check.py's arms (FSDP and DeepSpeed overlays, stage 1/2, NF4, DPO, LoRA), each under its own time limit, all
# inside one 600 s device call, so the first results come back even from a short lease. Needs .gpu/ staged by
# benchmarks/gpu_carry.py and its wheels installed (see gpu_carry.py). Results under $OUT (the device's return
# folder) or runs/gpu.
set -u
out=${OUT:-runs/gpu}
mkdir -p "$out"
export MEET_SHARED_DATA=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
data=.gpu/hh_rlhf_harmless.train.jsonl.gz
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
timeout "${THROUGHPUT_S:-270}" python3 benchmarks/throughput.py --device cuda --model llama-1b --tokenizer .gpu/tokenizer \
    --data "$data" --max-length 512 --steps 5 --windows 1 --arms trl_dpo,stage2_prefix,stage1_prompt,meet_dpo,trl_sft \
    --json "$out/throughput_cuda.json" 2>&1 | tee "$out/throughput.log"
# the strategy overlays first (FSDP, DeepSpeed ZeRO-2 and ZeRO-3: the tiny model, 3 steps, then resumed to 5), then the
# 1B stages, NF4, DPO and LoRA controls as time allows (gpu_check runs its arms in index order)
for only in "4 5 6" "0 1 2 9 10"; do
  timeout "${GPU_CHECK_S:-130}" python3 benchmarks/gpu_check.py --out "$out/gpu_check_${only// /_}" \
      --tokenizer .gpu/tokenizer --data "$data" --budget_s "${GPU_CHECK_BUDGET_S:-100}" --only $only 2>&1 \
      | tee "$out/gpu_check_${only// /_}.log"
done
