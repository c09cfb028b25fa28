#!/usr/bin/env bash
# The whole check, headless: ruff (lint rules in pyproject.toml), then the test suite (Qt tests
# run on an Xvfb display started by pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
export QT_API=pyqt6 MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
