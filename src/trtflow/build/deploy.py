"""Stage `deploy`: a full-TensorRT plan and its JSON (`trtflow.formats.plan_metadata.PlanMetadata`) -> a Triton model
folder (config.pbtxt, 1/model.plan, labels.txt) and a DeepStream `nvinfer` config with its label file.

Everything comes from the plan's JSON: tensor names, dtypes and shapes, the batch profile, preprocessing and classes.
Both servers load full TensorRT plans only, so a TensorRT-RTX plan is refused in one line. What `nvinfer` cannot
express of `trtflow.common.preprocess` is said in a comment of its config (see `nvinfer_normalization`).

DeepStream's output parsers (sources/libs/nvdsinfer_customparser/nvdsinfer_custombboxparser.cpp, built into
libnvds_infercustomparser.so) read a BatchedNMS layout by output index: keep count (int32), boxes x1, y1, x2, y2,
scores, classes, all three float32. `NvDsInferParseCustomBatchedNMSTLT` takes boxes normalised to 0..1 (it multiplies
them by the network size); `NvDsInferParseYoloV5CustomBatchedNMSTLT` takes them in network pixels, as our `boxes` are.
Our four outputs are that layout except `classes`, which the pipeline writes as int32: read as float32 every label
becomes 0, so the bundled parser serves a plan whose `classes` are float32, and otherwise the config names the
parser it needs (the same function reading int32 classes) and leaves the parser lines to be filled in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from trtflow.artifacts import atomic_write, files_sha256, write_text
from trtflow.formats.plan_metadata import PlanMetadata, metadata_path, plan_path, rebuild
from trtflow.precisions import PRECISIONS

SERVABLE_BACKEND = "tensorrt"  # Triton's TensorRT backend and nvinfer deserialize full TensorRT plans only
TRITON_DTYPES = {
    "FLOAT": "TYPE_FP32",
    "HALF": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "BOOL": "TYPE_BOOL",
}
DETECTION_OUTPUTS = ["num_detections", "boxes", "scores", "classes"]  # the order DeepStream's parsers index them by
LABELS_FILE = "labels.txt"
DEEPSTREAM_PARSER_LIBRARY = "/opt/nvidia/deepstream/deepstream/lib/libnvds_infercustomparser.so"
DEEPSTREAM_PARSER = "NvDsInferParseYoloV5CustomBatchedNMSTLT"  # BatchedNMS layout, boxes in network pixels
NVINFER_COLOR_FORMATS = {"rgb": 0, "bgr": 1}


class DeployError(ValueError):
    """A plan that Triton or DeepStream cannot serve, or a JSON that does not say enough to configure them."""


@dataclass(frozen=True)
class NvinferNormalization:
    """nvinfer's y = net_scale_factor * (x - offsets[c]) closest to trtflow's y = (x / 255 - mean[c]) / std[c].

    offsets = 255 * mean is exact; net-scale-factor is one number for every channel, so it is 1 / (255 * std) exactly
    where std is the same for every channel, else 1 / (255 * the mean std), and channel c then comes out multiplied by
    `channel_factors[c]` = std[c] / the mean std."""

    net_scale_factor: float
    offsets: list[float]
    channel_factors: list[float]

    @property
    def exact(self) -> bool:
        return all(factor == 1.0 for factor in self.channel_factors)


def nvinfer_normalization(preprocess: dict) -> NvinferNormalization:
    std = [float(value) for value in preprocess["std"]]
    common_std = std[0] if len(set(std)) == 1 else sum(std) / len(std)
    return NvinferNormalization(
        net_scale_factor=1.0 / (255.0 * common_std),
        offsets=[255.0 * float(value) for value in preprocess["mean"]],
        channel_factors=[value / common_std for value in std],
    )


def check_servable(metadata: PlanMetadata, source: str | Path) -> None:
    """Refuse, naming the JSON `source`, a plan neither server loads or a JSON without what their configs need."""
    if metadata.backend != SERVABLE_BACKEND:
        raise DeployError(
            f"{source}: {plan_path(source)} is a {metadata.backend} {metadata.backend_version} plan, and Triton's "
            f"TensorRT backend and DeepStream's nvinfer load only full TensorRT plans; build it with `backend: "
            f"{SERVABLE_BACKEND}` on the GPU it will serve on and {rebuild(source)}"
        )
    missing = [key for key in ("preprocess", "classes") if getattr(metadata, key) is None]
    if missing:
        raise DeployError(
            f"{source} has no {' or '.join(missing)} (a plan built outside the pipeline); {rebuild(source)}"
        )
    unknown = [f"{entry['name']} ({entry['dtype']})" for entry in metadata.inputs + metadata.outputs
               if entry["dtype"] not in TRITON_DTYPES]  # fmt: skip
    if unknown:
        raise DeployError(
            f"{source}: tensors {', '.join(unknown)} have no Triton data type; known: {list(TRITON_DTYPES)}"
        )


def max_batch_size(metadata: PlanMetadata) -> int:
    """Triton's max_batch_size: the profile's largest batch where the input's batch is dynamic (-1); 0 for a static
    shape, whose dims then include the batch."""
    first = metadata.inputs[0]
    return first["profile"]["max"][0] if first["shape"][0] == -1 else 0


def labels_text(metadata: PlanMetadata) -> str:
    """One name per line, line i the name of model label i (0: background, which the plan never outputs)."""
    names = {entry["label"]: entry["name"] for entry in metadata.classes}
    return "\n".join(["background", *(names.get(label, f"label_{label}") for label in range(1, max(names) + 1))]) + "\n"


def triton_config(metadata: PlanMetadata, name: str) -> str:
    """config.pbtxt of a TensorRT-plan model: its tensors as the JSON records them."""
    batch = max_batch_size(metadata)

    def tensor(entry: dict) -> str:
        dims = entry["shape"][1:] if batch else entry["shape"]
        fields = [f'name: "{entry["name"]}"', f"data_type: {TRITON_DTYPES[entry['dtype']]}"]
        # a tensor of one value per image (num_detections with a dynamic batch) has no dims beyond the batch: Triton
        # wants dims [1] reshaped to a scalar
        fields += [f"dims: [ {', '.join(str(d) for d in dims or [1])} ]"] + (
            [] if dims else ["reshape: { shape: [ ] }"]
        )
        fields += [f'label_filename: "{LABELS_FILE}"'] if entry["name"] == "classes" else []
        return "  {\n" + "".join(f"    {field}\n" for field in fields) + "  }"

    inputs, outputs = (
        ",\n".join(tensor(entry) for entry in entries) for entries in (metadata.inputs, metadata.outputs)
    )
    return (
        f"# written by trtflow from the plan's JSON: {metadata.precision} plan built by {metadata.backend} "
        f"{metadata.backend_version}, sha256 {metadata.plan_sha256}\n"
        f'name: "{name}"\nplatform: "tensorrt_plan"\nmax_batch_size: {batch}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        "instance_group [ { kind: KIND_GPU } ]\n"
    )


def deepstream_parser_lines(metadata: PlanMetadata, source: str | Path) -> list[str]:
    """The parser lines of the nvinfer config: DeepStream's bundled parser where the outputs are its layout with
    float32 classes; else the parser this plan needs, named in a comment, with the lines left commented out."""
    names = [entry["name"] for entry in metadata.outputs]
    if names != DETECTION_OUTPUTS:
        raise DeployError(
            f"{source}: DeepStream's detection parsers read the outputs {DETECTION_OUTPUTS} in this order, this plan "
            f"has {names}; build it with the detection head and no engine.debug_outputs"
        )
    lines = [f"parse-bbox-func-name={DEEPSTREAM_PARSER}", f"custom-lib-path={DEEPSTREAM_PARSER_LIBRARY}"]
    dtype = next(entry["dtype"] for entry in metadata.outputs if entry["name"] == "classes")
    if dtype == "FLOAT":
        return ["# DeepStream's bundled parser of the BatchedNMS layout, boxes in network pixels", *lines]
    return [
        f"# this plan's `classes` are {dtype}; DeepStream's bundled {DEEPSTREAM_PARSER} reads them as float32 (every",
        "# label would read as 0): compile the same function reading `int *classes` into your own library, and set",
        "# parse-bbox-func-name and custom-lib-path to it (its default parser cannot read these outputs)",
        *(f"# {line}" for line in lines),
    ]


def deepstream_config(metadata: PlanMetadata, source: str | Path, model_engine_file: str) -> str:
    """config_infer.txt of a primary detector on the plan (`model_engine_file` relative to the config's folder)."""
    network_mode = PRECISIONS[metadata.precision].deepstream_network_mode
    if network_mode is None:
        raise DeployError(f"DeepStream's nvinfer has no network-mode for {metadata.precision} plans")
    preprocess, postprocess = metadata.preprocess, metadata.postprocess
    first = metadata.inputs[0]
    batch = max_batch_size(metadata) or first["shape"][0]
    normalization = nvinfer_normalization(preprocess)
    std = preprocess["std"]
    scale_note = (
        [f"# net-scale-factor = 1 / (255 * std {std[0]}): exact"]
        if normalization.exact
        else [
            f"# NOT EXPRESSIBLE: std per channel {std}; nvinfer has one net-scale-factor, written for their mean, so",
            "# channel c is off by the factor "
            + ", ".join(f"{f:.4f}" for f in normalization.channel_factors)
            + "; to match exactly, fold 1/std into the network or normalise in an nvdspreprocess custom library",
        ]  # fmt: skip
    )
    pad_note = (
        "# padding: black (0) at the right and bottom, as pad_value 0"
        if preprocess.get("pad_value", 0) == 0
        else f"# NOT EXPRESSIBLE: pad_value {preprocess['pad_value']}; nvinfer pads with black (0)"
    )
    lines = [
        f"# DeepStream nvinfer config written by trtflow from {Path(source).name}: {metadata.precision} plan built by",
        f"# {metadata.backend} {metadata.backend_version} for compute capabilities {metadata.compute_capabilities}",
        "# preprocessing: y = net-scale-factor * (x - offsets[c]) on 0..255 pixels; trtflow's is (x/255 - mean) / std",
        *scale_note,
        pad_note,
        "# resize: keep ratio into the top-left corner (maintain-aspect-ratio=1, symmetric-padding=0); trtflow resizes",
        "# with cv2.INTER_AREA when shrinking and INTER_LINEAR when enlarging, nvinfer with one scaling-filter",
        "# (1: bilinear), so pixels differ by interpolation; nvinfer maps boxes back to frame pixels itself",
        "[property]",
        "gpu-id=0",
        f"model-engine-file={model_engine_file}",
        f"labelfile-path={LABELS_FILE}",
        f"batch-size={batch}",
        f"network-mode={network_mode}",
        "network-type=0",
        f"num-detected-classes={len(labels_text(metadata).splitlines())}",
        f"model-color-format={NVINFER_COLOR_FORMATS[preprocess['color']]}",
        f"net-scale-factor={normalization.net_scale_factor!r}",
        "offsets=" + ";".join(repr(value) for value in normalization.offsets),
        "maintain-aspect-ratio=1",
        "symmetric-padding=0",
        "scaling-filter=1",
        f"output-blob-names={';'.join(DETECTION_OUTPUTS)}",
        "# the plan runs its own NMS (postprocess: in its JSON): no clustering here",
        "cluster-mode=4",
        *deepstream_parser_lines(metadata, source),
        "",
        "[class-attrs-all]",
        f"pre-cluster-threshold={postprocess['score_thresh']}",
        f"topk={postprocess['max_detections']}",
    ]
    return "\n".join(lines) + "\n"


def write_triton_model(metadata: PlanMetadata, plan: Path, model_dir: Path) -> None:
    """model_dir/config.pbtxt, model_dir/1/model.plan (a copy of `plan`), model_dir/labels.txt; the folder's name is
    the model's."""
    write_text(model_dir / "config.pbtxt", triton_config(metadata, model_dir.name))
    write_text(model_dir / LABELS_FILE, labels_text(metadata))
    atomic_write(model_dir / "1/model.plan", lambda staging: shutil.copyfile(plan, staging))


def write_deepstream_config(metadata: PlanMetadata, source: Path, plan: Path, config: Path) -> None:
    """`config` (nvinfer's) and labels.txt beside it, the plan referenced where it is."""
    engine_file = os.path.relpath(plan.resolve(), config.parent.resolve())
    deepstream = deepstream_config(metadata, source, engine_file)  # refusals before anything is written
    write_text(config.parent / LABELS_FILE, labels_text(metadata))
    write_text(config, deepstream)


def deploy(plan: str | Path, triton_model_dir: str | Path, deepstream_config_path: str | Path) -> None:
    """Both servers' files for `plan`, from its JSON; refused in one line where they cannot serve it."""
    plan, source = Path(plan), metadata_path(plan)
    metadata = PlanMetadata.read(source)
    check_servable(metadata, source)
    if files_sha256(plan) != metadata.plan_sha256:
        raise DeployError(f"{plan} is not the plan {source} describes (its sha256 differs); {rebuild(source)}")
    write_deepstream_config(metadata, source, plan, Path(deepstream_config_path))
    write_triton_model(metadata, plan, Path(triton_model_dir))
