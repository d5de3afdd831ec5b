"""MultiLevelRoIAlign plugin vs torchvision.ops.MultiScaleRoIAlign on one GPU.

Same inputs for both: FPN maps p2-p5 of an 800x1344 input, 256 channels, batch 1; RoIs
spread evenly over the four levels (size log-uniform inside each level's LevelMapper range,
aspect 1:2..2:1, clipped to the image); 7x7 output, sampling_ratio 2; float32 and float16.
Each timed call starts with L2 flushed (a 256 MiB write outside the timed region) and is
timed with CUDA events; the median of --repeats calls after --warmup calls is reported.

"ours (call)" is trtflow.common.plugins.multilevel_roi_align (argument checks, ctypes, allocation);
"ours (kernel)" launches the library's entry point with prepared arguments on the NCHW maps.
"NHWC kernel" is the channels-last kernel on the same values in channels-last memory (what a
TensorRT engine hands the plugin in its HWC / HWC8 formats); "NHWC + convert" adds converting
the four NCHW maps to channels last inside the timed region, so it starts from the very inputs
torchvision gets. Output bandwidth is the output's bytes over the NCHW kernel time, against the
device-to-device copy bandwidth measured here (bytes read + written), which bounds any kernel
that must write that output.

    PYTHONPATH=src python benchmarks/bench_roi_align.py [--lib results/plugins/libtrtflow_plugins.so]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign

from trtflow.common.plugins import (
    SOURCE_DIR,
    BuildConfig,
    RoIAlignSpec,
    build_plugins,
    launch,
    load_library,
    multilevel_roi_align,
)

IMAGE_HW = (800, 1344)
CHANNELS = 256
LEVELS = (2, 3, 4, 5)
SCALES = [2.0**-k for k in LEVELS]
# sqrt(area) ranges LevelMapper sends to p2..p5 (k0 = 4, canonical 224).
LEVEL_RANGES = {2: (16.0, 112.0), 3: (112.0, 224.0), 4: (224.0, 448.0), 5: (448.0, 896.0)}


def pyramid(dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    h, w = IMAGE_HW
    return [
        torch.randn(1, CHANNELS, math.ceil(h / 2**k), math.ceil(w / 2**k), generator=generator, device="cuda").to(dtype)
        for k in LEVELS
    ]


def spread_rois(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 5) float32 RoIs of image 0, a quarter aimed at each level."""
    h, w = IMAGE_HW
    level = torch.randint(0, len(LEVELS), (count,), generator=generator, device="cuda")
    low = torch.tensor([LEVEL_RANGES[k][0] for k in LEVELS], device="cuda")[level]
    high = torch.tensor([LEVEL_RANGES[k][1] for k in LEVELS], device="cuda")[level]
    u = torch.rand(count, generator=generator, device="cuda")
    side = low * (high / low) ** u
    aspect = torch.exp((torch.rand(count, generator=generator, device="cuda") * 2 - 1) * math.log(2.0))
    bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
    cx = torch.rand(count, generator=generator, device="cuda") * w
    cy = torch.rand(count, generator=generator, device="cuda") * h
    boxes = torch.stack(
        [(cx - bw / 2).clamp(0, w), (cy - bh / 2).clamp(0, h), (cx + bw / 2).clamp(0, w), (cy + bh / 2).clamp(0, h)],
        dim=1,
    )
    return torch.cat([torch.zeros(count, 1, device="cuda"), boxes], dim=1)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (median of 20)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_seconds(lambda: dst.copy_(src), warmup=3, repeats=20, flush=None)


def median_seconds(fn, *, warmup: int, repeats: int, flush: torch.Tensor | None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def max_relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.float() - reference.float()).abs().max() / reference.abs().max())


