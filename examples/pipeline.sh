#!/bin/bash
# Shell pipeline: find scans, segment them, and pull each case's liver volume out of the
# JSON-lines events with jq. Human progress goes to stderr; stdout carries only events.
#
#   examples/pipeline.sh /data/scans out/
set -euo pipefail
SCANS=${1:?usage: pipeline.sh SCAN_FOLDER OUT_FOLDER}
OUT=${2:?usage: pipeline.sh SCAN_FOLDER OUT_FOLDER}

find "$SCANS" -name '*.nii.gz' | sort \
  | uniseg --input-list - -o "$OUT" --tasks liver --json --quiet \
  | jq -r 'select(.event == "case_done") | [.case_id, .volumes_ml.liver] | @tsv'
