#!/usr/bin/env bash
# Run HERE (with network) before sending the tree to the GPU machine, which has no network and lacks deepspeed and
# pycocotools: puts cp312 manylinux wheels into .whl/ (git-ignored; name `.whl` in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-python3}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# deepspeed is an sdist: build a py3-none-any wheel without its deps.
$PY -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
# pydantic pins its pydantic-core exactly: let pip resolve that small tree (hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing_extensions); pycocotools alone (numpy is already there).
DL=(download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl)
$PY -m pip "${DL[@]}" hjson pydantic "typing_extensions>=4.16"
# pycocotools and PyAV (absent there; the data package imports av), and deepspeed's other small needs, harmless
# if the machine already has them.
$PY -m pip "${DL[@]}" --no-deps pycocotools av py-cpuinfo msgpack einops nvidia-ml-py
ls -la .whl
