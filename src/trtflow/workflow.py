"""Glue for the thin Snakemake scripts: logging to the rule's log file and readable failures."""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
import sys
import traceback
from pathlib import Path


@contextlib.contextmanager
def script_logging(snakemake):
    """Send the script's prints, progress bars and warnings to its rule log; a failure also goes to stderr.

    A failing stage exits non-zero with its one-line message on the console, so the user sees the file
    and the fix without opening the log; the log keeps the message with its traceback.
    """
    log_path = snakemake.log[0] if snakemake.log else None
    with contextlib.ExitStack() as stack:
        if log_path:
            stream = stack.enter_context(open(log_path, "w", buffering=1))
            stack.enter_context(contextlib.redirect_stdout(stream))
            stack.enter_context(contextlib.redirect_stderr(stream))
            logging.basicConfig(
                stream=stream, level=logging.INFO, force=True, format="%(asctime)s %(name)s %(levelname)s %(message)s"
            )
        try:
            yield
        except Exception as error:
            traceback.print_exc()  # the whole story into the log (stderr is the log here)
            print(f"{type(error).__name__}: {error}", file=sys.__stderr__)
            raise


@functools.cache
def imported_modules(source: Path, package: str = "trtflow") -> frozenset[str]:
    """Dotted names of the `package` modules `source` imports, at module top or inside functions alike."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from trtflow.backend import precisions` may name a submodule: both spellings are candidates
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return frozenset(name for name in names if name == package or name.startswith(f"{package}."))


def module_file(name: str, package_dir: Path) -> Path | None:
    """The file of dotted module `name` in the package at `package_dir`; None where no such module exists."""
    parts = name.split(".")[1:]
    folder = package_dir.joinpath(*parts)
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py"
    path = folder.with_suffix(".py") if parts else None
    return path if path is not None and path.is_file() else None


@functools.cache
def code_closure(script: Path, package_dir: Path) -> tuple[Path, ...]:
    """Every module of the package at `package_dir` (src/trtflow) that `script` runs: its imports, theirs, and
    the packages they live in, sorted. A rule lists these as inputs, so editing any of them reruns it."""
    found: set[Path] = set()
    pending = [script]
    while pending:
        for name in imported_modules(pending.pop()):
            parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)]
            for path in filter(None, (module_file(module, package_dir) for module in parents)):
                if path not in found:
                    found.add(path)
                    pending.append(path)
    return tuple(sorted(found))
