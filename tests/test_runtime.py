"""trtflow.run.runtime: the engine runner's refusals (pure checks of the engine metadata, no TensorRT needed) and,
where a CUDA GPU can run a plan, its execution against ONNX Runtime on the same features graph."""

import hashlib
import json

import numpy as np
import pytest
import torch

from test_plan_metadata import plan_metadata
from trtflow.backend import installed_version
from trtflow.formats.plan_metadata import FORMAT, VERSION, PlanMetadata, PlanMetadataError, metadata_path
from trtflow.run.runtime import EngineRefused, EngineRunner, Gpu, check_runnable, refusals, visible_gpu

RTX_VERSION = "1.7.1.116"
RTX_4090 = Gpu("NVIDIA GeForce RTX 4090", "8.9")
H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0")
NO_GPU = None


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "engine_fp16.plan"
    path.write_bytes(b"serialized engine")
    return path


def rtx_metadata(plan, **changes) -> PlanMetadata:
    """An fp16 TensorRT-RTX plan's metadata, describing the bytes of `plan`."""
    digest = hashlib.sha256(plan.read_bytes()).hexdigest()
    return plan_metadata(**{"backend_version": RTX_VERSION, "precision": "fp16", "plan_sha256": digest, **changes})


def test_a_plan_this_machine_can_run_has_no_refusals(plan):
    assert refusals(rtx_metadata(plan), RTX_4090, {"tensorrt_rtx": RTX_VERSION}, plan) == []


def test_refuses_without_a_gpu(plan):
    assert refusals(rtx_metadata(plan), NO_GPU, {"tensorrt_rtx": RTX_VERSION}, plan) == [
        "no CUDA GPU is visible (torch.cuda.is_available() is False); a TensorRT plan runs only on an NVIDIA GPU"
    ]


def test_refuses_a_tensorrt_rtx_plan_on_hopper(plan):
    (reason,) = refusals(rtx_metadata(plan), H100, {"tensorrt_rtx": RTX_VERSION}, plan)
    assert reason.startswith(
        "NVIDIA H100 80GB HBM3 is compute capability 9.0 (Hopper), on which TensorRT-RTX plans "
        "do not run (this plan targets 8.0, 8.6, 8.9, 12.0, 12.1)"
    )
    assert reason.endswith("build the engine with full TensorRT on this GPU (backend: tensorrt)")
    # a plan that lists 9.0 anyway (engine.rtx.compute_capabilities: [current] on a Hopper) is refused alike
    (listed,) = refusals(rtx_metadata(plan, compute_capabilities=["9.0"]), H100, {"tensorrt_rtx": RTX_VERSION}, plan)
    assert "(Hopper), on which TensorRT-RTX plans do not run (this plan targets 9.0)" in listed


def test_refuses_a_gpu_the_plan_does_not_target(plan):
    metadata = rtx_metadata(plan, backend="tensorrt", backend_version="10.13.0.35", compute_capabilities=["8.6"])
    (reason,) = refusals(metadata, Gpu("Tesla T4", "7.5"), {"tensorrt": "10.13.0.35"}, plan)
    assert reason.startswith(
        "the plan targets compute capabilities ['8.6'] but Tesla T4 is 7.5; rebuild it for this GPU"
    )


def test_refuses_another_installed_version(plan):
    (reason,) = refusals(rtx_metadata(plan), RTX_4090, {"tensorrt_rtx": "1.6.0.2"}, plan)
    assert reason.startswith(
        f"the plan was built with tensorrt_rtx {RTX_VERSION} but tensorrt_rtx 1.6.0.2 is installed; "
        "a plan runs only on the version that built it"
    )
    assert f"install tensorrt_rtx {RTX_VERSION}" in reason


def test_refuses_a_backend_that_does_not_import(plan):
    metadata = rtx_metadata(plan, backend="tensorrt", backend_version="10.13.0.35", compute_capabilities=["8.9"])
    (reason,) = refusals(metadata, RTX_4090, {"tensorrt": None}, plan)
    assert reason == (
        "the plan was built with tensorrt 10.13.0.35 but `import tensorrt` fails here; install that "
        "version (pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13==10.13.0.35)"
    )


def test_refuses_plan_bytes_the_metadata_does_not_describe(plan):
    metadata = rtx_metadata(plan)
    plan.write_bytes(b"another build")
    (reason,) = refusals(metadata, RTX_4090, {"tensorrt_rtx": RTX_VERSION}, plan)
    assert (
        reason == f"{plan} is not the plan its metadata describes (sha256 differs); rebuild both (snakemake -f {plan})"
    )
    plan.unlink()
    assert refusals(metadata, RTX_4090, {"tensorrt_rtx": RTX_VERSION}, plan) == [
        f"{plan} does not exist; build it (snakemake {plan})"
    ]


