#!/usr/bin/env bash
# One-shot GPU check of a muxc checkout on a lent H100/H200, in under 8 minutes, with the
# machine's own python3 (torch + CUDA, triton, transformers, peft, pytest): NO installs.
#
#   bash bench/gpu_check.sh [COPY_DIR]
#
# Three parts, each under its own `timeout` so one hang cannot eat the others' time:
#   1. tests    the kernel tests on real Triton + the CUDA equivalence family
#               (pytest tests/kernels tests/test_equivalence_device.py -m "gpu or not slow")
#   2. kernels  python -m bench.kernels --quick --device cuda
#   3. e2e      python -m bench.e2e --quick --device cuda
# Results go to bench/results/ under the device's name: kernels-<gpu>.*, e2e-<gpu>-quick.*
# (e2e-<gpu>-quick.partial.csv if e2e was cut short), and gpu-check-<gpu>.md (this summary)
# with every part's log in gpu-check-<gpu>/. With COPY_DIR (e.g. "$OUT") they are copied
# there too. Exit status: 0 when every part passed, 1 otherwise, 2 when no GPU is visible.
# Seconds per part can be changed with T_TESTS, T_KERNELS, T_E2E; the interpreter with PYTHON.
set -u

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
T_TESTS=${T_TESTS:-120}
T_KERNELS=${T_KERNELS:-75}
T_E2E=${T_E2E:-240}
COPY_DIR=${1:-}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

slug=$("$PYTHON" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(2)
from bench.harness import device_slug
print(device_slug(torch.device("cuda")))
EOF
) || { echo "gpu_check: no CUDA device visible to $PYTHON; nothing run" >&2; exit 2; }

results=bench/results
logs=$results/gpu-check-$slug
summary=$results/gpu-check-$slug.md
mkdir -p "$logs"
versions=$("$PYTHON" -c 'import torch, triton, transformers, peft; print(
    f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
    f"transformers {transformers.__version__}, peft {peft.__version__}")' 2>&1 | tail -1)
gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git)")

{
  echo "# muxc GPU check: $gpu"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit, $versions."
  echo "Command: \`bash bench/gpu_check.sh\` (parts time-limited: tests ${T_TESTS} s, kernels" \
       "${T_KERNELS} s, e2e ${T_E2E} s). Logs: [gpu-check-$slug/](gpu-check-$slug/)."
  echo
  echo "| part | command | status | seconds | last line |"
  echo "|---|---|---|---|---|"
} > "$summary"

failed=0
# run NAME SECONDS CMD...: one part under `timeout`, its output in $logs/NAME.log
run() {
  local name=$1 limit=$2 start rc status last
  shift 2
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || failed=1
  last=$(grep -v -e '^\s*$' -e 'Warning' "$logs/$name.log" | tail -1 | cut -c1-300 | tr '|' '/')
  echo "   $status in $(( $(date +%s) - start )) s: $last"
  echo "| $name | \`$*\` | $status | $(( $(date +%s) - start )) | $last |" >> "$summary"
}

run tests "$T_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m "gpu or not slow" \
    tests/kernels tests/test_equivalence_device.py
run kernels "$T_KERNELS" "$PYTHON" -m bench.kernels --quick --device cuda
run e2e "$T_E2E" "$PYTHON" -m bench.e2e --quick --device cuda

json=$(grep '^{' "$logs/e2e.log" | tail -1)
{
  echo
  echo "e2e summary (last line of \`bench.e2e --quick --device cuda\`; the tables are in"
  echo "[e2e-$slug-quick.md](e2e-$slug-quick.md)):"
  echo
  echo '```json'
  echo "${json:-no JSON: see gpu-check-$slug/e2e.log (rows measured so far: e2e-$slug-quick.partial.csv)}"
  echo '```'
} >> "$summary"

echo
cat "$summary"
if [ -n "$COPY_DIR" ]; then
  mkdir -p "$COPY_DIR/results"
  cp -r "$results"/*"$slug"* "$COPY_DIR/results/" && echo "copied results to $COPY_DIR/results"
fi
exit $failed
