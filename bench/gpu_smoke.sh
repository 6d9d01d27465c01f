#!/usr/bin/env bash
# GPU smoke test for a lent GPU (< 5 min): ALBEF-base (ViT-B/16 + BERT-base, 256 px, queue 65536) with
# ds_configs/zero2_fp16.json (ZeRO-2, fp16 dynamic loss scaling, torch's fused AdamW) through the real Trainer step on
# synthetic batches. Prints images/s, peak GPU memory and the loss scale (+ skipped overflow steps, last loss).
#
#   bash bench/gpu_smoke.sh                 # defaults: batch 64, 5 warm-up + 20 timed steps, 1 GPU
#   BATCH=32 STEPS=10 NPROC=2 bash bench/gpu_smoke.sh
#
# The optimizer is torch's fused AdamW, chosen in the DeepSpeed JSON ("torch_adam": true, "fused": true):
# nothing is compiled for it. DeepSpeed's own FusedAdam ("torch_adam": false) is JIT-compiled on first
# use unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1; the line "optimizer" below says which
# one this machine would get. The first run may still JIT-compile DeepSpeed's shared-memory op
# (cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); the timeout leaves room.
set -euo pipefail
cd "$(dirname "$0")/.."

BATCH=${BATCH:-64}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
NPROC=${NPROC:-1}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # dense fp16/bf16 peak per GPU (H100/H200 SXM); only for the MFU estimate
TIMEOUT_S=${TIMEOUT_S:-280}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, deepspeed; assert torch.cuda.is_available(), 'no GPU visible to torch'; \
print(f'torch {torch.__version__} cuda {torch.version.cuda} deepspeed {deepspeed.__version__} gpus {torch.cuda.device_count()}')"
python - <<'PY'
import json
from deepspeed.git_version_info import installed_ops
params = json.load(open("ds_configs/zero2_fp16.json"))["optimizer"]["params"]
chosen = "torch.optim.AdamW(fused=True)" if params.get("torch_adam") and params.get("fused") else (
    "torch.optim.AdamW" if params.get("torch_adam") else "deepspeed FusedAdam")
built = "prebuilt" if installed_ops.get("fused_adam") else "JIT-compiled on first use"
print(f"optimizer       {chosen} (DeepSpeed FusedAdam op here: {built})")
PY

out=$(timeout "${TIMEOUT_S}" python bench/pretrain.py --config pretrain_4m --ds ds_configs/zero2_fp16.json \
      --batch_size "${BATCH}" --image_res 256 --steps "${STEPS}" --warmup "${WARMUP}" --nproc "${NPROC}" \
      --peak_tflops "${PEAK_TFLOPS}" | tail -n 1)
echo "${out}"
python - "${out}" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"images/s        {r['images_per_s']:.1f} ({r['images_per_s_per_rank']:.1f} per GPU, {r['nproc']} GPU(s), batch {r['batch_per_rank']}/GPU)")
print(f"step time       {r['step_s'] * 1000:.0f} ms")
print(f"peak GPU memory {r['peak_mem_gib']:.2f} GiB")
print(f"loss scale      {r['loss_scale']:g} (skipped overflow steps: {r['skipped_steps']})")
print(f"last loss       {r['loss']}")
print(f"MFU (estimate)  {100 * r.get('mfu', float('nan')):.1f}%")
assert r["precision"] == "fp16" and r["device"] == "cuda", r
assert r["loss"] is not None and r["loss"] == r["loss"], "loss is NaN"
PY
