#!/usr/bin/env bash
# The README's removal and LDS tables on the default organism: counterfactual re-fine-tunes through
# `concept-influence evaluate`, one after another. Resumable: every fine-tune + measurement is cached in
# runs/eval-removal/runs/ (keyed by removal, seed, recipe and measurement; runs/eval-lds/runs links to it), so
# re-running a stage, or adding a scores file, re-uses every finished run and trains only what is new.
#
#   concept-influence demo --out runs/demo          # the concept and the single methods' scores
#   bash bench/evaluate_organism.sh [STAGE ...]     # stages: scores removal lds (default: all three)
#   python bench/evaluation_table.py runs/eval-removal runs/eval-lds
#
# `scores` writes the recommended method's scores (`attribute` with no --method) to runs/recommended/.
# EXTRA_SCORES="a.jsonl b.jsonl" adds scores files to the removal and LDS runs.
set -euo pipefail
PY=${PY:-python}
O=${ORGANISM:-$($PY -c 'import json; print(json.load(open("runs/demo/summary.json"))["organism"])')}
S=runs/demo/scores
R=runs/recommended/recommended.jsonl
read -r -a EXTRA <<< "${EXTRA_SCORES:-}"
COMMON=(--base "$O/base" --data "$O/train.jsonl" --concept runs/demo/concept --queries "$O/queries.jsonl"
        --judge organism --reader "$O/finetuned" --n-samples 8 --epochs 3 --batch-size 16 --lr 5e-4)
REMOVAL=("$R" "$S/vector-filter.jsonl" "$S/concept-influence.jsonl" "${EXTRA[@]}")
LDS=("$S/vector-filter.jsonl" "$S/projection-difference.jsonl" "$S/concept-influence.jsonl" "$S/influence.jsonl"
     "$R" "$S/tfidf-baseline.jsonl" "${EXTRA[@]}")
mkdir -p runs/eval-removal/runs runs/eval-lds
[ -e runs/eval-lds/runs ] || ln -s ../eval-removal/runs runs/eval-lds/runs
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(scores removal lds)
for stage in "${stages[@]}"; do
  echo "== $stage $(date +%T)"
  case $stage in
    scores) [ -e "$R" ] || $PY -m concept_influence.cli attribute --model "$O/finetuned" --data "$O/train.jsonl" \
              --concept runs/demo/concept --queries "$O/queries.jsonl" --workdir runs/recommended/work --out "$R" ;;
    removal) $PY -m concept_influence.cli evaluate "${COMMON[@]}" --scores "${REMOVAL[@]}" \
               --oracle data_origin=planted --seeds 3 --fractions 0.05,0.1,0.25 --out runs/eval-removal ;;
    lds) $PY -m concept_influence.cli evaluate "${COMMON[@]}" --scores "${LDS[@]}" \
           --oracle data_origin=planted --seeds 1 --lds --subsets 50 --subset-fraction 0.5 --no-removal --out runs/eval-lds ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
