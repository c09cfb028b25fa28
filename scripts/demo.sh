#!/usr/bin/env bash
# The main job on the embedded default: `morphomol demo` on the synthetic sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_API=pyqt6
if [ -z "${DISPLAY:-}" ]; then
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/morphomol demo "$@"
fi
exec .venv/bin/morphomol demo "$@"
