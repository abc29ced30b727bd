#!/usr/bin/env bash
# The fault drill (tests/drill.rs) at full size: 1,000 chat jobs on a 3-node
# NATS cluster whose workers are SIGKILLed at random and whose job-queue
# leader is killed for good, and 500 on a single nats-server restarted
# mid-run. Prints jobs lost, answers that differ from the quiet system's,
# and the latency percentiles.
#   scripts/drill.sh            1,000 jobs
#   scripts/drill.sh 3000       more
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export NATTER_MODELS_DIR="${NATTER_MODELS_DIR:-$CACHE/models}"
scripts/install-deps.sh
export NATTER_DRILL_JOBS="${1:-1000}"
cargo test --workspace --test drill -- --test-threads 1 --nocapture 2>&1 | grep -E "^drill|test result|panicked|lost|differ"
