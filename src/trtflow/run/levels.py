"""The verification levels a verify result can claim (`verified_level`), weakest first, and what each leaves
unverified. `trtflow.run.executors.choose_executor` picks the strongest that runs here; the report shows them. A
module of its own, so that the report reads them without loading the executors."""

LEVELS = ("deployment-form", "network-definition", "engine")  # weakest first
UNVERIFIED = {
    "engine": None,
    "network-definition": "TensorRT's compilation of this network (layer fusion, kernel choice, reduced-precision "
    "kernels) did not run here",
    "deployment-form": "neither the plan nor the TensorRT network definition ran here: only the algorithm's "
    "ONNX Runtime + PyTorch twin was checked",
}
