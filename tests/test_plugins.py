"""Stage `plugins`: the rule compiles, the library's C ABI loads, MultiLevelRoIAlign equals torchvision.

CPU (CI): the rule builds the library once per session (one GPU architecture, to keep nvcc
short), ctypes finds the ABI, and the library's host reference -- the kernel's own sampling
code -- matches torchvision.ops.MultiScaleRoIAlign. With CUDA, the kernel itself is checked
against torchvision on the GPU; without, those cases skip.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from conftest import CUDA, ROOT, SNAKEMAKE
from snakemake_runs import snakemake
from trtflow.artifacts import files_sha256
from trtflow.backend import load_backend
from trtflow.backend.roi_align_plugin import (
    PluginUnavailableError,
    decorator_plugin_name,
    kernel_name,
    kernel_scalar_args,
    pixel_stride,
    plugin_flavour,
    register_plugins,
)
from trtflow.common.plugins import (
    ABI_VERSION,
    BuildConfig,
    PluginBuildError,
    PluginCallError,
    PluginLibraryError,
    RoIAlignSpec,
    build_plugins,
    first_level,
    infer_spatial_scales,
    launch,
    load_library,
    multilevel_roi_align,
)

IMAGE_HW = (512, 640)
# the test's Snakefile, unlike the workflow's, does not put src/ first on the path of its jobs
WITH_SOURCE_TREE = {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def target_arch() -> int:
    """The one architecture the test build compiles: the GPU's, else the oldest default."""
    if CUDA:
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 75


@pytest.fixture(scope="session")
def built(nvcc, tmp_path_factory) -> Path:
    """Run the `plugins` rule in a scratch copy of the workflow; returns its results/plugins.

    Where snakemake is missing (the GPU machine) the same build runs through build_plugins.
    """
    work = tmp_path_factory.mktemp("workflow")
    shutil.copytree(ROOT / "plugins", work / "plugins")
    arch = target_arch()
    if not SNAKEMAKE:
        build_plugins(work / "plugins", work / "results/plugins", BuildConfig(archs=(arch,), ptx_arch=arch, nvcc=nvcc))
        return work / "results/plugins"
    (work / "src").symlink_to(ROOT / "src")
    (work / "workflow").symlink_to(ROOT / "workflow")  # the rule's code inputs come from its script's imports
    (work / "Snakefile").write_text(  # the project's config with its schema defaults, one GPU arch
        "from pathlib import Path\n"
        "from snakemake.utils import validate\n"
        "WORKFLOW_DIR = Path('.')  # where the rules find src/, workflow/ and plugins/: this scratch folder\n"
        f'configfile: "{ROOT}/config.yaml"\n'
        f'validate(config, "{ROOT}/workflow/schemas/config.schema.yaml")\n'
        f'config["plugins"] = {{"archs": [{arch}], "ptx_arch": {arch}, "nvcc": "{nvcc}", "extra_nvcc_flags": []}}\n'
        f'include: "{ROOT}/workflow/rules/common.smk"\n'
        f'include: "{ROOT}/workflow/rules/plugins.smk"\n'
    )
    snakemake(work, "results/plugins/libtrtflow_plugins.so", cores=1, env=WITH_SOURCE_TREE)
    return work / "results/plugins"


# -- build and load ----------------------------------------------------------------------------


def test_rule_builds_library_ptx_and_record(built):
    record = json.loads((built / "build.json").read_text())
    arch = target_arch()
    assert record["abi_version"] == ABI_VERSION
    assert record["archs"] == [f"sm_{arch}"] and record["ptx_arch"] == f"compute_{arch}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", record["nvcc"]["version"])
    assert "--use_fast_math" not in record["flags"]
    sources = built.parents[1] / "plugins"
    assert record["sources"] == {p.name: files_sha256(p) for p in sorted(sources.iterdir())}
    for name, digest in record["outputs"].items():
        assert files_sha256(built / name) == digest
    kernels = record["ptx_kernels"]["multilevel_roi_align.ptx"]
    assert sorted(kernels) == sorted(
        f"trtflow_multilevel_roi_align_{n}l_{t}_{layout}"
        for n in range(1, 6)
        for t in ("f32", "f16")
        for layout in ("nchw", "nhwc")
    )
    assert not list(built.glob(".build-*")), "the scratch folder must not outlive the build"


