"""Each precision's verdict in words, where people look: the end of a `snakemake` run's console (the Snakefile's
`onsuccess` / `onerror` handlers print `verdict_lines`), the report's badges and the `snakemake --report` labels.

Reads the verify JSONs only (results/verify/<precision>.json, results/<model>/verify/... under `models:`): the
Snakefile imports this module at start, before any job, so it imports neither torch nor the executors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from trtflow.run.levels import LEVELS, UNVERIFIED


def level_words(level: str) -> str:
    """A verify JSON's `verified_level` (one of trtflow.run.levels.LEVELS), in words."""
    return level.replace("-", " ")


def verified_level(result: Mapping) -> str:
    """What a verification ran: its `verified_level`, or for JSONs without one, whether the engine executed."""
    return result.get("verified_level") or (LEVELS[-1] if result.get("engine_executed") else LEVELS[0])


def verdict_words(result: Mapping) -> str:
    """ "passed at network definition", "failed at engine", ...: pass or fail, and the level it was decided at."""
    return f"{'passed' if result['passed'] else 'failed'} at {level_words(verified_level(result))}"


def key_numbers(result: Mapping) -> str:
    """The numbers a verdict rests on: detections matched to the PyTorch reference, score difference, mAP drop."""
    if "impossible_output" in result:
        return f"impossible output: {result['impossible_output']}"
    return (
        f"match recall {result['match_recall']:.4f}, precision {result['match_precision']:.4f}, "
        f"max |Δscore| {result['max_abs_dscore']:.3g}, mAP drop {result['map_drop_points']:.2f} points"
    )


def verify_results(results: str | Path) -> dict[str, dict]:
    """{name: verify JSON} of every verify result under `results`: name is the precision, "<model> <precision>"
    under `models:`."""
    results = Path(results)
    found = {}
    for path in sorted(results.glob("**/verify/*.json")):
        if path.stem.endswith("_detections"):
            continue
        model = path.parent.parent.relative_to(results)
        found[path.stem if model == Path() else f"{model} {path.stem}"] = json.loads(path.read_text())
    return found


def verdict_lines(results: str | Path) -> list[str]:
    """One screen: per precision its verdict, level and key numbers (failures named), then what each level below
    `engine` left unverified. Empty where no verify JSON exists."""
    verdicts = verify_results(results)
    if not verdicts:
        return []
    width = max(map(len, verdicts))
    ladder = " < ".join(map(level_words, LEVELS))
    lines = [f"trtflow verification ({results}/**/verify/*.json; levels, weakest first: {ladder})"]
    for name, result in verdicts.items():
        failures = f"; FAILED: {'; '.join(result['failures'])}" if result.get("failures") else ""
        lines.append(f"  {name:<{width}}  {verdict_words(result):<31} {key_numbers(result)}{failures}")
    for level in dict.fromkeys(verified_level(result) for result in verdicts.values()):
        if UNVERIFIED[level]:
            lines.append(f"  at {level_words(level)}: {UNVERIFIED[level]}")
    return lines


def print_verdicts(results: str | Path) -> None:
    """The end-of-run summary (Snakefile `onsuccess` / `onerror`): nothing where nothing was verified."""
    for line in verdict_lines(results):
        print(line, flush=True)
