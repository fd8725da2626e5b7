#!/usr/bin/env bash
# Sets up edgemix on a fresh Debian/Ubuntu machine: system packages, then a virtual environment
# in .venv with the pinned Python stack. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"

# System packages: the full Fashion-MNIST set (optional: a sample ships), the OpenSSH client for
# `edgemix bench` over ssh and sshd, which the runner tests start on 127.0.0.1 themselves; g++, the
# arm64 cross compiler and qemu-user for the native ExecuTorch runners (phone drift on arm64 kernels).
SYSTEM_PACKAGES="dataset-fashion-mnist openssh-client openssh-server g++ g++-aarch64-linux-gnu qemu-user-static"
if command -v apt-get >/dev/null 2>&1; then
  missing=$(for p in $SYSTEM_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "setup.sh: no apt-get; install these yourself if you need them: $SYSTEM_PACKAGES" >&2
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "edgemix is set up in .venv ($(.venv/bin/edgemix --help >/dev/null && echo ok))"
