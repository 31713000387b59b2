#!/usr/bin/env bash
# The wheels the GPU machine's image lacks (it has torch, timm, accelerate, einops, safetensors, tifffile,
# pillow, scikit-learn and matplotlib, and no network): webdataset, braceexpand, openslide-python (abi3,
# CPython >= 3.11) and openslide-bin, into the ignored folder wheels/ (~3 MB) that the device run carries.
# The command line that uses them is in docs/benchmarks.md ("GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p wheels
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels \
    webdataset braceexpand openslide-python openslide-bin
ls -l wheels
