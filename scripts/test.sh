#!/usr/bin/env bash
# The whole check, headless: ruff (lint rules in pyproject.toml), then the test suite (Qt tests
# run on an Xvfb display started by pytest-xvfb) on one pytest-xdist worker per logical CPU
# (MORPHOMOL_TEST_WORKERS overrides; 0 runs in this process), printing the 25 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
export QT_API=pyqt6 MPLBACKEND=Agg
exec .venv/bin/python -m pytest -n "${MORPHOMOL_TEST_WORKERS:-logical}" --durations=25 "$@"
