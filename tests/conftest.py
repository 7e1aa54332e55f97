"""Shared test fixtures: real-data location, the dtype-keyed tolerance table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: ../shared/data beside the checkout (absent outside the workspace: tests skip).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: One tolerance table for every backend comparison: integers within 1 DN, float32 ~1e-5.
TOLERANCE = {
    "uint8": {"rtol": 0.0, "atol": 1.0},
    "uint16": {"rtol": 0.0, "atol": 1.0},
    "int16": {"rtol": 0.0, "atol": 1.0},
    "float32": {"rtol": 1e-5, "atol": 1e-6},
    "float64": {"rtol": 1e-9, "atol": 1e-12},
}


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype=None) -> None:
    """Compare with the tolerance of ``dtype`` (default: ``expected.dtype``)."""
    tol = TOLERANCE[np.dtype(dtype or expected.dtype).name]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64), **tol)


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent")
    return DATA


def psnr(actual: np.ndarray, truth: np.ndarray) -> float:
    err = actual.astype(np.float64) - truth.astype(np.float64)
    span = float(truth.max()) - float(truth.min())
    return float(10 * np.log10(span**2 / max(float(np.mean(err**2)), 1e-30)))
