"""Stage `plugins`: compile plugins/*.cu with nvcc, load the library, call MultiLevelRoIAlign.

- `build_plugins` makes results/plugins/libtrtflow_plugins.so (a fat binary: SASS for the
  configured GPUs + PTX), one .ptx per .cu (the kernels the ahead-of-time TensorRT plugin
  embeds) and build.json (nvcc version, commands, archs, sha256 of sources and outputs).
- `load_library` opens the .so with ctypes and refuses one whose C ABI version differs.
- `multilevel_roi_align` is torchvision's MultiScaleRoIAlign on torch tensors through the
  library: CUDA tensors run the kernel on the current stream; CPU float32 tensors run the
  library's host reference (the same sampling code), which is what CPU-only CI checks.
- `register_plugins` registers the TensorRT plugin (trtflow.backend.roi_align_plugin).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trtflow.artifacts import disk_full_named, files_sha256

if TYPE_CHECKING:
    import torch

ABI_VERSION = 2  # TRTFLOW_PLUGINS_ABI_VERSION in plugins/trtflow_plugins.h
MAX_LEVELS = 5  # TRTFLOW_MAX_LEVELS
DTYPE_CODES = {"float32": 0, "float16": 1}  # TRTFLOW_DTYPE_*
# Feature map layouts (TRTFLOW_LAYOUT_*): NCHW; channels last (torch.channels_last, TensorRT
# HWC); channels last with channels padded to a multiple of 8 (TensorRT HWC8).
LAYOUT_CODES = {"nchw": 0, "nhwc": 1, "nhwc8": 2}

SOURCE_DIR = Path("plugins")
PLUGIN_DIR = Path("results/plugins")
LIBRARY_NAME = "libtrtflow_plugins.so"
DEFAULT_LIBRARY = PLUGIN_DIR / LIBRARY_NAME
ROI_ALIGN_PTX = "multilevel_roi_align.ptx"
BUILD_RECORD = "build.json"
REBUILD_HINT = f"rebuild it with `snakemake --cores 1 {DEFAULT_LIBRARY}` (rule plugins)"

# -O3 and exact IEEE math: the level mapping must round like torch (no --use_fast_math).
COMMON_FLAGS = ("-O3", "-std=c++17")


class PluginBuildError(RuntimeError):
    """nvcc is missing or failed; the message names the command and the fix."""


class PluginLibraryError(RuntimeError):
    """The plugin library is missing, unloadable, or of another ABI version."""


class PluginCallError(RuntimeError):
    """A library call was refused (bad arguments) or its CUDA launch failed."""


# -- build ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    """config.yaml `plugins:`: which GPUs the fat binary carries and how nvcc is called."""

    archs: tuple[int, ...] = (75, 80, 86, 89, 90)
    ptx_arch: int = 75
    nvcc: str = "nvcc"
    extra_flags: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, section: Mapping) -> BuildConfig:
        archs = tuple(int(a) for a in section.get("archs", cls.archs))
        ptx_arch = int(section.get("ptx_arch", cls.ptx_arch))
        if not archs or any(a < 50 for a in archs) or ptx_arch < 50:
            raise ValueError(
                f"plugins.archs = {list(archs)}, plugins.ptx_arch = {ptx_arch}: use compute capabilities "
                "as integers >= 50, e.g. archs: [75, 80, 86, 89, 90], ptx_arch: 75 (config.yaml)"
            )
        if problem := ptx_arch_problem(archs, ptx_arch):
            raise ValueError(problem)
        return cls(
            archs=archs,
            ptx_arch=ptx_arch,
            nvcc=str(section.get("nvcc", cls.nvcc)),
            extra_flags=tuple(str(f) for f in section.get("extra_nvcc_flags", cls.extra_flags)),
        )


def ptx_arch_problem(archs: Sequence[int], ptx_arch: int) -> str | None:
    """plugins.ptx_arch's rule, asked by the config check and by BuildConfig.from_config."""
    if ptx_arch > min(archs):
        return (
            f"plugins.ptx_arch: {ptx_arch} is newer than the oldest of plugins.archs {list(archs)}: the PTX must "
            f"run everywhere the library does; set it to at most {min(archs)}"
        )
    return None


