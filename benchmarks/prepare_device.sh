#!/usr/bin/env bash
# Run HERE (not on the device) before the device call: puts beside the repository what the GPU
# machine lacks, in git-ignored folders the call carries:
#   .peers/       the peer scripts and anchors (only the repository travels, not ../shared)
#   .whl/lmflax/  wheels of lmflax's data-side dependencies missing from the GPU image
#   .whl/hf4/     transformers 4.x for the Hugging Face Flax peer (transformers 5 dropped Flax)
# Then: device run(command="bash benchmarks/device_run.sh", carry=[".whl", ".peers"],
# timeout_s=600). See benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
peers="${LMFLAX_PEERS_DIR:-../shared/peers}"
[ -d "$peers" ] || peers=/work/shared/peers
mkdir -p .peers
cp "$peers"/*.py "$peers"/*.jsonl "$peers"/README.md .peers/

# Wheels for the device's Python 3.12 on x86-64 (pip matches manylinux tags exactly).
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
download() {  # download DEST PACKAGE==VERSION...
  local dest="$1"; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dest" "$@"
}
rm -rf .whl/lmflax .whl/hf4
# The versions lmflax pins (pyproject.toml) and their dependencies that the image lacks.
download .whl/lmflax grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 \
  tensorflow-datasets==4.9.10 immutabledict==4.3.1 tensorflow-metadata==1.21.0 toml==0.10.2 \
  termcolor==3.3.0 dm-tree==0.1.10 simple-parsing==0.1.9 docstring-parser==0.18.0
python3 -m pip wheel -q --no-deps -w .whl/lmflax promise==2.3  # published as a source archive only
download .whl/hf4 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
du -sh .peers .whl/lmflax .whl/hf4
