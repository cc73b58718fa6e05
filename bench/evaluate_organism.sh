#!/usr/bin/env bash
# The README's removal and LDS tables on the default organism: counterfactual re-fine-tunes through
# `concept-influence evaluate`, one after another (resumable: every run is cached in runs/eval-removal/runs/, shared
# with runs/eval-lds/ through a link, so re-running this script or adding a scores file re-uses every finished run).
#
#   concept-influence demo --out runs/demo          # the scores files and the concept
#   bash bench/evaluate_organism.sh [STAGE ...]     # stages: removal10 lds removal recommended (default: all four)
#   python bench/evaluation_table.py runs/eval-removal runs/eval-lds
#
# RECOMMENDED_SCORES=path.jsonl adds that scores file (e.g. a new recommended method's) to the removal and LDS runs.
set -euo pipefail
PY=${PY:-python}
O=${ORGANISM:-$($PY -c 'import json; print(json.load(open("runs/demo/summary.json"))["organism"])')}
S=${SCORES:-runs/demo/scores}
EXTRA=${RECOMMENDED_SCORES:-}
COMMON=(--base "$O/base" --data "$O/train.jsonl" --concept runs/demo/concept --queries "$O/queries.jsonl"
        --judge organism --reader "$O/finetuned" --n-samples 8 --epochs 3 --batch-size 16 --lr 5e-4)
REMOVAL=("$S/vector-filter.jsonl" "$S/concept-influence.jsonl" "$S/combined-signed.jsonl")
LDS=("$S/vector-filter.jsonl" "$S/projection-difference.jsonl" "$S/concept-influence.jsonl" "$S/influence.jsonl"
     "$S/combined-signed.jsonl" "$S/tfidf-baseline.jsonl")
if [ -n "$EXTRA" ]; then REMOVAL+=("$EXTRA"); LDS+=("$EXTRA"); fi
mkdir -p runs/eval-removal/runs runs/eval-lds
[ -e runs/eval-lds/runs ] || ln -s ../eval-removal/runs runs/eval-lds/runs
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(removal10 lds removal recommended)
for stage in "${stages[@]}"; do
  echo "== $stage $(date +%T)"
  case $stage in
    removal10) $PY -m concept_influence.cli evaluate "${COMMON[@]}" --scores "${REMOVAL[@]}" \
                 --oracle data_origin=planted --seeds 3 --fractions 0.1 --out runs/eval-removal ;;
    lds) $PY -m concept_influence.cli evaluate "${COMMON[@]}" --scores "${LDS[@]}" \
           --seeds 1 --lds --subsets 50 --subset-fraction 0.5 --no-removal --out runs/eval-lds ;;
    removal|recommended) $PY -m concept_influence.cli evaluate "${COMMON[@]}" --scores "${REMOVAL[@]}" \
           --oracle data_origin=planted --seeds 3 --fractions 0.05,0.1,0.25 --out runs/eval-removal ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
