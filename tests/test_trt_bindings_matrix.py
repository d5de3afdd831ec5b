"""Full TensorRT 10.0 - 11.4: our TensorRT code against each version's real Python bindings.

Each version (cu12: the newest release of every minor version; cu13: its first and newest) runs in its
own interpreter (tests/trt_bindings.py) on the PyPI bindings wheel and the `tensorrt` frontend as PyPI
lays it out, over a *library shim* that answers libnvinfer's C entry points with NULL. So the classes,
enums, signatures, pybind trampolines and all of `tensorrt.plugin` are TensorRT's own; nothing is built
or run, and the plugin registry is a stand-in dict. What these tests prove: capability detection, plugin
registration and creation, autotune combinations, aot_impl kernel names / PTX / argument counts,
IPluginV3 fields and formats, the calibrator class, and the config check, each on the real binding layer
of every version. What they do not prove: that TensorRT builds or runs anything (launch-parameter
values, shape inference, timing caches and inspector output come from the native library and are not
exercised here).
"""

from __future__ import annotations

import json

import pytest

import trt_bindings
from trtflow.backend import layer_dtypes
from trtflow.backend.implicit_int8 import CALIBRATORS, parse_cache_header
from trtflow.backend.roi_align_plugin import ATTRIBUTES, kernel_name
from trtflow.common.plugins import RoIAlignSpec
from trtflow.formats.calibration_table import version_tag
from trtflow.formats.network_record import LAYER_ATTRIBUTES, unaccounted_attributes

# Inspector output keys (not in the bindings: the native library writes the JSON). TensorRT 10
# "Format/Datatype" as its documentation and trtexec --exportLayerInfo show; TensorRT 11 "Format" and
# "Datatype" as reported in issue 14.
INSPECTOR_KEYS = {
    10: {"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"},
    11: {"Format": "Channel major format where channel % 8 == 0", "Datatype": "Half"},
}
LEVELS = 4  # the probe's level count (tests/trt_bindings_probe.py)
ATTRS = dict(zip(ATTRIBUTES, RoIAlignSpec(output_size=(7, 5), sampling_ratio=2, num_levels=LEVELS).c_args()))


def release(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in version.split(".")[:2])


AOT_BINDINGS = [b for b in trt_bindings.BINDINGS if release(b.version) >= (10, 9)]
RUNS = [(b, False) for b in trt_bindings.BINDINGS] + [(b, True) for b in AOT_BINDINGS]
run_ids = [f"{b}-numpy<2.4" if old else str(b) for b, old in RUNS]


@pytest.fixture(scope="module")
def reports():
    try:
        return trt_bindings.probe_all(RUNS)
    except trt_bindings.Unavailable as error:
        pytest.skip(f"TensorRT bindings matrix: {error}")


def value(report: dict, key: str):
    entry = report[key]
    assert "error" not in entry, f"{key}: {entry['error']}"
    return entry["value"]


@pytest.mark.parametrize("bindings", trt_bindings.BINDINGS, ids=str)
def test_capabilities_follow_each_versions_bindings(reports, bindings):
    report, version = reports[(bindings, False)], bindings.version
    assert report["version"] == version and report["module"].endswith("site/tensorrt/__init__.py")
    facts, backend = report["bindings"], value(report, "backend")
    assert facts["add_cumulative"] == (release(version) >= (10, 8))  # the binding itself: 10.7 lacks it
    assert facts["entropy_calibrator2"] == facts["builder_flag_int8"] == (release(version) < (11, 0))
    assert facts["add_plugin_v3"] and facts["add_nms"] and facts["timing_cache_combine"] and facts["inspector_json"]
    assert facts["set_timing_cache_ignore_mismatch"]  # Backend.load_timing_cache passes it by keyword
    assert facts["strongly_typed_flag"] and facts["progress_monitor"]
    # fp8 needs no flag: every version takes FP8 Q/DQ in a strongly typed network (BuilderFlag.FP8, for weakly typed
    # networks, went with 11.0 as FP16 and INT8 did)
    assert facts["fp8_data_type"] and facts["add_quantize_output_type"]
    assert facts["builder_flag_fp8"] == (release(version) < (11, 0))
    if release(version) >= (10, 9):
        assert facts["add_plugin_aot"]
    assert backend["name"] == "tensorrt" and backend["version"] == version
    assert backend["capabilities"] == {
        "python_plugins": True,
        "cumulative_layer": release(version) >= (10, 8),
        "plugin_aot": release(version) >= (10, 9),
        "nms_layer": True,
        "int8_kernels": True,
        "implicit_calibrator": release(version) < (11, 0),
        "timing_cache": True,
        "compute_capability_targets": False,
    }
    assert backend["flavour"] == {"value": "aot" if release(version) >= (10, 9) else "ipluginv3"}


