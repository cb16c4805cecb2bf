#!/usr/bin/env bash
# Issue 16's two leaderboards, rebuilt from the committed held-out runs:
# both models, all five tasks (single needle, multi-key, multi-value, QA,
# multi-turn; 20 held-out cases each, 1,000 tokens), ratios 0.5-0.95; EMS's
# default, EMS with lookahead=True and with lookahead_room=2, and kvpress's
# three strongest presses (CAM, TOVA, KeyDiff). No model runs: every row was
# run by `kvcompress eval --suite ruler` (commands in benchmarks/RESULTS.md,
# "Where EMS stands") and is joined here on the same cases.
#
#   bash benchmarks/suite_leaderboards.sh [OUT]      # default OUT=leaderboards; seconds
#
# writes OUT/smollm2/ and OUT/gemma3/ (suite.json, suite.md, suite.png,
# suite_bytes.png); README's plots are copies of the two suite.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-leaderboards}
R=benchmarks/results
ROWS=ems,ems:lookahead=True,ems:lookahead=True:lookahead_room=2,kvpress:CAM,kvpress:TOVA,kvpress:KeyDiff

# SmolLM2: EMS's default ran as ems:tau=0.8 before tau=0.8 became the default
LA=$R/suite_smollm2_heldout_lookahead.json
"$PY" benchmarks/suite_combine.py \
    $R/suite_smollm2_heldout_ems_tau08.json \
    $R/suite_smollm2_heldout_ems_r0875_r095.json \
    $LA+$R/suite_smollm2_heldout_lookahead_mv_mt_r075.json \
    $LA+$R/suite_smollm2_heldout_lookahead_mv_mt.json \
    $R/suite_smollm2_heldout_lookahead_room.json \
    $R/suite_kvpress_heldout_r050.json \
    $R/suite_kvpress_heldout.json+$R/suite_kvpress_heldout_mv_mt_r075.json \
    $R/suite_kvpress_heldout_r0875_r095.json \
    $R/suite_kvpress_heldout_r090.json \
    --rename 'ems:tau=0.8=>ems' --methods $ROWS --out "$OUT/smollm2" >/dev/null

# Gemma 3: kvpress's multi-value and multi-turn rows ran apart from its other three tasks
MV=$R/suite_gemma3_kvpress_heldout_mv_mt.json
GLA=$R/suite_gemma3_heldout_lookahead_mv_mt.json
"$PY" benchmarks/suite_combine.py \
    $R/suite_gemma3_heldout_ems_tau08.json \
    $R/suite_gemma3_heldout_lookahead.json+$GLA \
    $R/suite_gemma3_heldout_lookahead_r0875_r095.json+$GLA \
    $R/suite_gemma3_heldout_lookahead_room.json \
    $R/suite_gemma3_kvpress_heldout_r050.json+$R/suite_gemma3_kvpress_heldout_mv_mt_r050.json \
    $R/suite_gemma3_kvpress_heldout.json+$MV \
    $R/suite_gemma3_kvpress_heldout_cam_r0875_r095.json+$MV \
    $R/suite_gemma3_kvpress_heldout_r090.json+$MV \
    $R/suite_gemma3_kvpress_heldout_tova_keydiff_r0875_r095.json+$MV \
    --methods $ROWS --out "$OUT/gemma3" >/dev/null

for m in smollm2 gemma3; do
    echo "== $m ($OUT/$m/suite.md)"
    tail -n +3 "$OUT/$m/suite.md"
done
