#!/usr/bin/env bash
# One command to set everything up from a clean checkout, into the active Python (use a venv if you like):
#   bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
# sam2 ships as a source package; its optional CUDA extension only fills small mask holes.
# Skip compiling it (no nvcc needed) unless you ask for it with SAM2_BUILD_CUDA=1.
export SAM2_BUILD_CUDA="${SAM2_BUILD_CUDA:-0}"
python -m pip install --upgrade "pip>=23" setuptools wheel
# The pins of torch, torchvision and sam2, read from pyproject.toml (the one list of versions).
mapfile -t FIRST < <(python scripts/pins.py torch torchvision sam2)
# torch first so sam2's build (no isolation: no second multi-GB torch download) can see it.
python -m pip install "${FIRST[0]}" "${FIRST[1]}"
python -m pip install --no-build-isolation "${FIRST[2]}"
# everything else: the project (editable, provides `ssl-medsam2`) with its pinned dependencies and extras
python -m pip install -r requirements.txt