@pytest.mark.parametrize(("bindings", "old_numpy"), RUNS, ids=run_ids)
def test_roi_align_plugin_is_refused_exactly_where_tensorrt_cannot_take_it(reports, bindings, old_numpy):
    """Findings 1 and 2: before 10.8 no add_cumulative; 10.9 - 11.1 under NumPy >= 2.4 TensorRT's own
    create_plugin raises. The config check refuses those, naming both versions and the fix, and only those."""
    report, version = reports[(bindings, old_numpy)], bindings.version
    backend = value(report, "backend")
    refused, config_check = backend["roi_align_plugin_refused"], backend["config_check"]
    numpy_major_minor = release(backend["numpy"])
    created = value(report, "decorator")["create_plugin"] if report["decorator"] else None
    if release(version) < (10, 8):
        assert refused.startswith(f"TensorRT {version} has no INetworkDefinition.add_cumulative")
        assert "10.8" in refused and "engine.roi_align: builtin" in refused
    elif created not in (None, "ok"):
        assert created == "TypeError: only 0-dimensional arrays can be converted to Python scalars"
        assert numpy_major_minor >= (2, 4) and release(version) < (11, 2)
        assert f"TensorRT {version}" in refused and f"NumPy {backend['numpy']}" in refused
        assert 'pip install "numpy<2.4"' in refused and "engine.roi_align: builtin" in refused
    else:
        assert refused is None
        if release(version) < (11, 2) and release(version) >= (10, 9):
            assert numpy_major_minor < (2, 4)  # the fix the refusal names, shown to work
    assert config_check == ([f"engine.roi_align: plugin -- {refused}"] if refused else [])


@pytest.mark.parametrize("bindings", trt_bindings.BINDINGS, ids=str)
def test_tensorrt_plugin_imports_from_both_pypi_layouts(reports, bindings):
    """Finding 3: up to 10.13 PyPI's `tensorrt` has no `plugin` subpackage; ours falls back to tensorrt_bindings.
    Finding 6: the bindings wheels before 10.6 have no `plugin` package at all; only versions whose plugin
    path we refuse anyway (the 10.8 IPluginV3 path needs none)."""
    report, version = reports[(bindings, False)], bindings.version
    has_plugin_package = (trt_bindings.site(bindings) / "tensorrt_bindings" / "plugin").is_dir()
    assert has_plugin_package == (release(version) >= (10, 6))
    if not has_plugin_package:
        assert "No module named 'tensorrt_bindings.plugin'" in report["plugin_import"]["error"]
        assert value(report, "backend")["roi_align_plugin_refused"]
        return
    imported = value(report, "plugin_import")
    if release(version) >= (10, 14):
        assert imported == {"import tensorrt.plugin": "ok", "ours": "tensorrt.plugin"}
    else:
        assert imported == {
            "import tensorrt.plugin": "ModuleNotFoundError: No module named 'tensorrt.plugin'",
            "ours": "tensorrt_bindings.plugin",
        }


@pytest.mark.parametrize(
    ("bindings", "old_numpy"),
    [r for r in RUNS if r[0] in AOT_BINDINGS],
    ids=[i for r, i in zip(RUNS, run_ids) if r[0] in AOT_BINDINGS],
)
def test_decorator_plugin_registration_and_autotune_through_tensorrt_plugin(reports, bindings, old_numpy):
    decorator = value(reports[(bindings, old_numpy)], "decorator")
    assert decorator["registered"] == [f"trtflow::multilevel_roi_align_{n}l" for n in range(1, 6)]
    assert decorator["input_attrs"] == dict.fromkeys(ATTRIBUTES, "int")
    assert decorator["aot_impl"] and decorator["impl"] and decorator["creator_registered"]
    maps = lambda dtype, layout: [[dtype] * LEVELS + ["FLOAT", dtype], [layout] * LEVELS + ["LINEAR", "LINEAR"]]
    assert decorator["autotune"] == sorted(
        [maps("FLOAT", "HWC"), maps("FLOAT", "LINEAR"), maps("HALF", "HWC8"), maps("HALF", "LINEAR")]
    )


