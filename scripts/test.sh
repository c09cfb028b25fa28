#!/usr/bin/env bash
# The whole test suite, headless (Qt tests run on an Xvfb display started by pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_API=pyqt6 MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
