#!/usr/bin/env bash
# Builds the release wheel and installs it into a fresh venv (without torch: the file
# commands must not need it), then drives the installed `rrome` command end to end.
set -euo pipefail
PY=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$root/dist"
(cd "$root" && "$(dirname "$PY")/maturin" build --release -q -o "$root/dist")
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "numpy>=1.26" "click>=8.1" "tqdm>=4.66" "safetensors>=0.4"
"$work/venv/bin/pip" install -q --no-deps "$root"/dist/rrome-*.whl
cd "$work"
"$work/venv/bin/python" "$root/.ci/wheel_smoke.py" "$work/venv/bin/rrome"
echo "wheel check: ok ($(ls "$root"/dist))"