@pytest.mark.parametrize("bindings", AOT_BINDINGS, ids=str)
def test_aot_impl_kernel_names_ptx_and_arguments_through_tensorrt(reports, bindings):
    """Under NumPy < 2.4 every decorator version creates the plugin; TensorRT's get_launch_params and
    get_kernel then take our aot_impl's kernel, PTX and scalar arguments (values stay symbolic here)."""
    decorator = value(reports[(bindings, True)], "decorator")
    assert decorator["create_plugin"] == "ok" and decorator["plugin_class"] == "_TemplateAOTPlugin"
    assert decorator["attrs"] == ATTRS and decorator["output_types"] == ["HALF"]
    expected = {
        "HALF/LINEAR": ("float16", "nchw"),
        "FLOAT/LINEAR": ("float32", "nchw"),
        "FLOAT/HWC": ("float32", "nhwc"),
        "HALF/HWC8": ("float16", "nhwc8"),
    }
    for combination, (dtype, layout) in expected.items():
        kernel = decorator["kernels"][combination]
        assert kernel["kernel"] == kernel_name(LEVELS, dtype, layout) and kernel["ptx_is_ours"]
        assert kernel["scalar_args"] == 4 + 2 * LEVELS + len(ATTRIBUTES)  # rois, batch, C, stride, (h, w)s, spec
        assert kernel["launch"] == ["block_x", "block_y", "block_z", "grid_x", "grid_y", "grid_z", "shared_mem"]


@pytest.mark.parametrize(
    "bindings", [b for b in trt_bindings.BINDINGS if (10, 8) <= release(b.version) < (10, 9)], ids=str
)
def test_ipluginv3_fields_survive_serialisation_and_formats(reports, bindings):
    """Finding 5: the fields TensorRT reads back after get_fields_to_serialize hold our values, not freed memory."""
    plugin = value(reports[(bindings, False)], "ipluginv3")
    assert plugin["creator_fields"] == list(ATTRIBUTES)
    assert plugin["attrs"] == plugin["round_trip"] == plugin["clone"] == ATTRS
    assert plugin["output_types"] == ["HALF"]
    maps = ["FLOAT/LINEAR", "FLOAT/HWC", "HALF/LINEAR", "HALF/HWC8"]
    rest = lambda first, out: (
        {str(p): [first] for p in range(1, LEVELS)} | {str(LEVELS): ["FLOAT/LINEAR"], str(LEVELS + 1): [out]}
    )
    assert plugin["formats"] == {
        "HALF/HWC8": {"0": maps} | rest("HALF/HWC8", "HALF/LINEAR"),
        "FLOAT/LINEAR": {"0": maps} | rest("FLOAT/LINEAR", "FLOAT/LINEAR"),
    }


@pytest.mark.parametrize("bindings", trt_bindings.BINDINGS, ids=str)
def test_implicit_int8_calibrator_serves_our_table(reports, bindings):
    """TensorRT 10 uses a calibration cache only through a calibrator whose get_algorithm() (CalibrationAlgoType,
    Python API "Int8" / NvInfer.h IInt8Calibrator::getAlgorithm) is the algorithm the header names, and skips it
    otherwise (NVIDIA/TensorRT#1378). For each header rule calibrate writes, the calibrator built on this version's
    own base class reports that header's algorithm (CALIBRATORS), serves the table unchanged and has no batches."""
    report = reports[(bindings, False)]
    if release(bindings.version) >= (11, 0):
        assert report["calibrator"] is None  # TensorRT 11 removed the implicit calibrators
        return
    tag = version_tag(bindings.version)
    served = {"cache_is_the_table": True, "batch_size": 2, "batch": None, "is_calibrator": True}
    assert value(report, "calibrator") == {
        "entropy": {"header": f"TRT-{tag}-EntropyCalibration2", "algorithm": "ENTROPY_CALIBRATION_2", **served},
        "minmax": {"header": f"TRT-{tag}-MinMaxCalibration", "algorithm": "MINMAX_CALIBRATION", **served},
        "percentile": {"header": f"TRT-{tag}-MinMaxCalibration", "algorithm": "MINMAX_CALIBRATION", **served},
    }
    for facts in value(report, "calibrator").values():
        _, header_algorithm = parse_cache_header(facts["header"], f"{bindings} table")
        assert CALIBRATORS[header_algorithm].algorithm_type == facts["algorithm"]


