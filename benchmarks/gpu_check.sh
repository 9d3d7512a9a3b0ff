#!/usr/bin/env bash
# GPU-node checks of issue 9, in one run of at most 9.5 minutes (usually ~5): the cache job
# (ViT-B/16, bf16, shards and Parquet on local disk) with the decode pool on the node's cores,
# then with --decode device (nvJPEG and the transform on the GPU), each against the bare bf16
# forward in the same run; head training on CUDA; the decode pool's cost in the actor; and
# --decode device on its own: its images/s, the actor's CPU per image, and whether nvJPEG keeps
# and skips what Pillow does; and the cached loss against float64 with TF32 on (also turned on
# through torch's older flags, as NVIDIA's containers do: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1).
# Logs and the node's description go to LOGS (default /tmp/pvu-gpu-check). Without a GPU it
# runs the same steps, smaller, on the CPU.
#
#     benchmarks/gpu_check.sh [LOGS]
set -uo pipefail
logs=${1:-/tmp/pvu-gpu-check}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    echo "cores $(nproc)"
    "$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$logs/node.txt"

if "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    cache=(--backbone vit_base_patch16_224 --batch-size 256 --shards 4 --per-shard 1024
        --rounds 2 --reference-batches 20)
    train=(--device cuda --rows 131072 --steps 200 --repeats 2)
    decode=(--images 512 --workers 7 15 --rounds 3)
    device=(--images 1024 --chunk 256 --rounds 3)
    exactness=(--images 64)
else
    cache=(--backbone vit_tiny_patch16_224 --batch-size 16 --shards 1 --per-shard 32
        --rounds 1 --reference-batches 2 --decode-workers 1)
    train=(--device cpu --rows 16384 --steps 5 --repeats 1)
    decode=(--images 16 --workers 1 --rounds 1)
    device=(--images 16 --chunk 8 --rounds 1 --corrupted 20)
    exactness=(--images 8)
fi
status=0
timeout 150 "$python" benchmarks/cache_throughput.py --local --precision bf16 "${cache[@]}" \
    2>&1 | tee "$logs/cache_throughput.log" || status=1
timeout 150 "$python" benchmarks/cache_throughput.py --local --precision bf16 "${cache[@]}" \
    --decode device --decode-workers 0 2>&1 | tee "$logs/cache_throughput_device.log" || status=1
timeout 60 "$python" benchmarks/decode_throughput.py "${decode[@]}" \
    2>&1 | tee "$logs/decode_throughput.log" || status=1
timeout 60 "$python" benchmarks/device_decode_check.py "${device[@]}" \
    2>&1 | tee "$logs/device_decode_check.log" || status=1
timeout 90 "$python" benchmarks/train_throughput.py --precision fp32 bf16 "${train[@]}" \
    2>&1 | tee "$logs/train_throughput.log" || status=1
timeout 60 "$python" benchmarks/loss_exactness.py "${exactness[@]}" \
    2>&1 | tee "$logs/loss_exactness.log" || status=1
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 timeout 60 "$python" benchmarks/loss_exactness.py \
    --backbones mobilenetv3_large_100 "${exactness[@]}" 2>&1 | tee "$logs/loss_exactness_override.log" || status=1
exit $status
