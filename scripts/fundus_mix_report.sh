#!/usr/bin/env bash
# Integration run on real photographs: the fundus-mix sample set, M1 -> M2 -> M3
# (plugins/eye_fundus/data/fundus_mix.yaml), then `distillkit report` on the run.
# Not part of the default test run; a few minutes on 2 CPU cores.
#
#   scripts/fundus_mix_report.sh [RUN_DIR] [--set KEY=VALUE ...]
#
# RUN_DIR defaults to runs/fundus_mix; extra arguments go to `distillkit run` (e.g.
# --set training.epochs=2 to shrink it). FUNDUS_MIX points at another copy of the data set.
# Prints the wall time of the run and of the report; exits 0 without doing anything when
# the data set is absent.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=${FUNDUS_MIX:-$repo/../shared/datasets/fundus-mix}
distillkit=${DISTILLKIT:-$repo/.venv/bin/distillkit}
out=$repo/runs/fundus_mix
if [[ $# -gt 0 && $1 != --* ]]; then
    out=$1
    shift
fi

if [[ ! -f $data/manifest.csv ]]; then
    echo "skipped: fundus-mix not found at $data (set FUNDUS_MIX)" >&2
    exit 0
fi

start=$(date +%s)
"$distillkit" run "$repo/plugins/eye_fundus/data/fundus_mix.yaml" --out "$out" \
    --set "data.path=$(cd "$data" && pwd)/manifest.csv" "$@"
trained=$(date +%s)
# fundus-mix captions are one or two keywords: their corpus BLEU-4 is 0, so show the sentence average per class
"$distillkit" report "$out" --group-metric text=bleu_sentence_avg
done=$(date +%s)
echo "wall time: run $((trained - start)) s, report $((done - trained)) s, total $((done - start)) s" \
     "(report: $out/report/report.html)"
