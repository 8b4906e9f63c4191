#!/usr/bin/env bash
# Re-measure the figures on docs/performance.rst (about 20 minutes on 2 cores),
# then rebuild its table and plot:  bash docs/bench/run.sh
set -euo pipefail
cd "$(dirname "$0")"
b="python -m numba_lora bench --budget 2"
$b --shape 4096x4096 --rank 4,16,64 --batch 1,8,64,512 --memory --cold-start --json reference.json
$b --shape 1024x1024 --shape 11008x4096 --rank 16 --batch 1,8,64,512 --no-multi --json shapes.json
$b --shape 4096x4096 --rank 16 --dtype float64 --batch 1,8,64,512 --no-multi --json float64.json
$b --shape 4096x4096 --rank 16 --threads 1,2 --batch 1,64,512 --no-multi --json threads.json
python ../make_performance.py reference.json shapes.json float64.json threads.json
