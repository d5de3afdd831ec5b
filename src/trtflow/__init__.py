"""trtflow: PyTorch Faster R-CNN -> verified TensorRT engines (see the README)."""

import signal
import sys
from pathlib import Path


def end_quietly(signum, frame):
    raise SystemExit(128 + signum)


# In a Snakemake script job (Snakemake runs `python <workdir>/.snakemake/scripts/<name>.py`), Ctrl-C ends the job
# with status 130 and no traceback, also while it still imports torch: Snakemake reports the run as cancelled and
# the Snakefile's `onerror` says which jobs it stopped. SystemExit unwinds like KeyboardInterrupt, so half-written
# outputs are still removed on the way out. Any other process keeps Python's KeyboardInterrupt.
if Path(sys.argv[0]).parent.parts[-2:] == (".snakemake", "scripts"):
    signal.signal(signal.SIGINT, end_quietly)
