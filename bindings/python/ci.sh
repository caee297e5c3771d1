#!/usr/bin/env bash
# CI for the Python bindings: a fresh venv under target/, the package built from source with
# maturin, then the pytest suite (plain sockets, Panda3D loops, the CLI with --framing panda3d).
# Run from anywhere; expects the release CLI at target/release/udpferry (or $UDPFERRY_BIN):
#   cargo build --release --bin udpferry && bindings/python/ci.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
venv="$repo/target/py-venv"
python="${PYTHON:-python3}"

export UDPFERRY_BIN="${UDPFERRY_BIN:-$repo/target/release/udpferry}"
if [ ! -x "$UDPFERRY_BIN" ]; then
  echo "ci.sh: $UDPFERRY_BIN is missing: cargo build --release --bin udpferry (or set UDPFERRY_BIN)" >&2
  exit 1
fi

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "maturin>=1.16,<2" pytest "panda3d==1.10.16"
"$venv/bin/python" -m pip install -q ./bindings/python

# pytest exits 5 when it collected no tests: that is a failure here too (set -e).
"$venv/bin/python" -m pytest bindings/python/tests -q -p no:cacheprovider
