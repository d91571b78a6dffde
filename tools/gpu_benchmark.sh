#!/usr/bin/env bash
# UniMatch, UCCL and MLCL training steps on one GPU at Pascal VOC's settings (ResNet-101, random init,
# crop 321, batch 8 labeled + 8 unlabeled, on generated data): images/s and peak memory in fp32 and
# bf16, each plain, with channels_last, with compile, and with both. One run of tools/benchmark.py per
# precision, so the ratios within a table come from one sitting.
#
#   tools/gpu_benchmark.sh                 # 3 methods x 4 variants per precision; compiling takes minutes
#   tools/gpu_benchmark.sh --iters 50      # more timed steps (extra arguments go to tools/benchmark.py)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
for amp in none bf16; do
    echo "== amp=$amp"
    python tools/benchmark.py --voc-settings --methods unimatch UCCL MLCL --warmup 5 --iters 20 \
        amp=$amp channels_last=false compile=false \
        --also channels_last=true --also compile=true --also channels_last=true compile=true "$@"
done