def find_nvcc(nvcc: str = "nvcc") -> Path:
    """The nvcc to use: `nvcc` as a path or a name on PATH, else $CUDA_HOME/bin/nvcc."""
    found = shutil.which(nvcc)
    if found is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
        if candidate is not None and candidate.is_file() and nvcc == "nvcc":
            found = str(candidate)
    if found is None:
        raise PluginBuildError(
            f"nvcc (the CUDA compiler) not found: plugins.nvcc = {nvcc!r} is neither on PATH nor under "
            "$CUDA_HOME/bin. Install the CUDA toolkit (or `pip install nvidia-cuda-nvcc`), then put nvcc on "
            "PATH, set CUDA_HOME, or set plugins.nvcc to its path in config.yaml. Without nvcc, build "
            "engines with engine.roi_align: builtin."
        )
    return Path(found)


def nvcc_version(nvcc: Path) -> str:
    """'13.0.88' from `nvcc --version`."""
    text = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", text)
    if match is None:
        raise PluginBuildError(f"{nvcc} --version printed no release number:\n{text}")
    return match.group(1)


def library_command(nvcc: Path, sources: Sequence[Path], output: Path, config: BuildConfig) -> list[str]:
    """SASS for every configured GPU plus PTX for the ptx_arch, so newer GPUs JIT-compile it."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in config.archs]
    gencode.append(f"-gencode=arch=compute_{config.ptx_arch},code=compute_{config.ptx_arch}")
    return [
        str(nvcc), *COMMON_FLAGS, *config.extra_flags, *gencode,
        "-shared", "-Xcompiler", "-fPIC", "-o", str(output), *map(str, sources),
    ]  # fmt: skip


def ptx_command(nvcc: Path, source: Path, output: Path, config: BuildConfig) -> list[str]:
    return [
        str(nvcc), *COMMON_FLAGS, *config.extra_flags, f"-arch=compute_{config.ptx_arch}",
        "-ptx", "-o", str(output), str(source),
    ]  # fmt: skip


def ptx_kernels(ptx: str) -> list[str]:
    """Names of the kernel entries a PTX module exports."""
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE)


def _run_all(commands: Mapping[str, list[str]]) -> None:
    """Run the nvcc commands concurrently; the first failure raises with its output."""
    running = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    failures = []
    for name, process in running.items():
        output, _ = process.communicate()
        if process.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-30:])
            failures.append(f"{name}: `{' '.join(commands[name])}` exited {process.returncode}:\n{tail}")
    if failures:
        raise PluginBuildError("nvcc failed to compile the plugins:\n" + "\n".join(failures))


def build_plugins(
    source_dir: Path = SOURCE_DIR, out_dir: Path = PLUGIN_DIR, config: BuildConfig = BuildConfig()
) -> dict:
    """Compile source_dir/*.cu into out_dir: the library, one .ptx per .cu, build.json.

    Outputs appear together or not at all: everything is compiled and the library's ABI
    checked in a temporary folder beside them, then moved in place.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    sources = sorted(source_dir.glob("*.cu"))
    if not sources:
        raise PluginBuildError(f"no .cu files in {source_dir}: the plugin sources belong there")
    nvcc = find_nvcc(config.nvcc)
    version = nvcc_version(nvcc)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        commands = {"library": library_command(nvcc, sources, scratch / LIBRARY_NAME, config)}
        for source in sources:
            commands[f"ptx {source.name}"] = ptx_command(nvcc, source, scratch / f"{source.stem}.ptx", config)
        _run_all(commands)
        abi = _abi_version(ctypes.CDLL(str((scratch / LIBRARY_NAME).resolve())))
        if abi != ABI_VERSION:
            raise PluginBuildError(
                f"{source_dir} builds ABI version {abi} but trtflow.common.plugins speaks {ABI_VERSION}: "
                "update ABI_VERSION in src/trtflow/common/plugins.py together with plugins/trtflow_plugins.h"
            )
        outputs = [LIBRARY_NAME, *(f"{s.stem}.ptx" for s in sources)]
        record = {
            "abi_version": abi,
            "nvcc": {"path": str(nvcc), "version": version},
            "archs": [f"sm_{a}" for a in config.archs],
            "ptx_arch": f"compute_{config.ptx_arch}",
            "flags": [*COMMON_FLAGS, *config.extra_flags],
            "commands": {name: _portable(cmd, scratch, out_dir) for name, cmd in commands.items()},
            "source_dir": str(source_dir),
            "sources": {p.name: files_sha256(p) for p in sorted([*sources, *source_dir.glob("*.h")])},
            "outputs": {name: files_sha256(scratch / name) for name in outputs},
            "ptx_kernels": {f"{s.stem}.ptx": ptx_kernels((scratch / f"{s.stem}.ptx").read_text()) for s in sources},
            "seconds": round(time.perf_counter() - started, 1),
        }
        with disk_full_named(out_dir / BUILD_RECORD):
            (scratch / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        for name in [*outputs, BUILD_RECORD]:
            os.replace(scratch / name, out_dir / name)
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _portable(command: list[str], scratch: Path, out_dir: Path) -> list[str]:
    """The command as it would write straight into out_dir (the scratch folder is gone)."""
    return [arg.replace(str(scratch), str(out_dir)) for arg in command]


# -- load -------------------------------------------------------------------------------------

_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_void_pp = ctypes.POINTER(ctypes.c_void_p)
_LAUNCH_ARGS = [
    _c_void_pp, ctypes.c_int, _c_int_p, _c_int_p,  # features, num_levels, heights, widths
    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,  # batch .. output
    *[ctypes.c_int] * 8,  # out_h, out_w, sampling_ratio, aligned, first_level, canonical scale/level, layout
]  # fmt: skip


def _abi_version(lib: ctypes.CDLL) -> int:
    lib.trtflow_plugins_abi_version.restype = ctypes.c_int
    lib.trtflow_plugins_abi_version.argtypes = []
    return lib.trtflow_plugins_abi_version()


def _load(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as error:
        raise PluginLibraryError(f"{path} could not be loaded ({error}): {REBUILD_HINT}") from error
    try:
        abi = _abi_version(lib)
        lib.trtflow_plugins_error_string.restype = ctypes.c_char_p
        lib.trtflow_plugins_error_string.argtypes = [ctypes.c_int]
        lib.trtflow_multilevel_roi_align.restype = ctypes.c_int
        lib.trtflow_multilevel_roi_align.argtypes = [*_LAUNCH_ARGS, ctypes.c_int, ctypes.c_void_p]
        lib.trtflow_multilevel_roi_align_host.restype = ctypes.c_int
        lib.trtflow_multilevel_roi_align_host.argtypes = _LAUNCH_ARGS
    except AttributeError as error:
        raise PluginLibraryError(f"{path} is not a trtflow plugin library ({error}): {REBUILD_HINT}") from error
    if abi != ABI_VERSION:
        raise PluginLibraryError(f"{path} has C ABI version {abi}, trtflow expects {ABI_VERSION}: {REBUILD_HINT}")
    return lib


@functools.cache
def load_library(path: Path | str = DEFAULT_LIBRARY) -> ctypes.CDLL:
    """The plugin library with its functions typed; refuses a missing file or another ABI.

    Cached per path: a library stays loaded for the life of the process, so a rebuilt one
    takes effect in a new process.
    """
    path = Path(path)
    if not path.is_file():
        raise PluginLibraryError(f"{path} does not exist: {REBUILD_HINT}")
    return _load(str(path.resolve()))


# -- MultiLevelRoIAlign -----------------------------------------------------------------------


@dataclass(frozen=True)
class RoIAlignSpec:
    """torchvision MultiScaleRoIAlign's parameters as the kernel takes them.

    first_level is k of the first pooled map (its scale is 2^-k); level l has scale 2^-(k+l).
    """

    output_size: tuple[int, int] = (7, 7)
    sampling_ratio: int = 2
    aligned: bool = False
    first_level: int = 2
    num_levels: int = 4
    canonical_scale: int = 224
    canonical_level: int = 4

    def __post_init__(self):
        if not 1 <= self.num_levels <= MAX_LEVELS:
            raise ValueError(f"MultiLevelRoIAlign pools 1 to {MAX_LEVELS} levels, not {self.num_levels}")
        if min(self.output_size) < 1:
            raise ValueError(f"output_size {self.output_size} must be positive")

    @classmethod
    def from_scales(cls, spatial_scales: Sequence[float], **kwargs) -> RoIAlignSpec:
        return _spec(tuple(spatial_scales), tuple(sorted(kwargs.items())))

    def c_args(self) -> tuple[int, ...]:
        """out_h, out_w, sampling_ratio, aligned, first_level, canonical_scale, canonical_level."""
        return (
            *self.output_size,
            self.sampling_ratio,
            int(self.aligned),
            self.first_level,
            self.canonical_scale,
            self.canonical_level,
        )


@functools.lru_cache(maxsize=64)
def _spec(spatial_scales: tuple[float, ...], options: tuple) -> RoIAlignSpec:
    """RoIAlignSpec.from_scales, cached: the torch wrapper builds one per call."""
    return RoIAlignSpec(first_level=first_level(spatial_scales), num_levels=len(spatial_scales), **dict(options))


def first_level(spatial_scales: Sequence[float]) -> int:
    """k with scales == [2^-k, 2^-(k+1), ...]: torchvision's levels, halving map by map."""
    if not spatial_scales:
        raise ValueError("spatial_scales is empty: give one scale per pooled feature map")
    k = -math.log2(spatial_scales[0]) if spatial_scales[0] > 0 else math.nan
    expected = [2.0 ** -(round(k) + l) for l in range(len(spatial_scales))] if math.isfinite(k) else []
    if not math.isfinite(k) or round(k) < 0 or list(map(float, spatial_scales)) != expected:
        raise ValueError(
            f"spatial_scales {list(spatial_scales)} are not FPN levels 2^-k, 2^-(k+1), ...: give the maps "
            "finest first, each half the size of the previous (as torchvision's MultiScaleRoIAlign infers them)"
        )
    return round(k)


def infer_spatial_scales(feature_sizes: Sequence[Sequence[int]], image_size: Sequence[int]) -> list[float]:
    """torchvision's _infer_scale: 2^round(log2(feature height / image height)) per map."""
    return [2.0 ** round(math.log2(size[0] / image_size[0])) for size in feature_sizes]


def launch(
    lib: ctypes.CDLL,
    spec: RoIAlignSpec,
    feature_pointers: Sequence[int],
    feature_sizes: Sequence[tuple[int, int]],
    batch: int,
    channels: int,
    rois_pointer: int,
    num_rois: int,
    output_pointer: int,
    dtype: str,
    stream: int | None,
    layout: str = "nchw",
) -> None:
    """One library call on raw pointers: CUDA (stream given) or host reference (stream None).

    layout is the maps' memory layout, a key of LAYOUT_CODES. The torch wrapper, the JIT
    TensorRT plugin and the IPluginV3 plugin all go through here.
    """
    levels = len(feature_pointers)
    pointers = (ctypes.c_void_p * levels)(*feature_pointers)
    heights = (ctypes.c_int * levels)(*(h for h, _ in feature_sizes))
    widths = (ctypes.c_int * levels)(*(w for _, w in feature_sizes))
    args = (
        pointers,
        levels,
        heights,
        widths,
        batch,
        channels,
        rois_pointer,
        num_rois,
        output_pointer,
        *spec.c_args(),
        LAYOUT_CODES[layout],
    )
    if stream is None:
        code = lib.trtflow_multilevel_roi_align_host(*args)
    else:
        code = lib.trtflow_multilevel_roi_align(*args, DTYPE_CODES[dtype], stream)
    if code != 0:
        message = lib.trtflow_plugins_error_string(code).decode()
        raise PluginCallError(f"trtflow_multilevel_roi_align failed ({code}): {message}")


def multilevel_roi_align(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    *,
    output_size: int | Sequence[int] = 7,
    spatial_scales: Sequence[float],
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    lib_path: Path | str = DEFAULT_LIBRARY,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision MultiScaleRoIAlign(features, rois) through the plugin library.

    features: the pooled FPN maps, finest first, (B, C, H_l, W_l), float32 or float16, one
    device; maps in torch.channels_last memory format (map 0 decides) run the channels-last
    kernel, which reads whole sectors and is the faster one. rois: (N, 5) batch index, x1, y1,
    x2, y2 in input pixels (read as float32).
    spatial_scales: each map's scale (see infer_spatial_scales). Returns (N, C, out_h, out_w)
    in the features' dtype. CUDA runs on the current stream; CPU needs float32.
    """
    import torch

    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    spec = RoIAlignSpec.from_scales(
        spatial_scales,
        output_size=size,
        sampling_ratio=int(sampling_ratio),
        aligned=bool(aligned),
        canonical_scale=int(canonical_scale),
        canonical_level=int(canonical_level),
    )
    if len(features) != len(spatial_scales):
        raise ValueError(f"{len(features)} feature maps but {len(spatial_scales)} spatial_scales")
    first = features[0]
    dtype = str(first.dtype).removeprefix("torch.")  # float32 / float16: a DTYPE_CODES key
    for level, feature in enumerate(features):
        if (
            feature.dim() != 4
            or feature.shape[:2] != first.shape[:2]
            or feature.dtype != first.dtype
            or feature.device != first.device
        ):
            raise ValueError(
                f"feature map {level} is {tuple(feature.shape)} {feature.dtype} on {feature.device}: every map "
                f"must be (B, C, H, W) with map 0's B, C = {tuple(first.shape[:2])}, dtype and device"
            )
    if dtype not in DTYPE_CODES or (first.device.type == "cpu" and dtype != "float32"):
        raise ValueError(
            f"features are {first.dtype} on {first.device}: use float32 or float16 on CUDA, float32 on the CPU"
        )
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois is {tuple(rois.shape)}: expected (N, 5) rows of batch index, x1, y1, x2, y2")
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    maps = [f.contiguous(memory_format=memory_format) for f in features]
    rois = rois.to(device=first.device, dtype=torch.float32).contiguous()
    shape = (rois.shape[0], first.shape[1], *size)
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape or out.dtype != first.dtype or out.device != first.device or not out.is_contiguous():
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}: expected a contiguous "
            f"{shape} {first.dtype} on {first.device}"
        )
    lib = load_library(lib_path)
    call = functools.partial(
        launch,
        lib,
        spec,
        [m.data_ptr() for m in maps],
        [tuple(m.shape[2:]) for m in maps],
        first.shape[0],
        first.shape[1],
        rois.data_ptr(),
        rois.shape[0],
        out.data_ptr(),
        dtype,
        layout="nhwc" if channels_last else "nchw",
    )
    if first.device.type == "cpu":
        call(None)
    elif first.device.index == torch.cuda.current_device():
        call(torch.cuda.current_stream(first.device).cuda_stream)
    else:  # the library launches on the calling thread's current device
        with torch.cuda.device(first.device):
            call(torch.cuda.current_stream(first.device).cuda_stream)
    return out
