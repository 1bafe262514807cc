"""Fixtures shared by the unit tests: a data directory and its catalogue in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir


@pytest.fixture()
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data").ensure()


@pytest.fixture()
def catalogue(data: DataDir):
    cat = Catalogue(data.catalogue_path)
    yield cat
    cat.close()
