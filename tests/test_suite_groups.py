"""The suite's own scheduling: ``make test`` runs ``pytest -n 2 --dist loadgroup``, and the modules marked
``xdist_group`` (the compiled programs, the int8 run, the distributed jobs) rely on running on one worker: their
session fixtures are built once, and their processes do not compete with each other.

pytest-xdist 3.8 gives a grouped test its group by appending ``@group`` to the test's node id; pytest 9.2 keeps
node ids where that no longer reaches the scheduler, so every group was split across the workers without a word
(the int8 test run was trained twice, the batched programs built twice). pyproject.toml keeps pytest below 9.2
for that reason; this test fails if the groups stop working again."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.xdist_group("suite-check")


def test_xdist_group_marks_reach_the_scheduler(request: pytest.FixtureRequest) -> None:
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only meaningful under `pytest -n N --dist loadgroup` (make test)")
    assert request.node.nodeid.endswith("@suite-check"), request.node.nodeid
