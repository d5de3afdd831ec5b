"""Python imports this at the start of every Snakemake job of this workflow: trtflow.workflow.use_workflow_source puts
this folder first on the jobs' PYTHONPATH. Ctrl-C while Snakemake's script preamble still imports (before the
script's `import trtflow`, whose __init__ takes over) then ends the job with status 130 and no traceback, as later;
without it, a Ctrl-C in the first second of a job printed Python's KeyboardInterrupt traceback. The environment's
own sitecustomize, which this module's name shadows, still runs after it."""

import importlib.machinery
import importlib.util
import signal
import sys
from pathlib import Path


# trtflow/__init__.py's handler, restated: importing trtflow here would pick the copy the job's Python finds now,
# before the script's folder is on sys.path, and so hide from check_job_code a trtflow the script would import.
def end_quietly(signum, frame):
    raise SystemExit(128 + signum)


if Path(sys.argv[0]).parent.parts[-2:] == (".snakemake", "scripts"):  # a script job, as in trtflow/__init__.py
    signal.signal(signal.SIGINT, end_quietly)

HERE = Path(__file__).resolve().parent
others = [entry for entry in sys.path if entry and Path(entry).resolve() != HERE]
shadowed = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
if shadowed is not None:
    module = importlib.util.module_from_spec(shadowed)
    sys.modules[__name__] = module
    shadowed.loader.exec_module(module)
