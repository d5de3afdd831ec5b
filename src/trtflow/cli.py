"""The `trtflow` command: argument parsing only; the work is in run-side modules (`trtflow.run.detect`).

Only the standard library is imported here, so `--help`, `--version` and a wrong argument answer at once; torch,
OpenCV and the executors load once the arguments are checked."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """Refuses a wrong argument in one line (argparse prints the usage first), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return number


def fraction(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is None or not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score between 0 and 1")
    return number


def parser() -> argparse.ArgumentParser:
    main_parser = OneLineParser(prog="trtflow", description="Use the plans the trtflow pipeline builds.")
    main_parser.add_argument("--version", action="version", version=f"%(prog)s {version('trtflow')}")
    commands = main_parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser(
        "detect",
        help="run a plan on images",
        description="Run a plan on images with the preprocessing, postprocessing and class names of its JSON "
        "(results/engine_<precision>.json beside it); write COCO-style detections. A file that is not a usable "
        "image is named and left out; the exit status is then 1, the others' detections written.",
    )
    detect.add_argument(
        "--engine",
        required=True,
        type=Path,
        metavar="PLAN",
        help="a plan built by the pipeline, e.g. results/engine_int8.plan",
    )
    detect.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES",
        help="image files, folders (their images, recursively), glob patterns or COCO JSONs",
    )
    detect.add_argument(
        "--out", type=Path, metavar="JSON", help="write the detections with what ran here (default: print them)"
    )
    detect.add_argument(
        "--coco-results",
        type=Path,
        metavar="JSON",
        help="also write the detections alone, the list pycocotools' COCO.loadRes takes",
    )
    detect.add_argument(
        "--draw", type=Path, metavar="DIR", help="also write each image with its boxes to DIR/<stem>.png"
    )
    detect.add_argument(
        "--score-thresh",
        type=fraction,
        default=0.0,
        metavar="SCORE",
        help="leave out detections scoring below SCORE, in the output and the drawings (default: keep all the "
        "plan's postprocessing keeps)",
    )
    detect.add_argument(
        "--fallback",
        action="store_true",
        help="where the plan cannot run on this machine, run the best executor that can (the output names it): "
        "the network definition recorded beside the plan, else the ONNX and head weights it was built from",
    )
    detect.add_argument("--batch-size", type=positive_int, default=8, help="images per executor call (default 8)")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # the command's whole body, imported once the arguments are checked: it loads torch, OpenCV and the executors
    from trtflow.config import plan_config_differences
    from trtflow.formats.plan_metadata import metadata_path
    from trtflow.run.detect import detect_files
    from trtflow.run.runtime import EngineRefused

    recorded = metadata_path(args.engine)
    differences = plan_config_differences(args.engine, json.loads(recorded.read_text())) if recorded.is_file() else []
    if differences:
        print(
            f"trtflow detect: warning: {args.engine} was built for another configuration than the config.yaml of its "
            f"run ({'; '.join(differences)}): detect uses what the plan records; rebuild it to use the current one "
            f"(snakemake {args.engine})",
            file=sys.stderr,
        )
    try:
        result = detect_files(
            args.engine,
            args.images,
            out_json=args.out,
            coco_results=args.coco_results,
            draw_dir=args.draw,
            fallback=args.fallback,
            batch_size=args.batch_size,
            score_thresh=args.score_thresh,
        )
    except (ValueError, OSError, EngineRefused) as error:  # missing or mismatched files, no GPU, impossible output
        print(f"trtflow detect: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    for entry in result["skipped"]:
        print(f"trtflow detect: skipped {entry['reason']}", file=sys.stderr)
    ran = "the engine" if result["engine_executed"] else f"{result['executor']} (the engine did not run here)"
    print(
        f"{len(result['detections'])} detections on {len(result['images'])} images by {ran} in "
        f"{result['seconds']['detect']:.1f} s ({1000 * result['seconds']['per_image']:.0f} ms per image)"
        + (f", {len(result['skipped'])} inputs skipped" if result["skipped"] else "")
        + (f"; written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    if args.out is None:
        print(json.dumps(result, indent=1))
    return 1 if result["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
