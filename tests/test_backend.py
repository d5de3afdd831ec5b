"""trtflow.backend: selection, errors, strongly typed networks, builder config, layer precisions.

TensorRT-RTX (in the venv) is exercised for real on this CPU. Full TensorRT cannot be installed
here (NVIDIA's index and a CUDA GPU); its tests skip with that reason.
"""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import FULL_TENSORRT
from trtflow import backend as backends
from trtflow.backend import BackendUnavailableError, dtypes, layer_dtypes, load_backend
from trtflow.backend.implicit_int8 import cache_only_calibrator
from trtflow.build.calibrate import calibration_table
from trtflow.build.engine import EngineSettings
from trtflow.common.head import head_dtype
from trtflow.formats.calibration_table import ALGORITHMS, format_calibration_table
from trtflow.precisions import PRECISIONS


@pytest.fixture
def fresh_backends():
    """load_backend caches per name; tests that hide modules need an empty cache before and after."""
    load_backend.cache_clear()
    yield
    load_backend.cache_clear()


@pytest.fixture(scope="module")
def rtx():
    return load_backend("tensorrt_rtx")


def test_unsupported_backend_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"'tensorrt8' is not supported; use one of auto, tensorrt, tensorrt_rtx"):
        load_backend("tensorrt8")


def test_auto_prefers_full_tensorrt_then_rtx():
    expected = "tensorrt" if FULL_TENSORRT else "tensorrt_rtx"
    assert load_backend("auto").name == expected


def test_no_backend_names_both_install_commands(fresh_backends, monkeypatch):
    # A None entry in sys.modules makes `import` raise ImportError: the module is absent.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailableError) as error:
        load_backend("auto")
    message = str(error.value)
    assert "pip install tensorrt-rtx-cu13" in message
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13" in message


def test_requested_backend_missing_names_its_install_command(fresh_backends, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="tensorrt-cu13") as error:
        load_backend("tensorrt")
    assert "tensorrt-rtx-cu13" not in str(error.value)


def test_rtx_version_and_capabilities(rtx):
    assert rtx.name == "tensorrt_rtx"
    assert rtx.major >= 1 and rtx.version == rtx.trt.__version__
    caps = rtx.capabilities
    assert (caps.python_plugins, caps.nms_layer, caps.int8_kernels, caps.implicit_calibrator, caps.timing_cache) == (
        False,
        False,
        False,
        False,
        False,
    )
    assert caps.compute_capability_targets


