"""Stage `report`: results/report.html, one self-contained page (PNG plots embedded as base64).

The pipeline's stages with their checks (ONNX parity, calibration ranges and simulated INT8
accuracy where present, engines, verify, bench), a table per precision, and matplotlib plots:
latency bars, the Δscore histogram of matched detections, calibration ranges per tensor, and
example val images with reference vs deployed boxes.
"""
from __future__ import annotations

import base64
import html
import io
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from trtflow.artifacts import write_text

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
REFERENCE_COLOR, DEPLOYED_COLOR = "#1a9850", "#d73027"


def read_json(path: str | Path | None):
    return None if path is None or not Path(path).is_file() else json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def variant(entry: Mapping) -> str:
    """An executor entry's label: name, dtype and CUDA graph mode where they say something."""
    parts = [entry["executor"]]
    dtype = entry.get("dtype") or entry.get("head_dtype")
    if dtype:
        parts.append(dtype)
    if entry.get("cuda_graph") not in (None, False, "none"):
        parts.append(f"graph:{entry['cuda_graph']}")
    return " ".join(parts)


def latency_plot(bench: Mapping[str, Mapping]) -> bytes | None:
    """Horizontal bars of p50 latency (whiskers to p90) per precision, executor and batch size."""
    rows = [(precision, entry) for precision, document in bench.items() for entry in document["results"]
            if "p50_ms" in entry]
    if not rows:
        return None
    figure, axes = _figure(8, 0.35 * len(rows) + 1.2)
    labels = [f"{precision} | {variant(entry)} | bs {entry['batch_size']}" for precision, entry in rows]
    p50 = np.array([entry["p50_ms"] for _, entry in rows])
    p90 = np.array([entry["p90_ms"] for _, entry in rows])
    colors = {p: f"C{i}" for i, p in enumerate(bench)}
    axes.barh(range(len(rows)), p50, xerr=[np.zeros_like(p50), p90 - p50], color=[colors[p] for p, _ in rows],
              capsize=3)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("latency per batch, ms (bar p50, whisker p90)")
    axes.set_title("Latency by executor")
    return png(figure)


def dscore_histogram(dscores: Mapping[str, np.ndarray]) -> bytes | None:
    """Deployed minus reference score of matched detections, one step histogram per precision."""
    present = {precision: values for precision, values in dscores.items() if len(values)}
    if not present:
        return None
    figure, axes = _figure(7, 3.5)
    limit = max(float(np.abs(values).max()) for values in present.values()) or 1e-6
    bins = np.linspace(-limit, limit, 61)
    for precision, values in present.items():
        axes.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{precision} (n={len(values)})")
    axes.set_yscale("log")
    axes.set_xlabel("Δscore = deployed − reference (matched detections)")
    axes.set_ylabel("detections")
    axes.legend()
    axes.set_title("Score differences")
    return png(figure)


def calibration_plot(ranges: Mapping) -> bytes | None:
    """Calibrated amax per quantized tensor, in graph order, log scale."""
    tensors = ranges.get("tensors") or {}
    if not tensors:
        return None
    names, amax = list(tensors), np.array([value["amax"] for value in tensors.values()])
    figure, axes = _figure(max(7.0, 0.12 * len(names)), 4)
    axes.bar(range(len(names)), np.maximum(amax, 1e-8), color="C0")
    axes.set_yscale("log")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes.set_ylabel("amax (scale × 127)")
    axes.set_title(f"Calibration ranges: {len(names)} tensors, {ranges.get('algorithm')}, "
                   f"{ranges.get('num_images')} images")
    return png(figure)


def example_images(val: Mapping, reference: Sequence[Mapping], deployed: Mapping[str, Sequence[Mapping]],
                   count: int, min_score: float) -> bytes | None:
    """The first `count` val images, one column per precision: reference boxes (green, dashed) under the
    deployed ones (red)."""
    import matplotlib.patches as patches

    from trtflow.data import read_image

    images = val["images"][:count]
    if not images or not deployed:
        return None
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(len(images), len(deployed), figsize=(3.2 * len(deployed), 3.2 * len(images)),
                                dpi=100, squeeze=False)
    for row, image in enumerate(images):
        picture = read_image(image["file_name"])[..., ::-1]
        for column, (precision, detections) in enumerate(deployed.items()):
            axes = grid[row][column]
            axes.imshow(picture)
            axes.set_axis_off()
            if row == 0:
                axes.set_title(precision)
            for entries, color, style in ((reference, REFERENCE_COLOR, "--"), (detections, DEPLOYED_COLOR, "-")):
                for entry in entries:
                    if entry["image_id"] == image["id"] and entry["score"] >= min_score:
                        x, y, w, h = entry["bbox"]
                        axes.add_patch(patches.Rectangle((x, y), w, h, fill=False, edgecolor=color, linestyle=style,
                                                         linewidth=1.2))
    figure.suptitle("reference (green, dashed) vs deployed (red)")
    return png(figure)