def test_refuses_a_plugin_plan_without_its_library(plan, tmp_path):
    library = {"path": str(tmp_path / "libtrtflow_plugins.so"), "sha256": "0" * 64}
    metadata = rtx_metadata(plan, roi_align="plugin", sources={**plan_metadata().sources, "plugin_library": library})
    (reason,) = refusals(metadata, RTX_4090, {"tensorrt_rtx": RTX_VERSION}, plan)
    assert reason.startswith("the plan uses the MultiLevelRoIAlign plugin but its library ")
    assert reason.endswith(
        "libtrtflow_plugins.so is missing; build it (snakemake results/plugins/libtrtflow_plugins.so)"
    )


def test_names_every_reason_at_once(plan):
    reasons = refusals(rtx_metadata(plan), H100, {"tensorrt_rtx": "1.6.0.2"}, plan)
    assert len(reasons) == 2 and "Hopper" in reasons[0] and "1.6.0.2 is installed" in reasons[1]


def test_runner_needs_the_metadata_beside_the_plan(plan):
    assert metadata_path(plan) == plan.with_suffix(".json")
    with pytest.raises(EngineRefused, match=r"engine_fp16\.json not found: the runner needs the engine metadata"):
        EngineRunner(plan)


def test_runner_refuses_metadata_of_a_newer_format_by_name(plan):
    """The runner reads the plan's JSON through trtflow.formats.plan_metadata: a newer version is refused before TensorRT."""
    document = rtx_metadata(plan).document() | {"format": f"{FORMAT}/{VERSION + 1}"}
    metadata_path(plan).write_text(json.dumps(document))
    with pytest.raises(PlanMetadataError) as refused:
        EngineRunner(plan)
    assert str(refused.value) == (
        f"{metadata_path(plan)} has format '{FORMAT}/{VERSION + 1}', this trtflow reads {FORMAT}/{VERSION} (the file "
        f"was written by a newer trtflow); rebuild the engine (snakemake -f {plan})"
    )


@pytest.mark.needs_no_cuda
def test_check_runnable_refuses_here_for_want_of_a_gpu(plan):
    with pytest.raises(
        EngineRefused,
        match=r"cannot run .*engine_fp16\.plan \(tensorrt_rtx 1\.7\.1\.116, fp16\): "
        r"no CUDA GPU is visible",
    ):
        check_runnable(plan, rtx_metadata(plan))


# --------------------------------------------------------------------------- real plans


@pytest.fixture(scope="module")
def features_plan(tmp_path_factory):
    """A features-only plan of a tiny detector with a dynamic batch 1..4, built by trtflow.build.engine with the
    installed backend, and its ONNX."""
    from test_weights import tame, tiny_fpn_detector
    from trtflow.backend import BackendUnavailableError, BuildError, load_backend
    from trtflow.build.engine import BatchProfile, EngineSettings, EngineSources, build_engine
    from trtflow.build.export import export_features

    try:
        backend = load_backend("auto")
    except BackendUnavailableError as error:
        pytest.skip(f"no TensorRT backend imports here: {error}")
    folder = tmp_path_factory.mktemp("plan")
    onnx = folder / "features.onnx"
    export_features(tame(tiny_fpn_detector(), (96, 128)), (96, 128), onnx, dynamic_batch=True, simplify=False)
    targets = ("current",) if torch.cuda.is_available() and backend.capabilities.compute_capability_targets else ()
    settings = EngineSettings(precision="fp32", batch=BatchProfile(1, 2, 4), compute_capabilities=targets)
    try:
        build_engine(
            EngineSources(onnx=onnx),
            settings,
            folder / "engine_fp32.plan",
            backend=backend,
        )
    except BuildError as error:
        pytest.skip(f"{backend.describe()} cannot build a plan for this machine: {error}")
    return folder / "engine_fp32.plan", onnx


@pytest.mark.needs_no_cuda
def test_a_real_plan_is_refused_without_a_gpu(features_plan):
    plan, _ = features_plan
    metadata = PlanMetadata.read(metadata_path(plan))
    with pytest.raises(EngineRefused, match="no CUDA GPU is visible") as refused:
        EngineRunner(plan)
    assert f"{metadata.backend} {metadata.backend_version}" in str(refused.value)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_runner_matches_onnxruntime(features_plan, cuda_graph):
    from trtflow.common.onnxrun import OnnxSession

    plan, onnx = features_plan
    metadata = PlanMetadata.read(metadata_path(plan))
    if reasons := refusals(metadata, *_here(metadata), plan):
        pytest.skip("this machine cannot run the plan: " + "; ".join(reasons))
    runner = EngineRunner(plan, cuda_graph=cuda_graph)
    assert runner.batch_range == (1, 4)
    for batch in (3, 6, 3):  # 6 > max 4: two chunks; 3 again: a second replay of the same graph
        images = np.random.default_rng(batch).standard_normal((batch, 3, 96, 128), dtype=np.float32)
        expected = OnnxSession(onnx)(images)
        outputs = runner(torch.from_numpy(images).cuda())
        for name, value in expected.items():
            scale = np.abs(value).max()
            assert np.abs(outputs[name].cpu().numpy() - value).max() <= 1e-3 * scale, name


def _here(metadata: PlanMetadata):
    return visible_gpu(), {metadata.backend: installed_version(metadata.backend)}
