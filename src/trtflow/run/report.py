"""Stage `report`: results/report.html (results/<model>/report.html under `models:`), one self-contained page
(PNG plots embedded as base64), and the same plots as PNG files plus a summary table (TSV) for `snakemake --report`
(results/report/). Its tables name the files the rule gave it.

The pipeline's stages with their checks (ONNX parity, calibration ranges and simulated INT8
accuracy where present, engines, verify, bench), a table per precision headed by what its verification
actually ran (`verified_level`), and matplotlib plots: latency bars, the Δscore histogram of matched
detections, calibration ranges per tensor, per-layer sensitivity and the float-layer curve
(calibration.keep_float.auto), and example val images with reference vs deployed boxes.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trtflow.artifacts import write_bytes, write_text
from trtflow.common.images import read_image
from trtflow.formats.plan_metadata import PlanMetadata, plan_path
from trtflow.run.drawing import DEPLOYED_COLOR, REFERENCE_COLOR
from trtflow.run.levels import LEVELS
from trtflow.run.matching import match_detections
from trtflow.run.subset import val_subset
from trtflow.run.summary import level_words, verdict_words, verified_level

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
REFERENCE_STYLE = {"edgecolor": REFERENCE_COLOR, "linewidth": 5, "alpha": 0.6, "zorder": 2}
DEPLOYED_STYLE = {"edgecolor": DEPLOYED_COLOR, "linewidth": 1.4, "linestyle": (0, (4, 2)), "zorder": 3}
FIGURES = ("latency", "dscore", "calibration", "sensitivity", "examples")  # the PNG files of `snakemake --report`


def read_json(path: str | Path | None):
    return None if path is None or not Path(path).is_file() else json.loads(Path(path).read_text())


class Artifact(NamedTuple):
    """A stage's JSON as the report read it: the path the report names it by, and its content."""

    path: str
    document: Any


def shown_path(path: str | Path) -> str:
    """A file as the report names it: relative to the working directory where it lies under it (the pipeline's
    results/<model>/...), else as given."""
    path, workdir = Path(path), Path.cwd()
    return str(path.relative_to(workdir) if path.is_absolute() and path.is_relative_to(workdir) else path)


def read_artifact(path: str | Path | None) -> Artifact | None:
    """The JSON at `path` with the path it was given; None where there is none (an optional input)."""
    document = read_json(path)
    return None if document is None else Artifact(shown_path(path), document)


def read_artifacts(paths: Mapping[str, str | Path]) -> dict[str, Artifact]:
    """{precision: Artifact} of the precisions whose JSON exists."""
    return {precision: artifact for precision, path in paths.items() if (artifact := read_artifact(path)) is not None}


def read_engines(paths: Mapping[str, str | Path]) -> dict[str, Artifact]:
    """{precision: Artifact of its plan's PlanMetadata} of the precisions whose plan JSON exists."""
    return {
        precision: Artifact(shown_path(path), PlanMetadata.read(path))
        for precision, path in paths.items()
        if Path(path).is_file()
    }


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


def ran_as_asked(entry: Mapping) -> bool:
    """A bench entry timed the precision its JSON is for: it was timed, and no note says it ran otherwise (PyTorch
    float32 under fp16 on a CPU, a float32 head where float16 cannot run)."""
    return "p50_ms" in entry and "note" not in entry


def not_run_here(document: Mapping) -> list[str]:
    """The executors of a bench JSON that did not time its precision here, each with why: skipped ones (no GPU for
    the plan), and ones that ran another precision (their note)."""
    reasons = {}
    for entry in document["results"]:
        if not ran_as_asked(entry):
            reasons.setdefault(variant(entry), entry.get("skipped") or entry.get("note"))
    return [f"{name} ({why})" for name, why in reasons.items()]


