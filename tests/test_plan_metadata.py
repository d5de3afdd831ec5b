"""trtflow.formats.plan_metadata: the plan's JSON as one versioned dataclass, written as the engine stage wrote it before the
format had a version (plus the version), and refused by name where it is of another format or version."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from trtflow.artifacts import files_sha256
from trtflow.formats.plan_metadata import FORMAT, VERSION, PlanMetadata, PlanMetadataError, metadata_path, plan_path

# The keys of results/engine_<precision>.json in the order the engine stage wrote them before this format existed
# (commit dfff426, an inline dict in trtflow.build.engine): the JSON keeps them, in this order, after the format key.
ENGINE_JSON_KEYS = (
    "backend",
    "backend_version",
    "software",
    "precision",
    "built_on",
    "gpu",
    "compute_capabilities",
    "build_seconds",
    "plan_bytes",
    "plan_sha256",
    "inputs",
    "outputs",
    "head",
    "roi_align",
    "nms",
    "int8_mode",
    "layer_precisions",
    "network_record",
    "timing_cache",
    "settings",
    "sources",
    "preprocess",
    "postprocess",
    "classes",
    "runtime",
)
RTX_TARGETS = ["8.0", "8.6", "8.9", "12.0", "12.1"]


def plan_metadata(**changes) -> PlanMetadata:
    """The metadata of the demo's fp32 plan as the engine stage writes it (TensorRT-RTX, built on a CPU, shortened
    where it does not matter), with `changes`."""
    shape = {"name": "images", "dtype": "FLOAT", "shape": [1, 3, 320, 320], "layout": "NCHW", "meaning": "images"}
    metadata = PlanMetadata(
        backend="tensorrt_rtx",
        backend_version="1.7.1.116",
        software={"python": "3.11.7", "tensorrt_rtx_cu13": "1.7.1.116"},
        precision="fp32",
        built_on="cpu-aot",
        gpu=None,
        compute_capabilities=RTX_TARGETS,
        build_seconds=0.937,
        plan_bytes=19153580,
        plan_sha256="eb50c03be1e9496826d8eccaede77efd9cd2b81f48aa1eadc65bee01a6f1eaec",
        inputs=[shape],
        outputs=[{"name": "num_detections", "dtype": "INT32", "shape": [1], "meaning": "detections per image"}],
        head=True,
        roi_align="builtin",
        nms="static",
        int8_mode=None,
        layer_precisions={"source": "network_definition", "layers": 982, "output_dtypes": {"FLOAT": 752}},
        network_record=None,
        timing_cache={"used": False, "reason": "tensorrt_rtx 1.7.1.116 does not use timing caches"},
        settings={"precision": "fp32", "batch": {"min": 1, "opt": 1, "max": 1}, "compute_capabilities": []},
        sources={
            "onnx": None,
            "checkpoint_sha256": None,
            "head_weights": None,
            "calibration_table": None,
            "plugin_library": None,
        },
        preprocess=None,
        postprocess=None,
        classes=None,
        runtime={"backend": "tensorrt_rtx", "version": "1.7.1.116", "compute_capabilities": RTX_TARGETS},
    )
    return replace(metadata, **changes)


def write_plan(plan: Path, plan_bytes: bytes = b"not a plan", **changes) -> Path:
    """`plan` with `plan_bytes` and its metadata beside it (`plan_metadata(**changes)`, the bytes' size and sha256)."""
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(plan_bytes)
    digest = {"plan_bytes": len(plan_bytes), "plan_sha256": hashlib.sha256(plan_bytes).hexdigest()}
    plan_metadata(**(digest | changes)).write(metadata_path(plan))
    return plan


def file_record(path: Path, text: str = "stand-in") -> dict:
    """A file named in the plan's `sources` as the engine stage records it: written with `text`, its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {"path": str(path), "sha256": files_sha256(path)}


def test_the_json_is_the_engine_stages_with_its_format_first(tmp_path):
    """The bytes the engine stage wrote before the format had a version (json.dumps(..., indent=2) of the keys
    above, and a newline), with one line added: the format. A runtime reads the same keys as before."""
    metadata = plan_metadata()
    path = metadata_path(tmp_path / "engine_fp32.plan")
    metadata.write(path)
    before = json.dumps({key: getattr(metadata, key) for key in ENGINE_JSON_KEYS}, indent=2) + "\n"
    added = f'  "format": "{FORMAT}/{VERSION}",\n'
    assert path.read_text() == before.replace("{\n", "{\n" + added, 1)
    assert list(json.loads(path.read_text())) == ["format", *ENGINE_JSON_KEYS]
    assert PlanMetadata.read(path) == metadata


def test_the_json_sits_beside_its_plan():
    assert metadata_path("results/demo/engine_int8.plan") == Path("results/demo/engine_int8.json")
    assert plan_path("results/demo/engine_int8.json") == Path("results/demo/engine_int8.plan")


def written(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "engine_fp32.json"
    path.write_text(json.dumps(document))
    return path


def test_a_newer_version_is_refused_naming_file_versions_and_fix(tmp_path):
    path = written(tmp_path, {**plan_metadata().document(), "format": f"{FORMAT}/{VERSION + 1}"})
    with pytest.raises(PlanMetadataError) as refused:
        PlanMetadata.read(path)
    assert str(refused.value) == (
        f"{path} has format '{FORMAT}/{VERSION + 1}', this trtflow reads {FORMAT}/{VERSION} (the file was written "
        f"by a newer trtflow); rebuild the engine (snakemake -f {tmp_path / 'engine_fp32.plan'})"
    )


@pytest.mark.parametrize(
    "found",
    [None, f"{FORMAT}/0", "trtflow-network-record/2", "trtflow-plan-metadata/one"],
    ids=["no format (before versions)", "an older version", "another format", "no version number"],
)
def test_another_format_or_version_is_refused(tmp_path, found):
    document = {key: value for key, value in plan_metadata().document().items() if key != "format"}
    path = written(tmp_path, document if found is None else {"format": found, **document})
    with pytest.raises(PlanMetadataError) as refused:
        PlanMetadata.read(path)
    assert str(refused.value) == (
        f"{path} has format {found!r}, this trtflow reads {FORMAT}/{VERSION}; rebuild the engine "
        f"(snakemake -f {tmp_path / 'engine_fp32.plan'})"
    )


def test_fields_missing_or_unknown_to_its_version_are_refused(tmp_path):
    document = plan_metadata().document()
    del document["plan_sha256"], document["runtime"]
    path = written(tmp_path, {**document, "plan_md5": "0"})
    with pytest.raises(PlanMetadataError, match=r"missing plan_sha256, runtime; unknown plan_md5; rebuild the engine"):
        PlanMetadata.read(path)
    path.write_text('{"format": ')
    with pytest.raises(PlanMetadataError, match=r"engine_fp32\.json is not JSON \(.*\); rebuild the engine"):
        PlanMetadata.read(path)