def bench(lib_path: Path, dtype: torch.dtype, count: int, args, flush: torch.Tensor, copy_bw: float) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(count)
    maps = pyramid(dtype, generator)
    rois = spread_rois(count, generator)
    names = [f"p{k}" for k in LEVELS]
    pooler = MultiScaleRoIAlign(names, 7, 2)
    features = OrderedDict(zip(names, maps))
    boxes = [rois[:, 1:].to(dtype)]  # torchvision needs boxes in the maps' dtype
    reference = MultiScaleRoIAlign(names, 7, 2)(
        OrderedDict(zip(names, [m.float() for m in maps])), [rois[:, 1:]], [IMAGE_HW]
    )
    torchvision_out = pooler(features, boxes, [IMAGE_HW])
    ours_out = multilevel_roi_align(
        maps, rois, output_size=7, spatial_scales=SCALES, sampling_ratio=2, lib_path=lib_path
    )
    levels = pooler.map_levels([rois[:, 1:]]).bincount(minlength=len(LEVELS)).tolist()

    out = torch.empty_like(ours_out)
    out_nhwc = torch.empty_like(ours_out)
    maps_nhwc = [m.contiguous(memory_format=torch.channels_last) for m in maps]

    def kernel(levels: list[torch.Tensor], layout: str, output: torch.Tensor) -> None:
        launch(
            load_library(lib_path),
            RoIAlignSpec.from_scales(SCALES),
            [m.data_ptr() for m in levels],
            [tuple(m.shape[2:]) for m in levels],
            1,
            CHANNELS,
            rois.data_ptr(),
            count,
            output.data_ptr(),
            "float16" if dtype == torch.float16 else "float32",
            torch.cuda.current_stream().cuda_stream,
            layout,
        )

    def convert_and_kernel() -> None:
        kernel([m.contiguous(memory_format=torch.channels_last) for m in maps], "nhwc", out_nhwc)

    timing = {"warmup": args.warmup, "repeats": args.repeats, "flush": flush}
    t_torchvision = median_seconds(lambda: pooler(features, boxes, [IMAGE_HW]), **timing)
    t_call = median_seconds(
        lambda: multilevel_roi_align(
            maps, rois, output_size=7, spatial_scales=SCALES, sampling_ratio=2, lib_path=lib_path
        ),
        **timing,
    )
    t_kernel = median_seconds(lambda: kernel(maps, "nchw", out), **timing)
    t_nhwc = median_seconds(lambda: kernel(maps_nhwc, "nhwc", out_nhwc), **timing)
    t_convert_nhwc = median_seconds(convert_and_kernel, **timing)
    torch.cuda.synchronize()
    out_bytes = out.numel() * out.element_size()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "rois": count,
        "rois_per_level": dict(zip(names, levels)),
        "torchvision_ms": t_torchvision * 1e3,
        "ours_call_ms": t_call * 1e3,
        "ours_kernel_ms": t_kernel * 1e3,
        "nhwc_kernel_ms": t_nhwc * 1e3,
        "nhwc_convert_ms": t_convert_nhwc * 1e3,
        "speedup_call": t_torchvision / t_call,
        "speedup_kernel": t_torchvision / t_kernel,
        "speedup_nhwc": t_torchvision / t_nhwc,
        "speedup_nhwc_convert": t_torchvision / t_convert_nhwc,
        "output_bytes": out_bytes,
        "output_gbps": out_bytes / t_kernel / 1e9,
        "write_bound_ms": out_bytes / copy_bw * 1e3,
        "fraction_of_copy_bw": out_bytes / t_kernel / copy_bw,
        "ours_max_rel_error": max_relative_error(ours_out, reference),
        "kernel_matches_call": bool(torch.equal(out, ours_out)),
        "nhwc_max_rel_error": max_relative_error(out_nhwc, reference),
        "torchvision_max_rel_error": max_relative_error(torchvision_out, reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", type=Path, help="plugin library (default: build one for this GPU)")
    parser.add_argument("--rois", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--source-dir", type=Path, default=SOURCE_DIR, help="plugin sources it builds from")
    parser.add_argument("--nvcc-flag", action="append", default=[], help="extra nvcc flag (repeatable)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        lib_path = args.lib
        if lib_path is None:
            major, minor = torch.cuda.get_device_capability()
            arch = 10 * major + minor
            config = BuildConfig(archs=(arch,), ptx_arch=arch, extra_flags=tuple(args.nvcc_flag))
            build_plugins(args.source_dir, Path(scratch), config)
            lib_path = Path(scratch) / "libtrtflow_plugins.so"
        copy_bw = copy_bandwidth()
        flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        rows = [
            bench(lib_path, dtype, count, args, flush, copy_bw)
            for dtype in (getattr(torch, name) for name in args.dtypes)
            for count in args.rois
        ]

    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    header = (
        "dtype",
        "RoIs",
        "torchvision ms",
        "ours call ms",
        "ours kernel ms",
        "NHWC kernel ms",
        "NHWC + convert ms",
        "x call",
        "x kernel",
        "x NHWC",
        "x NHWC + convert",
        "out GB/s",
        "% copy BW",
        "err ours",
        "err NHWC",
        "err tv",
    )
    print(" | ".join(header))
    for r in rows:
        print(
            " | ".join(
                [
                    r["dtype"],
                    str(r["rois"]),
                    f"{r['torchvision_ms']:.3f}",
                    f"{r['ours_call_ms']:.3f}",
                    f"{r['ours_kernel_ms']:.3f}",
                    f"{r['nhwc_kernel_ms']:.3f}",
                    f"{r['nhwc_convert_ms']:.3f}",
                    f"{r['speedup_call']:.1f}",
                    f"{r['speedup_kernel']:.1f}",
                    f"{r['speedup_nhwc']:.1f}",
                    f"{r['speedup_nhwc_convert']:.1f}",
                    f"{r['output_gbps']:.0f}",
                    f"{100 * r['fraction_of_copy_bw']:.0f}",
                    f"{r['ours_max_rel_error']:.1e}",
                    f"{r['nhwc_max_rel_error']:.1e}",
                    f"{r['torchvision_max_rel_error']:.1e}",
                ]
            )
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": device, "torch": torch.__version__, "copy_bandwidth_gbps": copy_bw / 1e9, "results": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