def test_rtx_networks_are_strongly_typed(rtx):
    builder = rtx.create_builder()  # no GPU here: TensorRT-RTX builds ahead of time
    network = rtx.create_network(builder)
    assert network.get_flag(rtx.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    with pytest.raises(ValueError, match="strongly typed networks only"):
        rtx.create_network(builder, strongly_typed=False)


def test_rtx_compute_capability_names(rtx):
    names = rtx.compute_capability_names()
    assert names["8.6"] == "SM86" and names["12.0"] == "SM120" and names["current"] == "CURRENT"
    defaults = rtx.default_compute_capabilities()
    assert {"8.0", "8.6", "8.9", "12.0"} <= set(defaults)
    assert "7.5" not in defaults and "9.0" not in defaults  # Turing needs opting in; Hopper is unsupported


def _input_network(rtx, builder):
    network = rtx.create_network(builder)
    network.add_input("images", rtx.trt.float32, (-1, 3, 8, 8))
    return network


def test_rtx_builder_config_settings(rtx):
    trt = rtx.trt
    builder = rtx.create_builder()
    _input_network(rtx, builder)
    shapes = {"images": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}
    config = rtx.create_config(
        builder, workspace_mb=256, opt_level=2, profile_shapes=shapes, compute_capabilities=["8.6", "12.0"], tf32=False
    )
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 256 << 20
    assert config.builder_optimization_level == 2
    assert config.num_optimization_profiles == 1
    assert config.num_compute_capabilities == 2
    assert config.get_compute_capability(0) == trt.ComputeCapability.SM86
    assert config.get_compute_capability(1) == trt.ComputeCapability.SM120


def test_tf32_is_off_unless_asked_for(rtx):
    """TensorRT's builder config starts with BuilderFlag.TF32 set ("enabled by default", IBuilderConfig): float32
    convolutions and matrix products may then run on 10-bit mantissas, which verify's network-definition level (strict
    float32) cannot see. Our configs clear it; engine.tf32: true keeps it."""
    trt = rtx.trt
    builder = rtx.create_builder()
    assert builder.create_builder_config().get_flag(trt.BuilderFlag.TF32)  # TensorRT's own default
    settings = dict(workspace_mb=256, opt_level=2, profile_shapes={})
    assert not rtx.create_config(builder, **settings, tf32=False).get_flag(trt.BuilderFlag.TF32)
    assert rtx.create_config(builder, **settings, tf32=True).get_flag(trt.BuilderFlag.TF32)
    assert EngineSettings.from_config({"tf32": True}, "fp32").tf32 and not EngineSettings("fp32").tf32


@pytest.mark.parametrize("targets", [["9.0"], ["current", "8.6"], ["sm86"]])
def test_rtx_rejects_unknown_compute_capabilities(rtx, targets):
    builder = rtx.create_builder()
    with pytest.raises(ValueError, match=r"engine.rtx.compute_capabilities .* use one or more of"):
        rtx.create_config(
            builder, workspace_mb=64, opt_level=0, profile_shapes={}, compute_capabilities=targets, tf32=False
        )


def test_rtx_parse_error_carries_the_parser_message(rtx):
    builder = rtx.create_builder()
    network = rtx.create_network(builder)
    with pytest.raises(backends.BuildError, match="could not parse broken.onnx"):
        rtx.parse_onnx(network, b"not an onnx model", "broken.onnx")


def test_network_precisions_count_declared_types(rtx):
    trt = rtx.trt
    network = _input_network(rtx, rtx.create_builder())
    cast = network.add_cast(network.get_input(0), trt.float16)
    network.add_activation(cast.get_output(0), trt.ActivationType.RELU)
    summary = layer_dtypes.from_network(network, "no GPU")
    assert summary["source"] == "network_definition" and summary["layers"] == 2
    assert summary["output_dtypes"] == {"HALF": 2}
    assert summary["by_layer_type"] == {"ACTIVATION": {"HALF": 1}, "CAST": {"HALF": 1}}


def test_inspector_precisions_read_tensorrt_10_and_11_fields():
    # TensorRT 10 "Format/Datatype"; TensorRT 11 "Format" and "Datatype" (issue 14), older notes "DataType".
    engine_information = json.dumps(
        {
            "Layers": [
                {
                    "Name": "conv1",
                    "LayerType": "CaskConvolution",
                    "Outputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
                },
                {
                    "Name": "conv2",
                    "LayerType": "CaskConvolution",
                    "Outputs": [{"Name": "b", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
                },
                {
                    "Name": "cast",
                    "LayerType": "Reformat",
                    "Outputs": [{"Name": "c", "Format": "Row major linear format", "Datatype": "Float"}],
                },
                {"Name": "cast2", "LayerType": "Reformat", "Outputs": [{"Name": "d", "DataType": "Half"}]},
                "name-only layer",
            ]
        }
    )
    summary = layer_dtypes.from_inspector(engine_information)
    assert summary["source"] == "engine_inspector" and summary["layers"] == 4
    assert summary["output_dtypes"] == {"HALF": 2, "INT8": 1, "FLOAT": 1}
    assert summary["by_layer_type"]["CaskConvolution"] == {"HALF": 1, "INT8": 1}


def test_one_dtype_table_agrees_with_tensorrt_torch_and_numpy(rtx):
    """TensorRT documents `DataType.itemsize` (the size in bytes of a DataType) and `tensorrt.nptype` (a DataType's
    numpy equivalent; none for BF16, FP8, INT4, FP4) in the Python API's FoundationalTypes/DataType page: every row
    of the one table names a DataType and holds torch and numpy dtypes of its size and kind, and every spelling of
    the head dtype and of the inspector resolves to a DataType."""
    trt = rtx.trt
    assert set(dtypes.TORCH_DTYPES) == {"FLOAT", "HALF", "BF16", "FP8", "INT8", "UINT8", "INT32", "INT64", "BOOL"}
    assert set(dtypes.TORCH_DTYPES) - set(dtypes.NUMPY_DTYPES) == {"BF16"}
    for name, torch_dtype in dtypes.TORCH_DTYPES.items():
        data_type = trt.DataType.__members__[name]
        assert torch_dtype.itemsize == data_type.itemsize, name
        if name == "FP8":  # TensorRT's nptype has none: ml_dtypes' E4M3 is numpy's spelling of it
            assert np.dtype(dtypes.NUMPY_DTYPES[name]) == np.dtype("float8_e4m3fn") and data_type.itemsize == 1
        elif name in dtypes.NUMPY_DTYPES:
            assert np.dtype(dtypes.NUMPY_DTYPES[name]) == np.dtype(trt.nptype(data_type)), name
    head = {precision: dtypes.TORCH_DTYPES[dtypes.HEAD_DTYPES[head_dtype(precision)]] for precision in PRECISIONS}
    assert head == {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float16, "fp8": torch.float16}
    assert {spelling: dtypes.HEAD_DTYPES[spelling] for spelling in ("fp32", "fp16")} == {
        "fp32": "FLOAT",
        "fp16": "HALF",
    }
    assert set(dtypes.INSPECTOR_WORDS.values()) <= set(trt.DataType.__members__)
    assert layer_dtypes.dtype_from_inspector("Channel major BF16 format") == "BF16"


# -- timing cache: TensorRT's answers played by a stand-in config (the native library is absent) ----------


class StandInTimingCache:
    def __init__(self, blob: bytes, combine_error: Exception | None = None):
        self.blob, self.combine_error = blob, combine_error

    def combine(self, other, ignore_mismatch):
        if self.combine_error:
            raise self.combine_error
        self.blob += other.blob
        return True

    def serialize(self):
        return self.blob


class StandInBuilderConfig:
    """IBuilderConfig's timing-cache calls; `create_timing_cache` raises on bytes it cannot read, as
    TensorRT may for a cache of another version or a truncated file."""

    def __init__(self, combine_error: Exception | None = None):
        self.cache = StandInTimingCache(b"own", combine_error)
        self.set_caches = []

    def create_timing_cache(self, blob: bytes):
        if blob.startswith(b"corrupt"):
            raise RuntimeError("TensorRT could not deserialize the timing cache")
        return StandInTimingCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.set_caches.append(cache.blob)
        return True

    def get_timing_cache(self):
        return self.cache


def stand_in_backend(rtx) -> backends.Backend:
    return backends.Backend(
        name="tensorrt", trt=rtx.trt, version="10.13.3.9", capabilities=rtx.capabilities, logger=rtx.logger
    )


def test_unreadable_timing_cache_starts_a_fresh_one(rtx, caplog):
    config = StandInBuilderConfig()
    stand_in_backend(rtx).load_timing_cache(config, b"corrupt bytes")
    assert config.set_caches == [b""]
    assert "starting a fresh cache" in caplog.text


def test_unreadable_stored_timing_cache_is_replaced_by_this_builds(rtx, caplog):
    merged = stand_in_backend(rtx).merged_timing_cache(StandInBuilderConfig(), b"corrupt bytes")
    assert merged == b"own" and "it is replaced" in caplog.text


def test_failing_timing_cache_combine_keeps_this_builds_cache(rtx, caplog):
    config = StandInBuilderConfig(combine_error=RuntimeError("mismatched cache"))
    assert stand_in_backend(rtx).merged_timing_cache(config, b"stored") == b"own"
    assert "it is replaced" in caplog.text
    assert stand_in_backend(rtx).merged_timing_cache(StandInBuilderConfig(), b"+stored") == b"own+stored"


# -- roi_align: plugin, refused before any job ----------------------------------------------------


def test_config_check_refuses_plugin_roi_align_on_tensorrt_rtx(config):
    from trtflow.config import ConfigError, check_config

    config["backend"], config["engine"]["roi_align"] = "tensorrt_rtx", "plugin"
    with pytest.raises(ConfigError, match=r"engine.roi_align: plugin -- TensorRT-RTX .* set engine.roi_align: builtin"):
        check_config(config)


def test_config_check_leaves_auto_without_full_tensorrt_to_the_engine_job(config):
    """A submit host without full TensorRT (backend: auto finds TensorRT-RTX) cannot judge the GPU nodes."""
    from trtflow.config import environment_problems

    config["engine"]["roi_align"] = "plugin"
    expected = [] if not FULL_TENSORRT else environment_problems({**config, "backend": "tensorrt"})
    assert environment_problems(config) == expected


# -- full TensorRT (skipped here) ---------------------------------------------------------


@pytest.mark.needs_full_tensorrt
def test_tensorrt_capabilities_follow_the_version():
    trt_backend = load_backend("tensorrt")
    caps = trt_backend.capabilities
    assert caps.nms_layer and caps.int8_kernels and caps.timing_cache and caps.python_plugins
    assert caps.implicit_calibrator == (trt_backend.major == 10)
    assert not caps.compute_capability_targets


@pytest.mark.needs_full_tensorrt
def test_tensorrt_network_is_strongly_typed():
    trt_backend = load_backend("tensorrt")
    network = trt_backend.create_network(trt_backend.create_builder())
    assert network.get_flag(trt_backend.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


@pytest.mark.needs_full_tensorrt
def test_tensorrt_10_calibrator_serves_the_table_without_batches():
    trt_backend = load_backend("tensorrt")
    if not trt_backend.capabilities.implicit_calibrator:
        pytest.skip(f"{trt_backend.describe()} removed the implicit calibrator (TensorRT 11+)")
    table = b"TRT-100-EntropyCalibration2\nimages: 3c010a14\n"
    calibrator = cache_only_calibrator(trt_backend.trt, table, batch_size=2)
    assert calibrator.read_calibration_cache() == table
    assert calibrator.get_batch(["images"]) is None and calibrator.get_batch_size() == 2


def test_implicit_calibrator_class_follows_the_table_header():
    """TensorRT 10 uses a calibration cache only through a calibrator whose algorithm (IInt8Calibrator::getAlgorithm,
    NvInfer.h; `get_algorithm()` in the Python API) is the one the cache was written for, and skips it otherwise
    (NVIDIA/TensorRT#1378); our `get_batch` has no data, so the class must follow the header of every table rule
    calibrate writes. The base classes here are stand-ins; tests/test_trt_bindings_matrix.py uses each 10.x's own."""
    stand_in = SimpleNamespace(
        IInt8EntropyCalibrator2=type("IInt8EntropyCalibrator2", (), {}),
        IInt8MinMaxCalibrator=type("IInt8MinMaxCalibrator", (), {}),
    )
    bases = {}
    for algorithm in ALGORITHMS:
        table = format_calibration_table(calibration_table({"images": 2.0}, algorithm, "101600")).encode()
        calibrator = cache_only_calibrator(stand_in, table, batch_size=2)
        assert calibrator.read_calibration_cache() == table and calibrator.get_batch(["images"]) is None
        bases[algorithm] = [base.__name__ for base in type(calibrator).__bases__]
    assert bases == {
        "entropy": ["IInt8EntropyCalibrator2"],
        "minmax": ["IInt8MinMaxCalibrator"],
        "percentile": ["IInt8MinMaxCalibrator"],
    }
    source = "results/calib/int8calib.table"
    with pytest.raises(
        ValueError,
        match=r"^results/calib/int8calib.table: header 'TRT-101600-EntropyCalibration' names calibration algorithm "
        r"'EntropyCalibration', .* use a table with EntropyCalibration2 or MinMaxCalibration, as rule calibrate writes",
    ):
        cache_only_calibrator(stand_in, b"TRT-101600-EntropyCalibration\nimages: 3c010a14\n", 2, source=source)
    with pytest.raises(ValueError, match=r"^results/calib/int8calib.table: first line must be a TensorRT cache header"):
        cache_only_calibrator(stand_in, b"images: 3c010a14\n", 2, source=source)
