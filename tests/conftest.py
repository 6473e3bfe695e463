from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests that start their own Ray cluster (marked `own_ray_cluster`) first.

    `mediagate down` ends with `ray stop`, which stops every Ray process on the
    machine, so those tests must finish before the shared session cluster starts.
    """
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_ray_cluster") else 1)