@pytest.mark.needs_snakemake
def test_editing_a_source_reruns_the_rule(built):
    work, library = built.parents[1], "results/plugins/libtrtflow_plugins.so"
    assert "Nothing to be done" in snakemake(work, "-n", library, cores=1, env=WITH_SOURCE_TREE).console
    source = work / "plugins/multilevel_roi_align.cu"
    built_at = (built / "libtrtflow_plugins.so").stat().st_mtime
    source.write_text(source.read_text() + "// edited\n")
    os.utime(source, (built_at + 1, built_at + 1))
    plan = snakemake(work, "-n", library, cores=1, env=WITH_SOURCE_TREE).console
    assert re.search(r"rule plugins:", plan) and "Nothing to be done" not in plan


def test_library_abi_is_found_with_ctypes(built):
    lib = load_library(built / "libtrtflow_plugins.so")
    assert lib.trtflow_plugins_abi_version() == ABI_VERSION
    assert lib.trtflow_plugins_error_string(-1).decode().startswith("num_levels must be")


def test_kernel_parameters_match_the_aot_argument_list(built):
    """The ahead-of-time plugin passes inputs, then int32 scalars, then the output."""
    ptx = (built / "multilevel_roi_align.ptx").read_text()
    for levels in (1, 4, 5):
        spec = RoIAlignSpec(num_levels=levels)
        for layout in ("nchw", "nhwc"):
            entry = re.search(rf"\.entry {kernel_name(levels, 'float16', layout)}\((.*?)\)", ptx, flags=re.DOTALL)
            params = re.findall(r"\.param \.(\w+)", entry.group(1))
            scalars = kernel_scalar_args(0, 0, 0, 0, [(0, 0)] * levels, spec.c_args())
            assert params == ["u64"] * (levels + 1) + ["u32"] * len(scalars) + ["u64"]


def test_missing_nvcc_names_the_fix(tmp_path):
    with pytest.raises(PluginBuildError, match=r"nvcc .*not found.*PATH.*plugins\.nvcc.*roi_align: builtin"):
        build_plugins(ROOT / "plugins", tmp_path, BuildConfig(nvcc="no-such-nvcc"))
    assert not list(tmp_path.iterdir())


def test_build_config_rejects_ptx_newer_than_the_oldest_arch():
    assert BuildConfig.from_config({}) == BuildConfig()
    with pytest.raises(ValueError) as refused:
        BuildConfig.from_config({"archs": [80, 90], "ptx_arch": 86})
    assert str(refused.value) == (  # the config check's message (tests/test_bad_inputs.py): one rule, one message
        "plugins.ptx_arch: 86 is newer than the oldest of plugins.archs [80, 90]: the PTX must run everywhere the "
        "library does; set it to at most 80"
    )


def test_loader_refuses_missing_and_foreign_libraries(tmp_path):
    with pytest.raises(PluginLibraryError, match="does not exist.*rule plugins"):
        load_library(tmp_path / "libtrtflow_plugins.so")
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand for a foreign library")
    foreign = Path("/lib/x86_64-linux-gnu", libm)
    if not foreign.exists():
        foreign = Path("/usr/lib", libm)
    with pytest.raises(PluginLibraryError, match="not a trtflow plugin library"):
        load_library(foreign)


# -- semantics ---------------------------------------------------------------------------------


def test_spatial_scales_are_torchvisions():
    sizes = [(128, 160), (64, 80), (32, 40), (16, 20)]
    scales = infer_spatial_scales(sizes, IMAGE_HW)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    pooler(
        OrderedDict((str(i), torch.zeros(1, 1, *s)) for i, s in enumerate(sizes)),
        [torch.tensor([[0.0, 0.0, 10.0, 10.0]])],
        [IMAGE_HW],
    )
    assert scales == pooler.scales
    assert first_level(scales) == 2
    with pytest.raises(ValueError, match="not FPN levels"):
        first_level([0.25, 0.25])
    with pytest.raises(ValueError, match="not FPN levels"):
        first_level([0.3])


