"""The plan's JSON as a file format between the build and run sides: `PlanMetadata`, one dataclass with a format
version, which the engine stage writes beside each plan (results/engine_<precision>.json beside
engine_<precision>.plan) and the runner, `trtflow detect` and the report read back by attribute.

A JSON of another format, or of another version of this one (older, or written by a newer trtflow), is refused
naming the file, the format found, the one this trtflow reads and the fix: rebuild the engine. The JSON stays plain
data: a runtime without this repository reads the fields `trtflow.formats.usage` describes (inputs, outputs, preprocess,
postprocess, classes, runtime) as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from trtflow.artifacts import write_text

FORMAT = "trtflow-plan-metadata"
VERSION = 1
FORMAT_KEY = "format"  # the JSON's first key: "<FORMAT>/<VERSION>"


class PlanMetadataError(ValueError):
    """A plan JSON this trtflow cannot read: another format or version, or not the fields of its version."""


def metadata_path(plan: str | Path) -> Path:
    """`results/engine_fp32.plan` -> `results/engine_fp32.json`, where the engine stage writes its metadata."""
    return Path(plan).with_suffix(".json")


def plan_path(metadata: str | Path) -> Path:
    """The plan a metadata JSON describes: the file of the same name beside it, ending in .plan."""
    return Path(metadata).with_suffix(".plan")


def rebuild(metadata: str | Path) -> str:
    """The fix for a metadata JSON this trtflow cannot read."""
    return f"rebuild the engine (snakemake -f {plan_path(metadata)})"


@dataclass(frozen=True)
class PlanMetadata:
    """What the engine stage knows of one plan: how it was built, where it runs, and how to use it.

    The fields in the order the JSON holds them; nested values are plain JSON (dicts and lists)."""

    backend: str  # the module that built it: tensorrt or tensorrt_rtx
    backend_version: str  # the runner refuses any other installed version
    software: dict  # trtflow.artifacts.software_versions() of the build
    precision: str
    built_on: str  # "gpu", or "cpu-aot" (TensorRT-RTX ahead of time)
    gpu: dict | None  # the GPU it was built on: name, compute_capability
    compute_capabilities: list[str]  # the GPUs it runs on; the runner refuses others
    build_seconds: float
    plan_bytes: int
    plan_sha256: str  # the runner refuses plan bytes of another sha256
    inputs: list[dict]  # name, dtype, shape (-1: the profile's batch), profile, layout, meaning (trtflow.formats.usage)
    outputs: list[dict]  # name, dtype, shape, meaning
    head: bool  # False: a features-only plan
    roi_align: str | None
    nms: str | None
    int8_mode: str | None
    layer_precisions: dict  # trtflow.backend.layer_dtypes
    network_record: dict | None  # the record beside the plan: path, sha256, layers
    timing_cache: dict
    settings: dict  # trtflow.build.engine.EngineSettings as built
    sources: dict  # onnx, checkpoint_sha256, head_weights, calibration_table, plugin_library: {path, sha256} or None
    preprocess: dict | None  # None for a plan built outside the pipeline
    postprocess: dict | None
    classes: list[dict] | None  # label, category_id, name
    runtime: dict  # backend, version, compute_capabilities, the equivalent command line

    def document(self) -> dict:
        """The JSON document: the format first, then every field in order."""
        return {FORMAT_KEY: f"{FORMAT}/{VERSION}", **{field.name: getattr(self, field.name) for field in fields(self)}}

    def text(self) -> str:
        return json.dumps(self.document(), indent=2) + "\n"

    def write(self, path: str | Path) -> None:
        write_text(path, self.text())

    @classmethod
    def from_document(cls, document, path: str | Path) -> PlanMetadata:
        """The metadata of a parsed JSON read from `path` (named in every refusal)."""
        found = document.get(FORMAT_KEY) if isinstance(document, dict) else None
        if found != f"{FORMAT}/{VERSION}":
            name, _, version = str(found).rpartition("/")
            newer = name == FORMAT and version.isdigit() and int(version) > VERSION
            raise PlanMetadataError(
                f"{path} has format {found!r}, this trtflow reads {FORMAT}/{VERSION}"
                + (" (the file was written by a newer trtflow)" if newer else "")
                + f"; {rebuild(path)}"
            )
        expected = [field.name for field in fields(cls)]
        missing = [key for key in expected if key not in document]
        unknown = [key for key in document if key not in expected and key != FORMAT_KEY]
        if missing or unknown:
            raise PlanMetadataError(
                f"{path} is not the plan metadata of {FORMAT}/{VERSION}: "
                + "; ".join(
                    f"{what} {', '.join(keys)}" for what, keys in (("missing", missing), ("unknown", unknown)) if keys
                )
                + f"; {rebuild(path)}"
            )
        return cls(**{key: document[key] for key in expected})

    @classmethod
    def parse(cls, text: str, path: str | Path) -> PlanMetadata:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanMetadataError(f"{path} is not JSON ({error}); {rebuild(path)}") from error
        return cls.from_document(document, path)

    @classmethod
    def read(cls, path: str | Path) -> PlanMetadata:
        return cls.parse(Path(path).read_text(), path)
