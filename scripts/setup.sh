#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu with Python >= 3.10: system libraries for Qt/OpenGL under
# Xvfb, a virtual environment in .venv, and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxkbcommon0 libdbus-1-3
  libfontconfig1 libglib2.0-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
  libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1"

missing=$(for p in $SYSTEM_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
done)
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing system packages: $(echo $missing)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $(echo $missing) >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.morphomol-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch and torchvision together, so that pip picks builds that import against each other
  .venv/bin/python -m pip install -q "torch>=2.2" "torchvision"
  .venv/bin/python -m pip install -q -e ".[testing]"
  touch "$stamp"
fi
