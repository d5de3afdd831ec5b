# Stage `engine`: features ONNX + the TensorRT-API head -> results/engine_{precision}.plan + .json metadata.
# TensorRT-RTX builds on a CPU (ahead of time); full TensorRT needs the GPU the plan is for.
from trtflow.artifacts import installed_versions
from trtflow.build.data import dataset_categories

# A plan runs only on the TensorRT version that built it, so an upgrade (pip) must rebuild the plans:
# the installed versions are a param, and a changed param reruns the rule.
TENSORRT_VERSIONS = installed_versions(("tensorrt",))
# the class names the plan's JSON records (read from the configuration, so that rule `data` need not run first)
CATEGORIES = dataset_categories(config["data"])


rule engine:
    input:
        unpack(engine_extras),
        onnx=engine_onnx,
        weights=RESULTS / "{model}weights/head.safetensors",
        manifest=RESULTS / "{model}weights/manifest.json",
        code=script_code("build_engine"),
    output:
        plan=RESULTS / "{model}engine_{precision}.plan",
        metadata=RESULTS / "{model}engine_{precision}.json",
        # the exact network handed to the builder, for verify where the plan cannot run (trtflow.run.netexec)
        network=RESULTS / "{model}engine_{precision}.network.safetensors",
    params:
        backend=config["backend"],
        tensorrt=TENSORRT_VERSIONS,
        engine=engine_params,
        # shared by concurrent builds (file lock, merged), so not an output of any one job
        timing_cache=RESULTS / "cache/timing.cache",
        # what a runtime needs beside the plan, recorded in its JSON (trtflow.formats.usage; read by `trtflow detect`)
        usage=lambda wildcards: {"preprocess": preprocess_settings(wildcards), "postprocess": config["postprocess"],
                                 "categories": CATEGORIES},
    resources:
        gpu=engine_gpus(),
    conda:
        ENV
    log:
        LOGS / "engine/{model}{precision}.log",
    script:
        "../scripts/build_engine.py"


rule engines:
    input:
        expand(RESULTS / "{model}engine_{precision}.plan", model=MODEL_DIRS, precision=ENGINE["precisions"]),
