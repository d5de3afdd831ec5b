# Shared paths and helpers for every rule file.
# All artifact paths go through RESULTS so that a later multi-model layout
# (results/{model}/...) only changes this file.
from pathlib import Path

RESULTS = Path("results")
LOGS = Path("logs")
SRC = Path("src/trtflow")
# The software of every rule (relative to the rule files); documents what `make demo` installs.
ENV = "../envs/trtflow.yaml"


def config_section(*keys):
    """A config sub-tree as a plain dict, for `params:` (reruns follow its changes)."""
    node = config
    for key in keys:
        node = node[key]
    return node


def library(*modules):
    """The trtflow modules a rule runs, as inputs, so that editing their code reruns it."""
    return [SRC / f"{module}.py" for module in modules]


def preprocess_settings():
    """The one preprocessing every stage uses: model input size + `preprocess:`."""
    return {"input": config["model"]["input"], **config["preprocess"]}


def checkpoint_source(wildcards):
    """The checkpoint to validate (the configured file, or a fresh demo training)."""
    source = config["model"]["checkpoint"]
    return RESULTS / "model/trained_demo.safetensors" if source == "train" else source
