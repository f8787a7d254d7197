"""Test-wide settings: the backend choice cache lives in a temporary folder (never the
user's ``~/.cache``), and ``--backend auto`` times each candidate briefly (tests check
what it chooses among, not how fast it is)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _backend_cache(tmp_path_factory):
    import os

    from tilefcn.runtime import select

    old = os.environ.get("TILEFCN_CACHE_DIR")
    os.environ["TILEFCN_CACHE_DIR"] = str(tmp_path_factory.mktemp("tilefcn-cache"))
    seconds, select.MEASURE_SECONDS = select.MEASURE_SECONDS, 0.05
    yield
    select.MEASURE_SECONDS = seconds
    if old is None:
        os.environ.pop("TILEFCN_CACHE_DIR", None)
    else:
        os.environ["TILEFCN_CACHE_DIR"] = old
