#!/usr/bin/env bash
# One prepared GPU check (issue 17), for a fresh CUDA machine with this project copied in; meant to
# run in under 8 minutes on one H100/H200 with 16 cores:
#   1. installs the project into a venv over the machine's own Python (--system-site-packages, so
#      its CUDA torch, torchvision, timm and lightning are used as they are): from the wheels in
#      $WHEELS when that folder exists (no network needed), else from PyPI when it answers;
#   2. runs the CUDA-marked tests (tests/test_cuda.py: predict on CUDA equals the CPU, out-of-memory
#      halving on the real device; tests/test_data_path.py: nvJPEG tiles against libjpeg-turbo) and
#      the data-path tests;
#   3. benchmarks/bench_data_path.py --device cuda: the data path's tiles/s per core (libjpeg-turbo
#      and nvJPEG), pinned, the bare ViT-S forward in bf16, and predict end to end with ViT-S in
#      bf16 beside the bare forward at the same batch;
#   4. a one-GPU training smoke test (`morphomol train`, Lightning, one epoch of a few steps, bf16).
# Any failing step stops the script with a non-zero exit and a line saying which step failed; the
# end prints a summary of the figures.
#
# Usage: bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3: the machine's Python with CUDA torch), WORK (default
# /tmp/morphomol-gpu-check), WHEELS (default ./.whl: a wheelhouse of the project's dependencies,
# e.g. made where PyPI answers with `pip download -d .whl -r $WORK/requirements.txt`), SIZE_MM (side
# of the benchmark's synthetic sample, default 3), BATCH (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/morphomol-gpu-check}
WHEELS=${WHEELS:-$ROOT/.whl}
SIZE_MM=${SIZE_MM:-3}
BATCH=${BATCH:-64}
VENV=$WORK/venv
PY=$VENV/bin/python
START=$(date +%s)
mkdir -p "$WORK"

fail() {
  echo >&2
  echo "GPU CHECK FAILED: $*" >&2
  exit 1
}

step() {
  local name=$1
  shift
  echo
  echo "=== [$name] ($(( $(date +%s) - START )) s in)"
  local t0 rc
  t0=$(date +%s)
  set +e
  (set -euo pipefail; "$@")  # a subshell of its own, so that errexit holds inside the step's function
  rc=$?
  set -e
  [ "$rc" -eq 0 ] || fail "step '$name' exited with $rc (its output is above)"
  echo "=== [$name] done in $(( $(date +%s) - t0 )) s"
}

preflight() {
  command -v "$PYTHON" >/dev/null || { echo "no $PYTHON here; set PYTHON to a Python with CUDA torch"; return 1; }
  "$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU (CUDA build {torch.version.cuda}); this check needs one")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
}

install() {
  [ -x "$PY" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
  # the project's dependencies without its napari face (nothing here opens a viewer), and the tests'
  "$PY" - "$WORK/requirements.txt" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
gui = {"napari", "magicgui", "qtpy", "napari-spatialdata", "npe2"}
keep = [r for r in project["dependencies"] if re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() not in gui]
open(sys.argv[1], "w").write("\n".join(keep + ["pytest>=8", "hypothesis>=6.100"]) + "\n")
EOF
  if [ -d "$WHEELS" ]; then
    echo "installing from the wheelhouse $WHEELS (no network)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r "$WORK/requirements.txt"
  elif "$PY" -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=8)" 2>/dev/null
  then
    echo "installing from PyPI"
    "$PY" -m pip install -q -r "$WORK/requirements.txt"
  else
    echo "PyPI does not answer and there is no wheelhouse at $WHEELS: make one where PyPI answers"
    echo "(pip download -d .whl -r requirements.txt, for this machine's Python and platform) and copy it in"
    return 1
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  "$PY" -c "import napari_morphomol.inference, napari_morphomol.models, torch, torchvision, timm, lightning
print('installed: napari_morphomol', napari_morphomol.__file__, '| torch', torch.__version__, '| torchvision',
      torchvision.__version__, '| timm', timm.__version__, '| lightning', lightning.__version__)"
}

