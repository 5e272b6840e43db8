"""The `etl-assets` console script: `cli.main`, then Python's own exit without its teardown.

Python exits in this order: other threads are joined (after their pools were told to stop), the
atexit handlers run, last registered first, then stdout and stderr are flushed, and then it
frees every module object by object: for Dagster's module graph a tenth of the default run on
the sample (docs/performance.md, "Dagster and the process"). The handler registered here, before
anything else is imported, is the last one to run: it flushes stdout and stderr as Python would
(a failed flush is a failed command: 120, Python's own code for it) and ends the process there.
Everything an exit must do is done by Python itself, through its public exit path.
"""

from __future__ import annotations

import atexit
import os
import sys

# Nothing else is imported here: every module that registers an exit handler (logging,
# filelock, multiprocessing, Dagster) must do it after `console_main` has registered its own,
# so that theirs run first.


def _flush_and_leave(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # its file descriptor was closed at start: nothing to flush
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a full disk, a closed pipe: the output is not whole
            code = code or 120
    os._exit(code)


def console_main() -> None:
    """The `etl-assets` command: `cli.main`, then `sys.exit` with its code, leaving at the end
    of the exit handlers. If `main` raises instead (argparse's own exit for `--help` or a bad
    argument), Python's exit runs unchanged."""
    codes: list[int] = []
    atexit.register(lambda: codes and _flush_and_leave(codes[0]))
    from etl_assets.tools import cli

    codes.append(cli.main())
    sys.exit(codes[0])
