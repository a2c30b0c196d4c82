#!/usr/bin/env bash
# The length study of issue 30 (docs/results/length.md), in parts that survive a lost machine: each part trains and
# scores one more arm at one more seed through benchmarks/compare.py, then copies its report into
# $RESULTS/seed<N>_partial/ to be committed. The first seed's report ($RESULTS/compare.json) and every committed
# part are restored first, so on a fresh clone
#   bash benchmarks/length_study.sh
# trains only what no committed report holds (finished parts are read back in seconds; a cut-off fit resumes from
# its last.ckpt). One heavy job at a time: nothing else should run beside it on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/length_v2  # the --out every committed part was made with
RESULTS=${RESULTS:-benchmarks/results/length_v2}

# seeds and the cumulative arm list of each part: a report lists only the arms it was asked for, so each part names
# every earlier arm of its seed count too (read back, not redone)
SEED2=meet_prompt,control_vector,coh
SEED3=meet_prompt
PARTS=(
  "2 $SEED2,one_stage_joint"
  "2 $SEED2,one_stage_joint,special_token_fast"
  "3 $SEED3"
  "3 $SEED3,control_vector"
  "3 $SEED3,control_vector,coh"
  "3 $SEED3,control_vector,coh,one_stage_joint"
  "3 $SEED3,control_vector,coh,one_stage_joint,special_token_fast"
)

# committed SEEDS ARMS: true when the committed report of that seed count holds every arm at its last seed; such a
# part is skipped, so a rerun does not overwrite the report's seconds with those of reading it back
committed() {
  "$PY" -c '
import json, sys
from pathlib import Path
report, seeds, arms = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
if not report.is_file():
    sys.exit(1)
data = json.loads(report.read_text())
last = data["settings"]["seed"] + seeds - 1
sys.exit(0 if all(f"{arm}@seed{last}" in data["results"] for arm in arms) else 1)
' "$RESULTS/seed$1_partial/compare.json" "$1" "$2"
}

for part in "${PARTS[@]}"; do
  read -r seeds arms <<<"$part"
  if committed "$seeds" "$arms"; then
    echo "== --seeds $seeds --arms $arms: held by $RESULTS/seed${seeds}_partial/compare.json, skipped"
    continue
  fi
  restore=()
  for report in "$RESULTS"/compare.json "$RESULTS"/seed*_partial/compare.json; do
    [[ -f $report ]] && restore+=("$report")
  done
  echo "== $(date -u +%H:%M) --seeds $seeds --arms $arms (restoring ${#restore[@]} report(s))"
  "$PY" benchmarks/compare.py --task length --out "$OUT" --threads 2 --seeds "$seeds" --arms "$arms" \
    ${restore[@]:+--restore "${restore[@]}"}
  mkdir -p "$RESULTS/seed${seeds}_partial"
  cp "$OUT"/compare.{json,md,png} "$RESULTS/seed${seeds}_partial/"
done
