#!/usr/bin/env bash
# A cluster-generic submit command that submits to this machine, for tests and trying a cluster profile out:
#   snakemake --executor cluster-generic --jobs 2 \
#       --cluster-generic-submit-cmd "bash tests/submit_local.sh {rule}" TARGETS
# Snakemake appends the job script. It runs in the background (output beside it, in <job script>.out), this
# prints its process id as the job id, and the job's line (id, the given words) goes to $SUBMIT_LOG if set.
# The plugin learns that a job ended from the marker file the job script touches.
set -euo pipefail
jobscript="${@: -1}"
nohup bash "$jobscript" > "$jobscript.out" 2>&1 < /dev/null &
if [[ -n "${SUBMIT_LOG:-}" ]]; then
    echo "$! ${*:1:$#-1}" >> "$SUBMIT_LOG"
fi
echo $!
