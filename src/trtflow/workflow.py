"""Glue for the thin Snakemake scripts: logging to the rule's log file and readable failures."""
from __future__ import annotations

import contextlib
import logging
import sys
import traceback


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
            logging.basicConfig(stream=stream, level=logging.INFO, force=True,
                                format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            yield
        except Exception as error:
            traceback.print_exc()  # the whole story into the log (stderr is the log here)
            print(f"{type(error).__name__}: {error}", file=sys.__stderr__)
            raise
