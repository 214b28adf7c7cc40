import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "cosmos_real"


@pytest.fixture(scope="session")
def real_data_dir():
    """The read-only real COSMOS files; tests using them skip where they are absent."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(f"real COSMOS data not found at {REAL_DATA_DIR} (only on the project's machines)")
    return REAL_DATA_DIR


os.environ.setdefault("MPLBACKEND", "Agg")
