#!/usr/bin/env bash
# GPU smoke test for a lent GPU (a few minutes): ALBEF-base (ViT-B/16 + BERT-base, 256 px, queue 65536)
# through the real Trainer step (DeepSpeed ZeRO-2, torch's fused AdamW, SDPA attention) on synthetic batches, in
#   1. fp16 (ds_configs/zero2_fp16.json: dynamic loss scaling),
#   2. bf16 (ds_configs/zero2_bf16.json),
#   3. optionally (COMPILE=1) both again with torch.compile on the model (engine.compile());
#      COMPILE=only runs the compiled steps alone.
# Each run prints images/s, step time, peak GPU memory, loss-scale events (scale + skipped overflow
# steps), the last loss and the MFU estimate (PEAK_TFLOPS = the GPU's dense fp16/bf16 peak).
#
#   bash bench/gpu_smoke.sh                       # batch 64, 5 warm-up + 45 timed steps, 1 GPU
#   BATCH=32 STEPS=10 NPROC=2 COMPILE=1 bash bench/gpu_smoke.sh
#   PRECISIONS=bf16 bash bench/gpu_smoke.sh       # one precision only
#
# The optimizer is torch's fused AdamW, chosen in the DeepSpeed JSON ("torch_adam": true, "fused": true):
# nothing is compiled for it. DeepSpeed's own FusedAdam ("torch_adam": false) is JIT-compiled on first
# use unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1; the line "optimizer" below says which
# one this machine would get (on Hopper, DeepSpeed 0.19.8's JIT build of FusedAdam failed to parse the
# arch "9.0a"; torch's fused AdamW needs no build). The first run may still JIT-compile DeepSpeed's shared-memory op
# (cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); the per-run timeout leaves
# room for that and for torch.compile.
# Without a CUDA device (or without torch/deepspeed seeing one) it prints why and exits 0: the CPU
# path is covered by the tests and bench/pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."

BATCH=${BATCH:-64}
STEPS=${STEPS:-45}
WARMUP=${WARMUP:-5}
NPROC=${NPROC:-1}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # dense fp16/bf16 peak per GPU (H100/H200 SXM); only for the MFU estimate
TIMEOUT_S=${TIMEOUT_S:-280}       # per run
COMPILE_TIMEOUT_S=${COMPILE_TIMEOUT_S:-600}  # per torch.compile run: ALBEF-base took over 180 s to compile on an H200
PRECISIONS=${PRECISIONS:-"fp16 bf16"}
COMPILE=${COMPILE:-0}
PYTHON=${PYTHON:-python}

if ! "${PYTHON}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_smoke: SKIPPED - no CUDA device visible to torch on $(hostname) (nothing to measure; exit 0)"
    exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"${PYTHON}" -c "import torch, deepspeed; \
print(f'torch {torch.__version__} cuda {torch.version.cuda} deepspeed {deepspeed.__version__} gpus {torch.cuda.device_count()}')"
"${PYTHON}" - <<'PY'
import json
from deepspeed.git_version_info import installed_ops
params = json.load(open("ds_configs/zero2_fp16.json"))["optimizer"]["params"]
chosen = "torch.optim.AdamW(fused=True)" if params.get("torch_adam") and params.get("fused") else (
    "torch.optim.AdamW" if params.get("torch_adam") else "deepspeed FusedAdam")
built = "prebuilt" if installed_ops.get("fused_adam") else "JIT-compiled on first use"
print(f"optimizer       {chosen} (DeepSpeed FusedAdam op here: {built})")
PY

run() {  # run PRECISION COMPILE_FLAG
    local precision=$1 compile=$2 extra=() out limit=${TIMEOUT_S}
    [[ "${compile}" == 1 ]] && extra+=(--compile) && limit=${COMPILE_TIMEOUT_S}
    echo "== ${precision}$([[ "${compile}" == 1 ]] && echo ' + torch.compile'): batch ${BATCH}/GPU, ${WARMUP} warm-up + ${STEPS} timed steps"
    out=$(timeout "${limit}" "${PYTHON}" bench/pretrain.py --config pretrain_4m --ds "ds_configs/zero2_${precision}.json" \
          --batch_size "${BATCH}" --image_res 256 --steps "${STEPS}" --warmup "${WARMUP}" --nproc "${NPROC}" \
          --peak_tflops "${PEAK_TFLOPS}" "${extra[@]}" | tail -n 1)
    echo "${out}"
    "${PYTHON}" - "${out}" "${precision}" <<'PY'
import json, sys
r, precision = json.loads(sys.argv[1]), sys.argv[2]
print(f"images/s        {r['images_per_s']:.1f} ({r['images_per_s_per_rank']:.1f} per GPU, {r['nproc']} GPU(s), batch {r['batch_per_rank']}/GPU)")
print(f"step time       {r['step_s'] * 1000:.0f} ms")
print(f"peak GPU memory {r['peak_mem_gib']:.2f} GiB")
print(f"loss scale      {r['loss_scale']:g} (skipped overflow steps: {r['skipped_steps']})")
print(f"last loss       {r['loss']}")
print(f"MFU (estimate)  {100 * r.get('mfu', float('nan')):.1f}%")
assert r["precision"] == precision and r["device"] == "cuda", r
assert r["loss"] is not None and r["loss"] == r["loss"], "loss is NaN"
PY
}

if [[ "${COMPILE}" != only ]]; then
    for precision in ${PRECISIONS}; do
        run "${precision}" 0
    done
fi
if [[ "${COMPILE}" == 1 || "${COMPILE}" == only ]]; then
    for precision in ${PRECISIONS}; do
        run "${precision}" 1
    done
fi