# --------------------------------------------------------------------------- HTML


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "–"
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell if isinstance(cell, Markup) else _cell(cell)}</td>" for cell in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Markup(str):
    """HTML that `table` inserts as is."""


def badge(passed: bool | None, text: str | None = None) -> Markup:
    kind = {True: "pass", False: "fail", None: "none"}[passed]
    return Markup(f'<span class="{kind}">{html.escape(text or {"pass": "passed", "fail": "FAILED", "none": "n/a"}[kind])}</span>')


def image(data: bytes | None, alt: str) -> str:
    if data is None:
        return f"<p class=note>{html.escape(alt)}: nothing to plot.</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.pass { background: #1a9850; color: white; padding: 0 0.4em; border-radius: 3px; }
.fail { background: #d73027; color: white; padding: 0 0.4em; border-radius: 3px; }
.none { background: #999; color: white; padding: 0 0.4em; border-radius: 3px; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
"""


def stage_rows(parity, calibration_accuracy, calibration_ranges, engines, verify, bench) -> list[list]:
    rows = []
    if parity is not None:
        rows.append(["onnx", "results/onnx/parity.json", f"ONNX Runtime vs PyTorch on {parity['images']} images, "
                     f"max |Δ| {parity['max_abs']:.3g} (tolerance {parity['tolerance']} × max|ref|)",
                     badge(parity["passed"])])
    if calibration_ranges is not None:
        rows.append(["calibrate", "results/calib/ranges.json",
                     f"{len(calibration_ranges['tensors'])} tensors, {calibration_ranges['algorithm']}, "
                     f"{calibration_ranges['num_images']} images", badge(None, "written")])
    if calibration_accuracy is not None:
        rows.append(["calibrate", "results/calib/accuracy.json",
                     f"simulated INT8 mAP {calibration_accuracy['int8_sim_mAP']:.4f} vs fp32 "
                     f"{calibration_accuracy['fp32_mAP']:.4f} (drop {100 * calibration_accuracy['delta']:.2f} points, "
                     f"{calibration_accuracy.get('executor', '?')})", badge(None, "measured")])
    for precision, metadata in engines.items():
        rows.append(["engine", f"results/engine_{precision}.plan",
                     f"{metadata['backend']} {metadata['backend_version']}, built {metadata.get('built_on')}, "
                     f"{metadata['plan_bytes'] / 1e6:.1f} MB in {metadata['build_seconds']:.1f} s, "
                     f"RoIAlign {metadata.get('roi_align')}", badge(True, "built")])
    for precision, result in verify.items():
        executed = "engine" if result["engine_executed"] else f"{result['executor']} (engine did not run)"
        rows.append(["verify", f"results/verify/{precision}.json",
                     f"{executed}: match recall {result['match_recall']:.4f}, mAP {result['mAP']:.4f} vs "
                     f"{result['reference_mAP']:.4f}", badge(result["passed"])])
    for precision, document in bench.items():
        timed = [entry for entry in document["results"] if "p50_ms" in entry]
        skipped = [entry for entry in document["results"] if "skipped" in entry]
        rows.append(["bench", f"results/bench/{precision}.json",
                     f"{len(timed)} timings, {len(skipped)} skipped, on {document['hardware'].get('gpu') or document['hardware']['cpu']}",
                     badge(None, "measured")])
    return rows


def precision_section(precision: str, result: Mapping | None, bench: Mapping | None) -> str:
    parts = [f"<h3>{precision}</h3>"]
    if result is not None:
        details = ", ".join(f"{key}: {value}" for key, value in result.get("executor_details", {}).items())
        rows = [
            ["executor", Markup(f"<b>{html.escape(result['executor'])}</b> ({html.escape(details)})")],
            ["engine executed", result["engine_executed"]],
            *([["why not", result["reason"]]] if not result["engine_executed"] else []),
            ["images", result["images"]],
            ["match recall / precision", f"{result['match_recall']:.4f} / {result['match_precision']:.4f} "
                                         f"(same class, IoU ≥ {result['match_iou']})"],
            ["matched / reference / deployed", f"{result['matched']} / {result['reference_detections']} / "
                                               f"{result['deployed_detections']}"],
            ["mean / max |Δscore|", f"{_cell(result['mean_abs_dscore'])} / {_cell(result['max_abs_dscore'])}"],
            ["mean box IoU", result["mean_iou"]],
            ["zero-area boxes (not matched)", "reference {reference}, deployed {deployed}".format(
                **result.get("zero_area_detections", {"reference": 0, "deployed": 0}))],
            ["mAP deployed / reference", f"{result['mAP']:.4f} / {result['reference_mAP']:.4f} "
                                         f"(drop {result['map_drop_points']:.2f} points)"],
            ["thresholds", ", ".join(f"{k} {v}" for k, v in result["thresholds"].items()) or "none"],
            ["verdict", badge(result["passed"], "; ".join(result["failures"]) or None)],
        ]
        parts.append(table(["verify", ""], rows))
    if bench is not None:
        rows = []
        for entry in bench["results"]:
            details = ", ".join(f"{key} {value}" for key, value in entry.items()
                                if key in ("device", "head_device", "providers", "note", "backend"))
            if "skipped" in entry:
                rows.append([variant(entry), entry.get("batch_size"), Markup(f"<i>skipped</i>: {html.escape(entry['skipped'])}"),
                             None, None, None, details])
            else:
                rows.append([variant(entry), entry["batch_size"], entry["p50_ms"], entry["p90_ms"], entry["p99_ms"],
                             entry["throughput_ips"], details])
        parts.append(table(["executor", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "where"], rows))
    return "\n".join(parts)


def matched_dscores(reference, deployed, match_iou: float) -> np.ndarray:
    from trtflow.verify import match_detections

    return match_detections(reference, deployed, match_iou).dscores


def build_report(out_html: str | Path, *, val_json, reference_detections, reference_metrics=None, parity=None,
                 verify: Mapping[str, str | Path], deployed: Mapping[str, str | Path], bench: Mapping[str, str | Path],
                 engines: Mapping[str, str | Path] | None = None, calibration_ranges=None, calibration_accuracy=None,
                 settings: Mapping | None = None) -> str:
    """Write the report; returns its HTML. Optional inputs that do not exist are left out."""
    settings = settings or {}
    val = read_json(val_json)
    reference = read_json(reference_detections)
    verify_docs, deployed_docs, bench_docs, engine_docs = (
        {p: doc for p, path in paths.items() if (doc := read_json(path)) is not None}
        for paths in (verify, deployed, bench, engines or {})
    )
    parity_doc, ranges_doc, accuracy_doc = read_json(parity), read_json(calibration_ranges), read_json(calibration_accuracy)
    reference_doc = read_json(reference_metrics)
    precisions = list(dict.fromkeys([*verify_docs, *bench_docs]))

    dscores = {p: matched_dscores(reference, deployed_docs[p], verify_docs[p]["match_iou"])
               for p in precisions if p in deployed_docs and p in verify_docs}
    hardware = next(iter(bench_docs.values()))["hardware"] if bench_docs else {}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>trtflow report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>trtflow report</h1>",
        f"<p class=note>{len(val['images'])} val images; reference PyTorch mAP "
        f"{_cell(reference_doc['mAP']) if reference_doc else '–'}; hardware: "
        f"{html.escape(str(hardware.get('gpu') or hardware.get('cpu', '?')))}.</p>",
        "<h2>Stages and their checks</h2>",
        table(["stage", "artifact", "check", "result"],
              stage_rows(parity_doc, accuracy_doc, ranges_doc, engine_docs, verify_docs, bench_docs)),
        "<h2>Per precision</h2>",
        *(precision_section(p, verify_docs.get(p), bench_docs.get(p)) for p in precisions),
        "<h2>Latency</h2>", image(latency_plot(bench_docs), "latency bars"),
        "<h2>Score differences</h2>", image(dscore_histogram(dscores), "Δscore histogram"),
    ]
    if ranges_doc is not None:
        parts += ["<h2>Calibration ranges</h2>", image(calibration_plot(ranges_doc), "calibration ranges")]
    parts += ["<h2>Examples</h2>",
              image(example_images(val, reference, deployed_docs, settings.get("example_images", 3),
                                   settings.get("min_score", 0.5)), "example images"),
              "</body></html>"]
    text = "\n".join(parts)
    write_text(out_html, text)
    return text


# --------------------------------------------------------------------------- rendering check


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1200, height: int = 2400,
               timeout: float = 120) -> Path:
    """Render `html_path` in headless Chromium into `png_path`; raises RuntimeError without a browser."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no headless browser found (looked for {', '.join(BROWSERS)}); "
                           "install one, e.g. apt-get install -y chromium")
    png_path = Path(png_path)
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={width},{height}", f"--screenshot={png_path.resolve()}",
               Path(html_path).resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode or not png_path.is_file():
        raise RuntimeError(f"{browser} could not render {html_path}: {result.stderr[-2000:]}")
    return png_path