cuda_tests() {
  local log=$WORK/pytest_cuda.log
  "$PY" -m pytest tests/test_cuda.py tests/test_data_path.py -q -p no:cacheprovider -rA -s 2>&1 | tee "$log"
  if grep -q "SKIPPED" "$log"; then
    echo "some tests were skipped on a machine that has CUDA (see SKIPPED above)"
    return 1
  fi
  grep -o "out-of-memory halving on .*" "$log" > "$WORK/oom.txt" || { echo "the OOM test printed no figure"; return 1; }
}

sample() {
  [ -f "$WORK/sample/panel.json" ] ||
    "$PY" -m napari_morphomol.cli synth "$WORK/sample" --size-mm "$SIZE_MM" "$SIZE_MM" --seed 0
}

bench() {
  "$PY" benchmarks/bench_data_path.py --sample "$WORK/sample" --workdir "$WORK/bench" --device cuda \
    --jpeg-decoder both --workers 1 4 16 --seconds 3 --batch "$BATCH" --no-baseline --predict 2>&1 \
    | tee "$WORK/bench.log"
  grep '^{"bench_data_path"' "$WORK/bench.log" | tail -1 > "$WORK/bench.json"
  [ -s "$WORK/bench.json" ] || { echo "the benchmark printed no figures"; return 1; }
}

train_smoke() {
  local out=$WORK/train log=$WORK/train.log
  for seed in 1 2; do
    [ -f "$WORK/train_$seed/panel.json" ] ||
      "$PY" -m napari_morphomol.cli synth "$WORK/train_$seed" --size-mm 0.8 0.8 --seed "$seed" >/dev/null
  done
  rm -rf "$out"
  "$PY" -m napari_morphomol.cli train "$WORK/train_1" "$WORK/train_2" --val train_2 --out "$out" --epochs 1 \
    --batch-size 8 --accelerator gpu --devices 1 2>&1 | tee "$log"
  [ -f "$out/early_fusion_add.safetensors" ] || { echo "train wrote no checkpoint"; return 1; }
  grep -Eq "GPU available: True.*used: True" "$log" || { echo "Lightning did not train on the GPU"; return 1; }
}

step preflight preflight
step install install
step "cuda tests" cuda_tests
step sample sample
step "data path and predict benchmark" bench
t_train=$(date +%s)
step "training smoke test" train_smoke
t_train=$(( $(date +%s) - t_train ))
total=$(( $(date +%s) - START ))

echo
echo "=== GPU check summary ($(hostname), ${total} s in all; target under 480 s)"
"$PY" - "$WORK/bench.json" "$WORK/oom.txt" "$t_train" "$total" <<'EOF'
import json
import sys

f = json.load(open(sys.argv[1]))["bench_data_path"]
oom = open(sys.argv[2]).read().strip()
p, fw = f["predict"], f["vit_s_forward"]
print("tests: tests/test_cuda.py and tests/test_data_path.py passed, none skipped")
for name, run in f["one_process"].items():
    print(f"data path, one process, {name:10s}: {run['per_cpu_s']:7.1f} tiles per CPU s ({run['tiles_per_s']:.1f} wall)")
for name, run in f["parallel"].items():
    print(f"data path, {name:14s} processes: {run['tiles_per_s']:7.1f} tiles/s ({run['per_worker']:.1f} per process)")
print(f"data path per core (slower H&E): {f['per_core']:.1f} tiles/s, target 125 "
      f"{'met' if f['target_met'] else 'NOT met'}; x16 cores = {16 * f['per_core']:.0f} tiles/s")
print(f"bare ViT-S/16 forward, batch {f['batch']}: GPU bf16 {fw['cuda_bf16']['tiles_per_s']:.0f} tiles/s, "
      f"CPU 1 thread {fw['cpu_1_thread']['tiles_per_s']:.1f}")
print(f"predict end to end, {p['tiles']} tiles, ViT-S/16 early fusion, {p['dtype']} on {p['device']}, "
      f"{p['workers']} threads: chunk phase {p['chunk_phase']:.0f} tiles/s, bare forward {p['bare_forward']:.0f} "
      f"-> ratio {p['chunk_phase'] / p['bare_forward']:.3f} (whole call {p['whole_call']:.0f} tiles/s)")
print(oom)
print(f"training smoke test (morphomol train, 1 epoch, 1 GPU): {sys.argv[3]} s")
print(f"total {sys.argv[4]} s ({'within' if int(sys.argv[4]) < 480 else 'OVER'} the 8 minutes)")
EOF