def latency_plot(bench: Mapping[str, Mapping]) -> bytes | None:
    """Horizontal bars of p50 latency (whiskers to p90) per precision, executor and batch size, of the executors
    that ran that precision."""
    rows = [
        (precision, entry)
        for precision, document in bench.items()
        for entry in document["results"]
        if ran_as_asked(entry)
    ]
    if not rows:
        return None
    figure, axes = _figure(8, 0.35 * len(rows) + 1.2)
    labels = [f"{precision} | {variant(entry)} | bs {entry['batch_size']}" for precision, entry in rows]
    p50 = np.array([entry["p50_ms"] for _, entry in rows])
    p90 = np.array([entry["p90_ms"] for _, entry in rows])
    colors = {p: f"C{i}" for i, p in enumerate(bench)}
    axes.barh(
        range(len(rows)), p50, xerr=[np.zeros_like(p50), p90 - p50], color=[colors[p] for p, _ in rows], capsize=3
    )
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
    # one row per tensor, its name horizontal at a readable size: the figure grows with the tensor count
    figure, axes = _figure(9, 0.22 * len(names) + 1.4)
    axes.barh(range(len(names)), np.maximum(amax, 1e-8), color="C0")
    axes.set_xscale("log")
    axes.set_yticks(range(len(names)), [short_name(name) for name in names], fontsize=8)
    axes.set_ylim(len(names) - 0.5, -0.5)  # graph order, top to bottom
    axes.grid(axis="x", which="major", alpha=0.3)
    axes.set_xlabel("amax (scale × 127), log scale")
    axes.set_title(
        f"Calibration ranges: {len(names)} tensors, {ranges.get('algorithm')}, {ranges.get('num_images')} images"
    )
    return png(figure)