@pytest.mark.parametrize("bindings", trt_bindings.BINDINGS, ids=str)
def test_inspector_precisions_read_each_major_versions_keys(reports, bindings):
    """Finding 4: TensorRT 11 spells the key "Datatype" (10.x "Format/Datatype"); both read as HALF, not UNKNOWN.
    The inspector's JSON is the native library's (absent here), so its keys are chosen by the major version the
    real bindings report, and read in this process: the probe stays free of torch, which the reader's dtype table
    imports."""
    major = int(reports[(bindings, False)]["version"].split(".")[0])
    layer = {"Name": "conv", "LayerType": "CaskConvolution", "Outputs": [{"Name": "y", **INSPECTOR_KEYS[major]}]}
    assert layer_dtypes.from_inspector(json.dumps({"Layers": [layer]}))["output_dtypes"] == {"HALF": 1}


@pytest.mark.parametrize("bindings", trt_bindings.BINDINGS, ids=str)
def test_every_layer_attribute_is_recorded_irrelevant_or_refused(reports, bindings):
    """Issue 21, item 3, on each version's real bindings (TensorRT-RTX: tests/test_network_record.py): every
    attribute of ILayer and of each class of a layer type the network executor implements is recorded, declared
    irrelevant with a reason, or refused off its default (trtflow.formats.network_record). A class a version lacks is
    absent; the attributes that come and go across versions are each accounted for on both sides."""
    attributes, version = value(reports[(bindings, False)], "layer_attributes"), release(bindings.version)
    interfaces = {interface for interface, _, _ in LAYER_ATTRIBUTES.values()}
    assert set(attributes) == {"ILayer"} | interfaces - ({"ICumulativeLayer"} if version < (10, 8) else set())
    assert unaccounted_attributes(attributes) == []
    assert ("precision_is_set" in attributes["ILayer"]) == ("output_type_is_set" in attributes["ILayer"])
    assert ("precision_is_set" in attributes["ILayer"]) == (version < (11, 0))
    assert ("num_ranks" in attributes["ILayer"]) == (version >= (10, 16))
    assert ("axes" in attributes["ISliceLayer"]) == (version >= (10, 3))
    assert ("block_shape" in attributes["IQuantizeLayer"]) == (version >= (10, 15))


@pytest.mark.parametrize("version", sorted(set(trt_bindings.VERSIONS["cu12"]) & set(trt_bindings.VERSIONS["cu13"])))
def test_cu13_wheels_hold_the_cu12_bindings(reports, version):
    """Finding 7: PyPI's tensorrt-cu13-bindings hold the cu12 `tensorrt_bindings` byte for byte, and the
    tensorrt-cu13 frontend the same text (10.13.2.6's cu12 one has CRLF line ends): the CUDA flavour is
    only in the `-libs` wheels. Compared here at the first and newest cu13; once, by hand, at all twelve."""

    def package(cuda: str, name: str) -> dict[str, bytes]:
        root = trt_bindings.site(trt_bindings.Bindings(cuda, version)) / name
        return {
            path.relative_to(root).as_posix(): path.read_bytes()
            for path in root.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }

    assert package("cu13", "tensorrt_bindings") == package("cu12", "tensorrt_bindings")
    frontend = {cuda: package(cuda, "tensorrt") for cuda in ("cu12", "cu13")}
    assert {name: content.splitlines() for name, content in frontend["cu13"].items()} == {
        name: content.splitlines() for name, content in frontend["cu12"].items()
    }
