"""Python imports this at the start of every Snakemake job of this workflow: trtflow.workflow.use_workflow_source puts
this folder first on the jobs' PYTHONPATH, before the workflow's src/. Importing trtflow here makes its __init__ take
Ctrl-C over (status 130, no traceback) before Snakemake's script preamble imports anything, not only once the script
reaches its own `import trtflow`. The environment's own sitecustomize, which this module's name shadows, still runs
after it."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import trtflow  # noqa: F401 -- for its Ctrl-C handler in script jobs

HERE = Path(__file__).resolve().parent
others = [entry for entry in sys.path if entry and Path(entry).resolve() != HERE]
shadowed = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
if shadowed is not None:
    module = importlib.util.module_from_spec(shadowed)
    sys.modules[__name__] = module
    shadowed.loader.exec_module(module)