def sensitivity_plot(sensitivity: Mapping[str, Mapping], choices: Mapping[str, Mapping]) -> bytes | None:
    """Per quantized precision: each layer's cost (the mAP it gives back alone in float, bars; its SQNR alone
    quantized, dots) in graph order, and the simulated mAP against the number of layers left in float (rule
    float_layers' steps) with the budget."""
    precisions = [p for p in sensitivity if p in choices]
    if not precisions:
        return None
    import matplotlib.pyplot as plt

    rows = max(len(sensitivity[p]["layers"]) for p in precisions)
    figure, grid = plt.subplots(
        len(precisions),
        2,
        figsize=(13, (0.2 * rows + 1.6) * len(precisions)),
        dpi=100,
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    for (cost, curve), precision in zip(grid, precisions):
        document, choice = sensitivity[precision], choices[precision]
        layers = document["layers"]
        chosen = set(choice["float_layers"])
        # the node name too: a weight shared by several layers (an RPN head's, per FPN level) names none alone
        labels = [f"{layer['name']}  {short_name(layer['weight'] or '', 40)}" for layer in layers]
        positions = np.arange(len(layers))
        if "fp32_mAP" in document:
            colors = ["C3" if layer["name"] in chosen else "C0" for layer in layers]
            cost.barh(positions, [layer["gain_points"] for layer in layers], color=colors)
            cost.set_xlabel("mAP points given back with the layer alone in float (red: left in float)")
        cost.set_yticks(positions, labels, fontsize=7)
        cost.set_ylim(len(layers) - 0.5, -0.5)
        signal = cost.twiny()
        signal.plot(
            [layer["sqnr_db"] if layer["sqnr_db"] is not None else np.nan for layer in layers],
            positions,
            "o",
            color="C1",
            markersize=3,
        )
        signal.set_xlabel("SQNR of the outputs with the layer alone quantized (dB, dots)", color="C1")
        correlation = document.get("rank_correlation")
        cost.set_title(
            f"{precision}: {len(layers)} layers, {document['images']['images']} of {document['images']['of']} val "
            "images" + (f", rank correlation {correlation:.2f}" if correlation is not None else "")
        )
        path = [step for step in choice["steps"] if step["change"] in ("none", "add")]
        curve.plot(
            [s["float_layers"] for s in path], [s["mAP"] for s in path], "o-", label="left in float, costliest first"
        )
        removed = [step for step in choice["steps"] if step["change"] == "remove"]
        if removed:
            curve.plot(
                [s["float_layers"] for s in removed],
                [s["mAP"] for s in removed],
                "x",
                color="C2",
                label="one taken back",
            )
        curve.plot([len(chosen)], [choice["mAP"]], "*", color="C3", markersize=12, label="chosen")
        curve.axhline(choice["fp32_mAP"], color="grey", linewidth=1, label="float")
        curve.axhline(
            choice["fp32_mAP"] - choice["budget_points"] / 100,
            color="C3",
            linestyle="--",
            label=f"budget ({choice['budget_points']:g} points)",
        )
        curve.set_xlabel("layers in float")
        curve.set_ylabel(f"simulated mAP ({choice['images']['images']} images)")
        curve.set_title(f"chosen: {len(chosen)} of {choice['of_layers']} layers in float")
        curve.legend(fontsize=7)
    return png(figure)


def short_name(name: str, limit: int = 48) -> str:
    """A tensor name that fits a plot's label column: its end, where ONNX names say what they are."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def example_images(
    val: Mapping, reference: Sequence[Mapping], deployed: Mapping[str, Sequence[Mapping]], count: int, min_score: float
) -> bytes | None:
    """The first `count` val images, one column per precision: reference boxes (wide, light green) under the
    deployed ones (thin red, dashed), so that a box both agree on shows as a red dashed line on a green band and
    a box only one of them has stands out alone."""
    import matplotlib.patches as patches

    images = val["images"][:count]
    if not images or not deployed:
        return None
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(
        len(images), len(deployed), figsize=(3.2 * len(deployed), 3.2 * len(images)), dpi=100, squeeze=False
    )
    for row, image in enumerate(images):
        picture = read_image(image["file_name"])[..., ::-1]
        for column, (precision, detections) in enumerate(deployed.items()):
            axes = grid[row][column]
            axes.imshow(picture)
            axes.set_axis_off()
            if row == 0:
                axes.set_title(precision)
            for entries, style in ((reference, REFERENCE_STYLE), (detections, DEPLOYED_STYLE)):
                for entry in entries:
                    if entry["image_id"] == image["id"] and entry["score"] >= min_score:
                        x, y, w, h = entry["bbox"]
                        axes.add_patch(patches.Rectangle((x, y), w, h, fill=False, **style))
    figure.suptitle("reference (wide green band) vs deployed (thin red dashes, on top)")
    return png(figure)


def placeholder(message: str) -> bytes:
    """A small figure saying why a plot is empty (the report's PNG outputs always exist)."""
    figure, axes = _figure(6, 1.5)
    axes.set_axis_off()
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
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
    body = "".join(
        "<tr>" + "".join(f"<td>{cell if isinstance(cell, Markup) else _cell(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Markup(str):
    """HTML that `table` inserts as is."""


def badge(passed: bool | None, text: str | None = None) -> Markup:
    kind = {True: "pass", False: "fail", None: "none"}[passed]
    return Markup(
        f'<span class="{kind}">{html.escape(text or {"pass": "passed", "fail": "FAILED", "none": "n/a"}[kind])}</span>'
    )


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
.partial { background: #fdae61; color: #222; padding: 0 0.4em; border-radius: 3px; }
h3 .pass, h3 .fail, h3 .partial { font-size: 0.75em; margin-left: 0.6em; vertical-align: middle; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
"""


def verified_badge(result: Mapping) -> Markup:
    """ "passed at <level>": green only where the engine itself ran and passed; amber where a stand-in passed; red
    ("FAILED at <level>", in capitals as every failed badge) with the failures where the thresholds were missed."""
    text = verdict_words(result)
    if not result["passed"]:
        return badge(False, f"FAILED at {level_words(verified_level(result))}: " + "; ".join(result["failures"]))
    return Markup(
        f'<span class="{"pass" if verified_level(result) == "engine" else "partial"}">{html.escape(text)}</span>'
    )


def verdict_legend() -> str:
    """What the badges' colours and levels mean, once above the precisions."""
    ladder = " &lt; ".join(f"<b>{html.escape(level_words(level))}</b>" for level in LEVELS)
    return (
        "<p class=note>Each precision's verdict: "
        f"{badge(True, 'passed at engine')} the plan itself ran here and met its thresholds; "
        f"{Markup('<span class=partial>passed at network definition</span>')} a stand-in ran (the plan cannot run "
        f"here) and met them, what it leaves unverified is named; {badge(False, 'FAILED at …')} a threshold was "
        f"missed, named. Levels, weakest first: {ladder}.</p>"
    )


def details_words(details: Mapping) -> str:
    """An executor's details as "key value" phrases; a nested mapping (e.g. built_by) or list as its values."""
    return ", ".join(
        f"{key} {' '.join(map(str, value.values() if isinstance(value, Mapping) else value))}"
        if isinstance(value, Mapping | list)
        else f"{key} {value}"
        for key, value in details.items()
    )


def unverified(result: Mapping) -> str | None:
    """What the verification left unverified: the JSON's sentence, else why the engine did not run."""
    return result.get("unverified") or (None if verified_level(result) == "engine" else result.get("reason"))


def tensor_census_words(network_record: Mapping | None) -> str:
    """The engine row's census of the recorded network's activation tensors per dtype (trtflow.build.engine's
    tensor_census, in the plan JSON's network_record); nothing for a plan JSON without one."""
    census = (network_record or {}).get("tensor_dtypes")
    if not census:
        return ""
    words = ", ".join(
        f"{dtype} {counts['tensors']} ({counts['bytes'] / 1e6:.1f} MB)"
        for dtype, counts in sorted(census["activations"].items(), key=lambda item: -item[1]["bytes"])
    )
    return f"; activation tensors at batch 1: {words}"


def stage_rows(
    parity: Artifact | None,
    calibration_accuracy: Artifact | None,
    calibration_ranges: Artifact | None,
    engines: Mapping[str, Artifact],
    verify: Mapping[str, Artifact],
    bench: Mapping[str, Artifact],
    float_layers: Mapping[str, Artifact] | None = None,
) -> list[list]:
    """One row per stage artifact, named by the path the report read it from (results/<model>/... under `models:`)."""
    rows = []
    if parity is not None:
        document = parity.document
        rows.append(
            [
                "onnx",
                parity.path,
                f"ONNX Runtime vs PyTorch on {document['images']} images, "
                f"max |Δ| {document['max_abs']:.3g} (tolerance {document['tolerance']} × max|ref|)",
                badge(document["passed"]),
            ]
        )
    if calibration_ranges is not None:
        document = calibration_ranges.document
        rows.append(
            [
                "calibrate",
                calibration_ranges.path,
                f"{len(document['tensors'])} tensors, {document['algorithm']}, {document['num_images']} images",
                badge(None, "written"),
            ]
        )
    if calibration_accuracy is not None:
        document = calibration_accuracy.document
        simulated = [key.removesuffix("_sim_mAP") for key in document if key.endswith("_sim_mAP")]
        rows.append(
            [
                "calibrate",
                calibration_accuracy.path,
                "; ".join(
                    f"simulated {name} mAP {document[f'{name}_sim_mAP']:.4f} vs fp32 {document['fp32_mAP']:.4f} "
                    f"(drop {100 * document[f'{name}_delta']:.2f} points)"
                    for name in simulated
                )
                + f" ({document.get('executor', '?')})",
                badge(None, "measured"),
            ]
        )
    for precision, choice in (float_layers or {}).items():
        document = choice.document
        rows.append(
            [
                "calibrate",
                choice.path,
                f"{precision}: {len(document['float_layers'])} of {document['of_layers']} layers left in float"
                + (f" ({', '.join(document['float_layers'])})" if document["float_layers"] else "")
                + f"; simulated mAP {document['mAP']:.4f} vs float {document['fp32_mAP']:.4f} (drop "
                f"{document['drop_points']:.2f} points, budget {document['budget_points']:g}: {document['budget_key']}; "
                f"{document['images']['images']} of {document['images']['of']} val images)",
                badge(None, "chosen"),
            ]
        )
    for engine in engines.values():
        metadata = engine.document
        rows.append(
            [
                "engine",
                str(plan_path(engine.path)),
                f"{metadata.backend} {metadata.backend_version}, built {metadata.built_on}, "
                f"{metadata.plan_bytes / 1e6:.1f} MB in {metadata.build_seconds:.1f} s, "
                f"RoIAlign {metadata.roi_align}" + tensor_census_words(metadata.network_record),
                badge(True, "built"),
            ]
        )
    for verification in verify.values():
        result = verification.document
        executed = "engine" if result["engine_executed"] else f"{result['executor']} (engine did not run)"
        found = (
            f"impossible output, {result['impossible_output']}"
            if "impossible_output" in result
            else f"match recall {result['match_recall']:.4f}, mAP {result['mAP']:.4f} vs {result['reference_mAP']:.4f}"
        )
        rows.append(["verify", verification.path, f"{executed}: {found}", verified_badge(result)])
    for timing in bench.values():
        document = timing.document
        timed = [entry for entry in document["results"] if ran_as_asked(entry)]
        rows.append(
            [
                "bench",
                timing.path,
                f"{len(timed)} timings, {len(not_run_here(document))} executors not run, on {document['hardware'].get('gpu') or document['hardware']['cpu']}",
                badge(None, "measured"),
            ]
        )
    return rows


def images_words(count: int, subset: Mapping | None, noun: str = "images") -> str:
    """`count` images, or for a seeded subset: 20 of 100 images (seeded subset, seed 0)."""
    if not subset:
        return f"{count} {noun}"
    return f"{subset['images']} of {subset['of']} {noun} (seeded subset, seed {subset['seed']})"


def interval_rows(result: Mapping) -> list[list]:
    """A verdict on a subset: its 95 % intervals, one row each (none for all images)."""
    intervals = result.get("intervals", {})
    rows = []
    for key, what in (("match_recall", "match recall"), ("map_drop_points", "mAP drop (points)")):
        if key in intervals:
            low, high = intervals[key]["interval"]
            rows.append(
                [
                    f"{what}, {intervals['confidence']:.0%} interval",
                    f"[{low:.4g}, {high:.4g}] ({intervals[key]['method']})",
                ]
            )
    return rows


def comparison_rows(result: Mapping) -> list[list]:
    """A verify result's numbers: its detections matched to the reference's, mAP, and the thresholds held."""
    return [
        ["images", images_words(result["images"], result["subset"]) if "subset" in result else result["images"]],
        [
            "match recall / precision",
            f"{result['match_recall']:.4f} / {result['match_precision']:.4f} (same class, IoU ≥ {result['match_iou']})",
        ],
        [
            "matched / reference / deployed",
            f"{result['matched']} / {result['reference_detections']} / {result['deployed_detections']}",
        ],
        ["mean / max |Δscore|", f"{_cell(result['mean_abs_dscore'])} / {_cell(result['max_abs_dscore'])}"],
        ["mean box IoU", result["mean_iou"]],
        [
            "zero-area boxes (not matched)",
            "reference {reference}, deployed {deployed}".format(
                **result.get("zero_area_detections", {"reference": 0, "deployed": 0})
            ),
        ],
        [
            "mAP deployed / reference",
            f"{result['mAP']:.4f} / {result['reference_mAP']:.4f} (drop {result['map_drop_points']:.2f} points)",
        ],
        *interval_rows(result),
        ["thresholds", ", ".join(f"{k} {v}" for k, v in result["thresholds"].items()) or "none"],
    ]


def precision_section(precision: str, result: Mapping | None, bench: Mapping | None) -> str:
    parts = [f"<h3>{precision}{verified_badge(result) if result is not None else ''}</h3>"]
    if result is not None:
        details = details_words(result.get("executor_details", {}))
        rows = [
            [
                "verified",
                Markup(f"<b>{html.escape(level_words(verified_level(result)))}</b>"),
            ],
            *([["not verified", unverified(result)]] if unverified(result) else []),
            ["executor", Markup(f"<b>{html.escape(result['executor'])}</b> ({html.escape(details)})")],
            ["engine executed", "yes" if result["engine_executed"] else "no"],
            *([["why not", result["reason"]]] if not result["engine_executed"] and "reason" in result else []),
        ]
        if "impossible_output" in result:  # the executor gave what no head can: no detections to compare
            rows.append(["impossible output", result["impossible_output"]])
        else:
            rows += comparison_rows(result)
        rows.append(["verdict", verified_badge(result)])
        parts.append(table(["verify", ""], rows))
    if bench is not None:
        rows = [
            [
                variant(entry),
                entry["batch_size"],
                entry["p50_ms"],
                entry["p90_ms"],
                entry["p99_ms"],
                entry["throughput_ips"],
                details_words(
                    {key: entry[key] for key in ("device", "head_device", "providers", "backend") if key in entry}
                ),
            ]
            for entry in bench["results"]
            if ran_as_asked(entry)
        ]
        parts.append(table(["executor", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "where"], rows))
        if not_run := not_run_here(bench):
            parts.append(f"<p class=note>Not timed as {precision} here: {html.escape('; '.join(not_run))}.</p>")
    return "\n".join(parts)


SUMMARY_HEADER = (
    "precision",
    "verified",
    "passed",
    "executor",
    "match_recall",
    "match_precision",
    "mAP",
    "reference_mAP",
    "map_drop_points",
    "fastest",
    "p50_ms",
    "not_verified",
    "not_timed_here",
)


def summary_rows(verify: Mapping[str, Mapping], bench: Mapping[str, Mapping]) -> list[list]:
    """One row per precision: what its verification ran and found, its fastest executor among those that ran that
    precision, and which executors did not, with why."""
    rows = []
    for precision in dict.fromkeys([*verify, *bench]):
        result = verify.get(precision) or {}
        timing = bench.get(precision) or {"results": []}
        timed = [entry for entry in timing["results"] if ran_as_asked(entry)]
        fastest = min(timed, key=lambda entry: entry["p50_ms"] / entry["batch_size"], default=None)
        rows.append(
            [
                precision,
                verified_level(result) if result else None,
                result.get("passed"),
                result.get("executor"),
                *(
                    result.get(key)
                    for key in ("match_recall", "match_precision", "mAP", "reference_mAP", "map_drop_points")
                ),
                f"{variant(fastest)} bs {fastest['batch_size']}" if fastest else None,
                fastest["p50_ms"] if fastest else None,
                unverified(result) if result else None,
                "; ".join(not_run_here(timing)) or None,
            ]
        )
    return rows


def tsv(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(
        [["" if cell is None else f"{cell:.4g}" if isinstance(cell, float) else cell for cell in row] for row in rows]
    )
    return buffer.getvalue()


def build_report(
    out_html: str | Path,
    *,
    val_json,
    reference_detections,
    reference_metrics=None,
    parity=None,
    verify: Mapping[str, str | Path],
    deployed: Mapping[str, str | Path],
    bench: Mapping[str, str | Path],
    engines: Mapping[str, str | Path] | None = None,
    calibration_ranges=None,
    calibration_accuracy=None,
    sensitivity: Mapping[str, str | Path] | None = None,
    float_layers: Mapping[str, str | Path] | None = None,
    settings: Mapping | None = None,
    figures: Mapping[str, str | Path] | None = None,
    summary_tsv: str | Path | None = None,
) -> str:
    """Write the report; returns its HTML. Optional inputs that do not exist are left out.

    `figures` ({name of FIGURES: PNG path}) and `summary_tsv` also write the plots and the per-precision summary
    as files (the items of `snakemake --report`); a plot with nothing to show is written as a note saying so."""
    settings = settings or {}
    val = read_json(val_json)
    reference = read_json(reference_detections)
    verify_artifacts, bench_artifacts = (read_artifacts(paths) for paths in (verify, bench))
    engine_artifacts = read_engines(engines or {})
    verify_docs, bench_docs = (
        {p: artifact.document for p, artifact in artifacts.items()} for artifacts in (verify_artifacts, bench_artifacts)
    )
    deployed_docs = {p: doc for p, path in deployed.items() if (doc := read_json(path)) is not None}
    parity_artifact, ranges_artifact, accuracy_artifact = (
        read_artifact(path) for path in (parity, calibration_ranges, calibration_accuracy)
    )
    sensitivity_artifacts, float_layer_artifacts = (
        read_artifacts(paths or {}) for paths in (sensitivity, float_layers)
    )
    reference_doc = read_json(reference_metrics)
    subset = (reference_doc or {}).get("subset")
    if subset:  # the images the reference and verify ran on: the examples are drawn from them
        val = val_subset(val, {"num_images": subset["images"], "seed": subset["seed"]}).coco(val)
    precisions = list(dict.fromkeys([*verify_docs, *bench_docs]))

    dscores = {
        p: match_detections(reference, deployed_docs[p], verify_docs[p]["match_iou"]).dscores
        for p in precisions
        if p in deployed_docs and "match_iou" in verify_docs.get(p, {})
    }
    hardware = next(iter(bench_docs.values()))["hardware"] if bench_docs else {}
    plots = {
        "latency": latency_plot(bench_docs),
        "dscore": dscore_histogram(dscores),
        "calibration": calibration_plot(ranges_artifact.document) if ranges_artifact is not None else None,
        "sensitivity": sensitivity_plot(
            {p: a.document for p, a in sensitivity_artifacts.items()},
            {p: a.document for p, a in float_layer_artifacts.items()},
        ),
        "examples": example_images(
            val, reference, deployed_docs, settings.get("example_images", 3), settings.get("min_score", 0.5)
        ),
    }
    for name, path in (figures or {}).items():
        write_bytes(path, plots[name] or placeholder(f"{name}: nothing to plot"))
    if summary_tsv is not None:
        write_text(summary_tsv, tsv(SUMMARY_HEADER, summary_rows(verify_docs, bench_docs)))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>trtflow report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>trtflow report</h1>",
        f"<p class=note>{images_words(len(val['images']), subset, 'val images')}; reference PyTorch mAP "
        f"{_cell(reference_doc['mAP']) if reference_doc else '–'}; hardware: "
        f"{html.escape(str(hardware.get('gpu') or hardware.get('cpu', '?')))}.</p>",
        "<h2>Stages and their checks</h2>",
        table(
            ["stage", "artifact", "check", "result"],
            stage_rows(
                parity_artifact,
                accuracy_artifact,
                ranges_artifact,
                engine_artifacts,
                verify_artifacts,
                bench_artifacts,
                float_layer_artifacts,
            ),
        ),
        "<h2>Per precision</h2>",
        verdict_legend(),
        *(precision_section(p, verify_docs.get(p), bench_docs.get(p)) for p in precisions),
        "<h2>Latency</h2>",
        image(plots["latency"], "latency bars"),
        "<h2>Score differences</h2>",
        image(plots["dscore"], "Δscore histogram"),
    ]
    if ranges_artifact is not None:
        parts += ["<h2>Calibration ranges</h2>", image(plots["calibration"], "calibration ranges")]
    if plots["sensitivity"] is not None:
        parts += ["<h2>Layer sensitivity and float layers</h2>", image(plots["sensitivity"], "layer sensitivity")]
    parts += ["<h2>Examples</h2>", image(plots["examples"], "example images"), "</body></html>"]
    text = "\n".join(parts)
    write_text(out_html, text)
    return text


# --------------------------------------------------------------------------- rendering check


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(
    html_path: str | Path, png_path: str | Path, *, width: int = 1200, height: int = 2400, timeout: float = 120
) -> Path:
    """Render `html_path` in headless Chromium into `png_path`; raises RuntimeError without a browser."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(
            f"no headless browser found (looked for {', '.join(BROWSERS)}); "
            "install one, e.g. apt-get install -y chromium"
        )
    png_path = Path(png_path)
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--screenshot={png_path.resolve()}",
        Path(html_path).resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode or not png_path.is_file():
        raise RuntimeError(f"{browser} could not render {html_path}: {result.stderr[-2000:]}")
    return png_path
