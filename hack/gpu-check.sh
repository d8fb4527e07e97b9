#!/usr/bin/env bash
# One call on the lent GPU machine (see hack/device-kit.sh; carry .cache/dev): the CUDA-only tests in one
# pytest process, then a same-machine A/B of --copy-stream with ResNet-50 (8 workers, 64 clients, max batch
# 32), interleaved so that drift shows. Prints the pytest summary and hack/serve-profile.py's SUMMARY lines.
set -uo pipefail
cd "$(dirname "$0")/.."
bash .cache/dev/setup.sh >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.cache/dev/bin:/tmp/site/bin:$PATH BENCH_WRK_THREADS=4
# --noconftest: the tests' conftest loads the cluster fixtures, whose packages the GPU image lacks
timeout 240 python -m pytest -q --noconftest -p no:cacheprovider tests/unit/runtime/serving -k gpu 2>&1 | tail -15
for tag in one-stream copy-stream one-stream copy-stream; do
  cs=0; [[ $tag == copy-stream ]] && cs=1
  MODEL=${MODEL:-resnet50} W=8 C=64 D=5 DEV=cuda MAXB=32 COPY_STREAM=$cs TAG=$tag \
    timeout 150 python hack/serve-profile.py 2>&1 | grep -E "SUMMARY|Error" | tail -2
done
