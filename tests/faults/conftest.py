"""What the fault tests share: running `zenlm ARGS` in this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest


class CliResult(NamedTuple):
    rc: int
    out: str
    err: str


@pytest.fixture
def zenlm_cli(capsys: pytest.CaptureFixture) -> Callable[[list], CliResult]:
    """``zenlm_cli([...])``: run the command in this process -> (exit status, stdout, stderr). argparse's own
    errors exit 2 through SystemExit; any other exception escapes and fails the test with its traceback."""
    from zenlm.cli import main

    def run(args: list) -> CliResult:
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = int(e.code or 0)
        out, err = capsys.readouterr()
        return CliResult(rc, out, err)

    return run
