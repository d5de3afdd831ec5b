# Stage `deploy`: a plan and its JSON -> a Triton model repository (results/deploy/triton/, one model per
# precision: trtflow_<precision>/config.pbtxt, 1/model.plan, labels.txt; tritonserver --model-repository=it) and a
# DeepStream nvinfer config per precision (results/deploy/deepstream/<precision>/config_infer.txt, labels.txt).
# Not in the default target: both servers load full TensorRT plans only, so a TensorRT-RTX plan (the demo's on a
# CPU) is refused in one line; ask for `deployments` (or one file) where `backend: tensorrt` built the plans.


rule deploy:
    input:
        plan=RESULTS / "{model}engine_{precision}.plan",
        metadata=RESULTS / "{model}engine_{precision}.json",
        code=script_code("deploy"),
    output:
        triton_config=RESULTS / "{model}deploy/triton/trtflow_{precision}/config.pbtxt",
        triton_plan=RESULTS / "{model}deploy/triton/trtflow_{precision}/1/model.plan",
        triton_labels=RESULTS / "{model}deploy/triton/trtflow_{precision}/labels.txt",
        deepstream_config=RESULTS / "{model}deploy/deepstream/{precision}/config_infer.txt",
        deepstream_labels=RESULTS / "{model}deploy/deepstream/{precision}/labels.txt",
    conda:
        ENV
    log:
        LOGS / "deploy/{model}{precision}.log",
    script:
        "../scripts/deploy.py"


rule deployments:
    input:
        expand(RESULTS / "{model}deploy/triton/trtflow_{precision}/config.pbtxt", model=MODEL_DIRS,
               precision=ENGINE["precisions"]),
        expand(RESULTS / "{model}deploy/deepstream/{precision}/config_infer.txt", model=MODEL_DIRS,
               precision=ENGINE["precisions"]),
