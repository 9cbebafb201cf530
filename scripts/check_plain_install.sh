#!/usr/bin/env bash
# A plain install works: a new venv, torch, `pip install .` with no extras (so no nltk,
# torchvision, Pillow or matplotlib), then every core command. The bundled eye plugin must be
# reported once, with the extra to install; nothing may end in a traceback.
#
#   scripts/check_plain_install.sh [VENV_DIR]      (default: a new temporary folder)
#
# Environment: PYTHON (default python3), TORCH (default torch==2.14.1, the Makefile's pin).
# Prints "plain install: ok" at the end, or the first check that failed (exit status 1).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.14.1}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
VENV=${1:-$SCRATCH/venv}
BIN=$VENV/bin

fail() { echo "plain install: FAILED: $*" >&2; exit 1; }

echo "== venv $VENV"
"$PYTHON" -m venv "$VENV"
"$BIN/python" -m pip install --quiet "$TORCH"
# Install from a copy of the tracked (and new, unignored) files: the build leaves nothing in
# the checkout and sees no local venv or runs.
mkdir "$SCRATCH/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) \
        | tar -xf - -C "$SCRATCH/src"
else  # an unpacked source archive
    tar -C "$REPO" --exclude=.venv --exclude=runs --exclude=build --exclude='*.egg-info' -cf - . \
        | tar -xf - -C "$SCRATCH/src"
fi
"$BIN/python" -m pip install --quiet "$SCRATCH/src"
"$BIN/python" -m pip list 2>/dev/null | grep -iE "^(torch|distillkit|pydantic|pluggy) " || true

for module in nltk torchvision PIL matplotlib; do
    if "$BIN/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
        fail "$module is installed, so this is not a plain install"
    fi
done

# Outside the checkout, so that only the installed distillkit can be imported.
WORK=$SCRATCH/work
mkdir "$WORK"
cp "$REPO/examples/toy.yaml" "$REPO/examples/toy_sweep.yaml" "$WORK/"
cd "$WORK"
export DISTILLKIT_CACHE=$WORK/cache COLUMNS=160
unset DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD PYTHONPATH || true

NOTICE="warning: plugin 'eye_fundus' is unavailable: No module named"
EXTRA="pip install 'distillkit[eye]'"

# check NAME EXPECTED_STATUS NOTICES -- ARGS...: run `distillkit ARGS`, show its output, and
# check its exit status, that it printed the eye plugin's notice NOTICES times, and no traceback.
check() {
    local name=$1 want=$2 notices=$3
    shift 4
    echo "== distillkit $*"
    local status=0
    "$BIN/distillkit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || status=$?
    sed 's/^/  | /' "$WORK/$name.out" "$WORK/$name.err"
    [ "$status" = "$want" ] || fail "distillkit $* exited with $status, expected $want"
    ! grep -q "Traceback" "$WORK/$name.err" || fail "distillkit $* printed a traceback"
    local seen
    seen=$(grep -c "^$NOTICE" "$WORK/$name.err" || true)
    [ "$seen" = "$notices" ] || fail "distillkit $* printed the eye plugin's notice $seen times, expected $notices"
    if [ "$notices" != 0 ]; then
        grep "^$NOTICE" "$WORK/$name.err" | grep -qF "$EXTRA" || fail "the notice does not name $EXTRA"
    fi
}

check help 0 0 -- --help
check plugins 0 1 -- plugins
grep -q "^builtin " "$WORK/plugins.out" || fail "distillkit plugins does not list the built-in components"
check validate 0 1 -- validate toy.yaml
check run 0 1 -- run toy.yaml --out run --quiet --set training.epochs=2 --set data.num_labeled=240 \
    --set data.num_unlabeled=120
[ -f run/metrics.json ] && [ -f run/stages/m3/model.safetensors ] || fail "the toy run left no metrics or model"
check rerun 0 1 -- run toy.yaml --out run --quiet --set training.epochs=2 --set data.num_labeled=240 \
    --set data.num_unlabeled=120
check eval 0 1 -- eval run --split val
check sweep 0 1 -- sweep toy_sweep.yaml --out sweep --dry-run
# The report draws with matplotlib (the `report` extra): a clear error naming it, status 2.
check report 2 1 -- report run --no-data
grep -qF "distillkit[report]" "$WORK/report.err" || fail "distillkit report does not name the report extra"
# predict is a core command: the toy source reads a point (8 numbers) from a text file.
echo "0.5 -1 2 0 1.5 -0.5 0.25 3" > point.txt
check predict 0 1 -- predict run/stages/m3/model.safetensors point.txt
grep -q "^point.txt" "$WORK/predict.out" || fail "distillkit predict printed no prediction for point.txt"
# An eye command says its plugin is unavailable instead of failing inside.
check eval-manifest 2 1 -- eval-manifest run manifest.csv
grep -q "is a command of plugin 'eye_fundus', which is unavailable" "$WORK/eval-manifest.err" \
    || fail "distillkit eval-manifest does not say that the eye plugin is unavailable"

echo "plain install: ok"
