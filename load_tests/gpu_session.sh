#!/usr/bin/env bash
# Everything issue 14 asks of a lent GPU, as one command inside its 10-minute limit: the Triton
# kernels' tests compiled and run on the device and the CUDA-graph tests, every adapter kind against the references on CUDA,
# and the GPU benchmark. Logs and the benchmark's JSON go to $OUT (or ./gpu_out).
#
# The device machine has torch, triton, transformers, peft, pytest and prometheus-client; the
# server's web packages travel as wheels in .whl/ (ignored by git). Before the device call, here:
#
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 \
#     pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 python-multipart==0.0.34
#
# then run `bash load_tests/gpu_session.sh` there with `.whl` carried. Each step has its own time
# limit, so one that hangs leaves the others their time; the exit status is the first failure's.
set -u -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
status=0
step() {  # step NAME SECONDS COMMAND...: run it, its output to $OUT/NAME.log, note a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "== $name: rc $rc"
  [ "$status" -ne 0 ] || status=$rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step cuda_tests 180 python3 -m pytest -q -p no:cacheprovider tests/adapters/test_lora_triton.py \
  tests/adapters/test_bottleneck_triton.py tests/engine/test_paged_attention_triton.py tests/engine/test_graphs.py
step cuda_check 120 python3 -m load_tests.cuda_check
step gpu_bench 240 python3 -m load_tests.gpu --json "$OUT/gpu.json"
exit "$status"