def make_pyramid(levels: int, batch: int, channels: int, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, IMAGE_HW[0] >> (2 + l), IMAGE_HW[1] >> (2 + l), generator=generator).to(
            device=device, dtype=dtype
        )
        for l in range(levels)
    ]


def make_rois(per_image: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(N, 5) float32 RoIs sorted by image: sizes over every level, border-straddling, tiny, huge, empty."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    rows = []
    for b in range(batch):
        n = per_image
        side = torch.exp(torch.empty(n).uniform_(0.0, 7.2, generator=g))  # 1 .. 1300 px: p2 .. p5
        aspect = torch.exp(torch.empty(n).uniform_(-1.0, 1.0, generator=g))
        cx = torch.empty(n).uniform_(-0.1 * w, 1.1 * w, generator=g)  # some centres off the image
        cy = torch.empty(n).uniform_(-0.1 * h, 1.1 * h, generator=g)
        bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        special = torch.tensor(
            [
                [-20.0, -30.0, 40.0, 50.0],  # straddles the top-left corner
                [w - 30.0, h - 25.0, w + 60.0, h + 45.0],  # straddles the bottom-right corner
                [100.2, 200.7, 100.5, 200.9],  # tiny: under a pixel
                [-400.0, -300.0, w + 500.0, h + 400.0],  # huge: beyond the image on every side
                [50.0, 60.0, 50.0, 90.0],  # zero width
                [300.0, 100.0, 200.0, 180.0],  # negative width: torchvision maps it to no level
            ]
        )[:n]
        boxes[: len(special)] = special
        rows.append(torch.cat([torch.full((n, 1), float(b)), boxes], dim=1))
    return torch.cat(rows)


def torchvision_reference(features, rois, *, output_size, sampling_ratio, aligned):
    """torchvision.ops.MultiScaleRoIAlign; for aligned=True (which it lacks) its own LevelMapper + roi_align."""
    names = [f"p{l}" for l in range(len(features))]
    batch = features[0].shape[0]
    boxes = [rois[rois[:, 0] == b, 1:] for b in range(batch)]
    pooler = MultiScaleRoIAlign(names, output_size, sampling_ratio)
    result = pooler(OrderedDict(zip(names, features)), boxes, [IMAGE_HW] * batch)
    if not aligned:
        return result
    levels = pooler.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
    result = torch.zeros_like(result)
    for level, (feature, scale) in enumerate(zip(features, pooler.scales)):
        index = torch.where(levels.to(rois.device) == level)[0]
        result[index] = roi_align(
            feature, rois[index], output_size, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=True
        )
    return result


def ours(features, rois, lib, *, output_size, sampling_ratio, aligned, out=None):
    scales = infer_spatial_scales([f.shape[2:] for f in features], IMAGE_HW)
    return multilevel_roi_align(
        features,
        rois,
        output_size=output_size,
        spatial_scales=scales,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        lib_path=lib,
        out=out,
    )


def relative_error(result, reference) -> float:
    scale = reference.abs().max().clamp_min(1e-12)
    return float((result.float() - reference.float()).abs().max() / scale)


CPU_CASES = [  # (levels, output_size, sampling_ratio, aligned)
    (4, 7, 2, False),
    (4, 7, 0, False),
    (4, 7, 2, True),
    (4, (5, 3), 1, False),
    (4, (4, 6), 0, True),
    (5, 7, 2, False),
    (1, 7, 2, False),
]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("levels,output_size,sampling_ratio,aligned", CPU_CASES)
def test_host_reference_matches_torchvision(built, levels, output_size, sampling_ratio, aligned, memory_format):
    features = [f.contiguous(memory_format=memory_format) for f in make_pyramid(levels, batch=2, channels=3)]
    rois = make_rois(per_image=120, batch=2)
    reference = torchvision_reference(
        features, rois, output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned
    )
    result = ours(
        features,
        rois,
        built / "libtrtflow_plugins.so",
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    assert result.shape == reference.shape
    assert relative_error(result, reference) <= 1e-5
    if levels > 1:  # torchvision's LevelMapper gives the negative-width RoI no level: it stays zero
        assert float(result[5].abs().max()) == 0.0


def test_every_level_is_pooled():
    rois = make_rois(per_image=120, batch=2)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    pooler(
        OrderedDict((str(l), f) for l, f in enumerate(make_pyramid(4, 2, 1))),
        [rois[rois[:, 0] == b, 1:] for b in range(2)],
        [IMAGE_HW] * 2,
    )
    levels = pooler.map_levels([rois[:, 1:]])
    assert set(levels.tolist()) >= {0, 1, 2, 3}


def test_library_rejects_bad_arguments(built):
    features = make_pyramid(4, batch=1, channels=2)
    rois = make_rois(per_image=4, batch=1)
    rois[0, 0] = 0.0
    with pytest.raises(ValueError, match=r"output_size \(0, 7\) must be positive"):
        multilevel_roi_align(
            features,
            rois,
            output_size=(0, 7),
            spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
            lib_path=built / "libtrtflow_plugins.so",
        )
    out = torch.empty(4, 2, 7, 7)
    with pytest.raises(PluginCallError, match=r"\(-2\).*height and width must be >= 1"):
        launch(
            load_library(built / "libtrtflow_plugins.so"),
            RoIAlignSpec(num_levels=1),
            [features[0].data_ptr()],
            [(0, 5)],
            1,
            2,
            rois.data_ptr(),
            4,
            out.data_ptr(),
            "float32",
            None,
        )
    with pytest.raises(ValueError, match="float32 on the CPU"):
        multilevel_roi_align(
            [f.half() for f in features],
            rois,
            spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
            lib_path=built / "libtrtflow_plugins.so",
        )
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        multilevel_roi_align(
            features,
            rois[:, 1:],
            spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
            lib_path=built / "libtrtflow_plugins.so",
        )


def test_zero_rois_give_an_empty_output(built):
    features = make_pyramid(4, batch=1, channels=2)
    result = ours(
        features, torch.zeros(0, 5), built / "libtrtflow_plugins.so", output_size=7, sampling_ratio=2, aligned=False
    )
    assert result.shape == (0, 2, 7, 7)


# -- the CUDA kernel -----------------------------------------------------------------------------

GPU_CASES = [  # (RoIs over a batch of 2, dtype, output_size, sampling_ratio, aligned)
    (0, torch.float32, 7, 2, False),
    (1, torch.float32, 7, 2, False),
    (1000, torch.float32, 7, 2, False),
    (10000, torch.float32, 7, 2, False),
    (0, torch.float16, 7, 2, False),
    (1, torch.float16, 7, 2, False),
    (1000, torch.float16, 7, 2, False),
    (10000, torch.float16, 7, 2, False),
    (1000, torch.float32, 7, 0, False),
    (1000, torch.float32, 7, 2, True),
    (1000, torch.float32, (5, 3), 1, False),
    (1000, torch.float16, (4, 6), 0, True),
    (1000, torch.float32, 14, 2, False),  # 196 bins: beyond both fast paths, one thread per element
]


# Channel counts are no multiple of the kernel's 64-channel slices, so the tails run; the
# channels-last kernel reads channel pairs and leaves an odd count to the per-element path.
LAYOUTS = [(torch.contiguous_format, 67), (torch.channels_last, 66), (torch.channels_last, 67)]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("memory_format,channels", LAYOUTS, ids=["nchw", "nhwc", "nhwc-odd-channels"])
@pytest.mark.parametrize("count,dtype,output_size,sampling_ratio,aligned", GPU_CASES)
def test_cuda_kernel_matches_torchvision(
    built, count, dtype, output_size, sampling_ratio, aligned, memory_format, channels
):
    """fp32 within 1e-5 and fp16 within 1e-2 of max|ref|; the fp16 reference is torchvision in fp32 on the
    same fp16 values (torchvision's own fp16 path computes coordinates and box areas in fp16)."""
    features = [
        f.contiguous(memory_format=memory_format)
        for f in make_pyramid(4, batch=2, channels=channels, dtype=dtype, device="cuda", seed=count)
    ]
    rois = make_rois(max(count // 2, 1), batch=2, seed=count + 1)[:count].cuda()
    reference = torchvision_reference(
        [f.float() for f in features], rois, output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned
    )
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    poisoned = torch.full((len(rois), channels, *size), float("nan"), dtype=dtype, device="cuda")
    result = ours(
        features,
        rois,
        built / "libtrtflow_plugins.so",
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        out=poisoned,
    )
    torch.cuda.synchronize()
    assert result.dtype == dtype and result.shape == reference.shape
    assert not torch.isnan(result).any(), "every output element must be written"
    if len(rois):
        assert relative_error(result, reference) <= (1e-5 if dtype == torch.float32 else 1e-2)
        again = ours(
            features,
            rois,
            built / "libtrtflow_plugins.so",
            output_size=output_size,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        assert torch.equal(again, result), "the kernel must be deterministic"


@pytest.mark.needs_cuda
def test_cuda_kernel_runs_on_the_current_stream(built):
    features = make_pyramid(4, batch=2, channels=64, device="cuda")
    rois = make_rois(200, batch=2).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = ours(features, rois, built / "libtrtflow_plugins.so", output_size=7, sampling_ratio=2, aligned=False)
    stream.synchronize()
    reference = torchvision_reference(features, rois, output_size=7, sampling_ratio=2, aligned=False)
    assert relative_error(result, reference) <= 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_padded_channels_last_maps_match_torchvision(built, device):
    """TensorRT's HWC8: channels padded to a multiple of 8; the padding (NaN here) is never read."""
    channels = 67 if device == "cuda" else 3  # odd: real channels end inside a pixel's padding
    dtype = torch.float16 if device == "cuda" else torch.float32
    features = make_pyramid(4, batch=2, channels=channels, dtype=dtype, device=device)
    rois = make_rois(per_image=150, batch=2).to(device)
    stride = pixel_stride(channels, "nhwc8")
    padded = []
    for f in features:
        buffer = torch.full((*f.shape[:1], *f.shape[2:], stride), float("nan"), dtype=dtype, device=device)
        buffer[..., :channels] = f.permute(0, 2, 3, 1)
        padded.append(buffer)
    out = torch.empty(len(rois), channels, 7, 7, dtype=dtype, device=device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else None
    launch(
        load_library(built / "libtrtflow_plugins.so"),
        RoIAlignSpec.from_scales([1 / 4, 1 / 8, 1 / 16, 1 / 32]),
        [b.data_ptr() for b in padded],
        [tuple(f.shape[2:]) for f in features],
        2,
        channels,
        rois.data_ptr(),
        len(rois),
        out.data_ptr(),
        str(dtype).removeprefix("torch."),
        stream,
        "nhwc8",
    )
    reference = torchvision_reference(
        [f.float() for f in features], rois, output_size=7, sampling_ratio=2, aligned=False
    )
    assert stride == (8 if device == "cpu" else 72)
    assert not torch.isnan(out).any()
    assert relative_error(out, reference) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_wrapper_picks_the_layout_of_the_maps(built, monkeypatch):
    """channels_last maps reach the library as NHWC, untouched; anything else as NCHW."""
    import trtflow.common.plugins

    layouts = []
    monkeypatch.setattr(trtflow.common.plugins, "launch", lambda *args, layout: layouts.append((args[2], layout)))
    features = make_pyramid(4, batch=2, channels=4)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    for maps in (features, channels_last, [channels_last[0], *features[1:]]):
        multilevel_roi_align(
            maps,
            make_rois(per_image=3, batch=2),
            spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
            lib_path=built / "libtrtflow_plugins.so",
        )
    assert [layout for _, layout in layouts] == ["nchw", "nhwc", "nhwc"]
    assert layouts[1][0] == [m.data_ptr() for m in channels_last], "channels_last maps must not be copied"
    assert layouts[0][0] == [m.data_ptr() for m in features]


def test_library_rejects_an_unknown_layout(built):
    lib = load_library(built / "libtrtflow_plugins.so")
    assert lib.trtflow_plugins_error_string(-7).decode().startswith("layout must be TRTFLOW_LAYOUT_NCHW")
    features = make_pyramid(1, batch=1, channels=2)
    out = torch.empty(1, 2, 7, 7)
    code = lib.trtflow_multilevel_roi_align_host(
        (ctypes.c_void_p * 1)(features[0].data_ptr()),
        1,
        (ctypes.c_int * 1)(features[0].shape[2]),
        (ctypes.c_int * 1)(features[0].shape[3]),
        1,
        2,
        make_rois(1, batch=1).data_ptr(),
        1,
        out.data_ptr(),
        *RoIAlignSpec(num_levels=1).c_args(),
        3,
    )
    assert code == -7
    # 2^32 elements in one channels-last image would overflow the kernel's 32-bit pixel offsets
    with pytest.raises(PluginCallError, match=r"\(-2\).*fewer than 2\^32 elements"):
        launch(
            lib,
            RoIAlignSpec(num_levels=1),
            [features[0].data_ptr()],
            [(65536, 256)],
            1,
            256,
            make_rois(1, batch=1).data_ptr(),
            1,
            out.data_ptr(),
            "float32",
            None,
            "nhwc",
        )


@pytest.mark.needs_cuda
def test_cuda_kernel_reads_unaligned_channels_last_views(built):
    """A channels_last view starting one element into its storage cannot take paired loads."""
    features = make_pyramid(4, batch=2, channels=66, device="cuda")
    views = []
    for f in features:
        storage = torch.empty(1 + f.numel(), device="cuda")
        view = storage[1:].view(f.shape[0], *f.shape[2:], f.shape[1]).permute(0, 3, 1, 2)
        view.copy_(f)
        views.append(view)
    assert views[0].is_contiguous(memory_format=torch.channels_last) and views[0].data_ptr() % 8 == 4
    rois = make_rois(300, batch=2).cuda()
    result = ours(views, rois, built / "libtrtflow_plugins.so", output_size=7, sampling_ratio=2, aligned=False)
    reference = torchvision_reference(features, rois, output_size=7, sampling_ratio=2, aligned=False)
    assert relative_error(result, reference) <= 1e-5


# -- TensorRT registration -----------------------------------------------------------------------


def test_plugin_paths_by_backend_version():
    assert plugin_flavour("tensorrt", "10.8.0.43") == "ipluginv3"
    assert plugin_flavour("tensorrt", "10.9.0.34") == "aot"
    assert plugin_flavour("tensorrt", "11.1.0") == "aot"
    with pytest.raises(PluginUnavailableError, match="predates IPluginV3"):
        plugin_flavour("tensorrt", "8.6.1")


def test_tensorrt_rtx_refuses_the_plugin_and_names_the_builtin_head(built):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    backend = load_backend("tensorrt_rtx")
    with pytest.raises(PluginUnavailableError, match=r"TensorRT-RTX .*no Python plugin path.*roi_align: builtin"):
        register_plugins(backend, built / "libtrtflow_plugins.so")


@pytest.mark.needs_full_tensorrt
def test_tensorrt_registers_the_plugin(built):
    backend = load_backend("tensorrt")
    register_plugins(backend, built / "libtrtflow_plugins.so")
    if plugin_flavour(backend.name, backend.version) == "aot":
        import tensorrt.plugin as trtp

        assert hasattr(trtp.op.trtflow, decorator_plugin_name(4))
    else:
        assert backend.trt.get_plugin_registry().get_creator("MultiLevelRoIAlign", "1", "trtflow") is not None
