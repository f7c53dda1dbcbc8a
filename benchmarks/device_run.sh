#!/usr/bin/env bash
# Run ON the GPU machine, in one device call (after benchmarks/prepare_device.sh here):
#   run(command="bash benchmarks/device_run.sh", carry=[".whl", ".peers"], timeout_s=600)
# Installs the carried wheels, then runs benchmarks.side_by_side within BUDGET_S seconds
# (default 520), writing results.jsonl, log.txt and summary.md to $OUT. Extra arguments go to
# side_by_side (e.g. --only=lmflax_gpt2_124m,plain_flax_gpt2_124m_b32 for a second call).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lmflax_device_out}"
mkdir -p "$OUT"
install() {  # install TARGET WHEELS...
  local target="$1"; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$target" "$@"
}
install /tmp/site .whl/lmflax/*.whl || { echo "installing .whl/lmflax failed"; exit 1; }
hf=()
if ls .whl/hf4/*.whl >/dev/null 2>&1 && install /tmp/site_hf .whl/hf4/*.whl; then
  hf=(--hf_site /tmp/site_hf)
fi
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/nvidia-smi.txt"
python3 -c "import jax, flax, lmflax.train.loop; print('jax', jax.__version__, 'flax', \
flax.__version__, jax.devices())" 2>&1 | tail -3
python3 -m benchmarks.side_by_side --peers_dir .peers --out_dir "$OUT" \
  --budget_s "${BUDGET_S:-520}" ${hf[@]+"${hf[@]}"} "$@"
