#!/usr/bin/env bash
# The issue-18 battery on a lent H200, in the order a session's device time is best spent: the kernel checks
# and the engine's GPU tests first, then the engine side by side (the page kernel against PICA_EXPAND_KERNEL=classic),
# then the product through HTTP. Results land in $OUT (at most 8 files come back from a call: logs go to /tmp).
#
#   bash bench/device_battery.sh wheels        # here, once: the server's wheels the GPU image lacks, into .whl/serve
#   bash bench/device_battery.sh checks        # on the device (carry .whl): ~3 min
#   bash bench/device_battery.sh engine        # ~6 min: every issue-18 row, twice (page kernel, classic)
#   bash bench/device_battery.sh serve [RANK]  # ~2 min a run at rank 32; rank 256 starts slower (basis, uploads)
set -uo pipefail
STEP=${1:?wheels, checks, engine or serve}
WHEELS="fastapi==0.165.0 fastapi-offline==1.7.7 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5
annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 python-multipart==0.0.34
pyzmq==27.3.0 msgspec==0.23.0 opentelemetry-api==1.45.2"  # fastapi 0.165 imports opentelemetry-api
if [ "$STEP" = wheels ]; then
  mkdir -p .whl/serve && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/serve "$w"
  done
  exit
fi
OUT=${OUT:?set by the device tool: the folder whose files come back}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/serve/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
case "$STEP" in
  checks)
    timeout 200 python3 tests/adapters/expand_kernel_check.py 2>&1 | tail -2 | tee $OUT/gpu-checks.log
    echo "expand check rc ${PIPESTATUS[0]}"
    timeout 200 python3 -m pytest -q -x -m gpu tests/engine/test_engine_gpu.py tests/engine/test_async_scheduling.py \
      tests/engine/test_engine_methods.py 2>&1 | tail -3 | tee -a $OUT/gpu-checks.log
    echo "gpu tests rc ${PIPESTATUS[0]}" ;;
  engine)
    ROWS="--shape llama3-8b --batches 1,64 --ranks 32,256 --num-adapters 8,64 --mixed-ranks 8,32,256 --skip-peft --workdir /tmp/b8"
    for kernel in pages classic; do
      PICA_EXPAND_KERNEL=$kernel timeout 280 python3 bench/decode_bench.py $ROWS --out $OUT/decode-$kernel.json \
        > /tmp/decode-$kernel.log 2>&1; echo "decode $kernel rc $?"
    done ;;
  serve)
    RANK=${2:-32}
    [ -d /tmp/b8/model ] || timeout 200 python3 bench/decode_bench.py --shape llama3-8b --batches 64 --ranks "$RANK" \
      --num-adapters 64 --skip-peft --workdir /tmp/b8 --startup-only --out /tmp/startup.json > /tmp/startup.log 2>&1
    ENGINE="--dtype bfloat16 --rank-max $RANK --max-rank $RANK --max-num-seqs 64 --max-num-batched-tokens 4096 \
--max-model-len 320 --max-gpu-adapters 64 --gpu-memory-utilization 0.85"
    for kernel in pages classic; do
      rm -rf /tmp/sb/adapters  # the basis cache stays: the second run starts faster
      PICA_EXPAND_KERNEL=$kernel timeout 280 python3 bench/serve_bench.py --model /tmp/b8/model --workdir /tmp/sb \
        --server-args="$ENGINE" --num-adapters 64 --rank "$RANK" --concurrency 64 --num-requests 256 --prompt-words 35 \
        --max-tokens 128 --client-processes 4 --out $OUT/serve-a64-r$RANK-$kernel.json > /tmp/serve-$kernel.log 2>&1
      echo "serve $kernel rc $?"; tail -3 /tmp/sb/server.log
    done ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
