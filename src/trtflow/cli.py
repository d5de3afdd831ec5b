"""The `trtflow` command: argument parsing only; the work is in run-side modules (`trtflow.run.detect`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trtflow.run.detect import detect_files
from trtflow.run.runtime import EngineRefused


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="trtflow", description="Use the plans the trtflow pipeline builds.")
    commands = main_parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser(
        "detect",
        help="run a plan on image files",
        description="Run a plan on image files with the preprocessing, postprocessing and class names of its JSON "
        "(results/engine_<precision>.json beside it); write COCO-style detections.",
    )
    detect.add_argument(
        "--engine",
        required=True,
        type=Path,
        metavar="PLAN",
        help="a plan built by the pipeline, e.g. results/engine_int8.plan",
    )
    detect.add_argument("images", nargs="+", type=Path, metavar="IMAGES", help="image files")
    detect.add_argument("--out", type=Path, metavar="JSON", help="write the detections here (default: print them)")
    detect.add_argument(
        "--draw", type=Path, metavar="DIR", help="also write each image with its boxes to DIR/<stem>.png"
    )
    detect.add_argument(
        "--fallback",
        action="store_true",
        help="where the plan cannot run on this machine, run the best executor that can (the "
        "output names it) from the ONNX and head weights the plan was built from",
    )
    detect.add_argument("--batch-size", type=int, default=8, help="images per executor call (default 8)")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = detect_files(
            args.engine,
            args.images,
            out_json=args.out,
            draw_dir=args.draw,
            fallback=args.fallback,
            batch_size=args.batch_size,
        )
    except (ValueError, OSError, EngineRefused) as error:  # bad images, missing or mismatched files, no GPU
        print(f"trtflow detect: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    ran = "the engine" if result["engine_executed"] else f"{result['executor']} (the engine did not run here)"
    print(
        f"{len(result['detections'])} detections on {len(result['images'])} images by {ran}"
        + (f"; written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    if args.out is None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
