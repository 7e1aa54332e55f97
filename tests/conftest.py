"""Shared test fixtures: real-data location, the dtype-keyed tolerance table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

#: ../shared/data beside the checkout (absent outside the workspace: tests skip).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: Set (to anything but ``""`` or ``"0"``) to make absent real data an error instead of a
#: skip; ``.ci/run`` sets it, so CI cannot pass with the real-data tests skipped.
REQUIRE_DATA_ENV = "GPUFUSION_REQUIRE_REAL_DATA"

#: One tolerance table for every backend comparison: integers within 1 DN, float32 ~1e-5.
TOLERANCE = {
    **{name: {"rtol": 0.0, "atol": 1.0}
       for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")},
    "float16": {"rtol": 1e-3, "atol": 1e-3},
    "float32": {"rtol": 1e-5, "atol": 1e-6},
    "float64": {"rtol": 1e-9, "atol": 1e-12},
}


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype=None) -> None:
    """Compare with the tolerance of ``dtype`` (default: ``expected.dtype``)."""
    tol = TOLERANCE[np.dtype(dtype or expected.dtype).name]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64), **tol)


def missing_real_data(path: Path) -> NoReturn:
    """End the calling test because real data ``path`` is absent.

    Skips it, or fails it when :data:`REQUIRE_DATA_ENV` is set.
    """
    reason = f"real data not present: {path}"
    if os.environ.get(REQUIRE_DATA_ENV, "").strip() not in ("", "0"):
        pytest.fail(f"{reason}, and {REQUIRE_DATA_ENV} is set: the real-data tests must run here",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        missing_real_data(DATA)
    return DATA


def psnr(actual: np.ndarray, truth: np.ndarray) -> float:
    err = actual.astype(np.float64) - truth.astype(np.float64)
    span = float(truth.max()) - float(truth.min())
    return float(10 * np.log10(span**2 / max(float(np.mean(err**2)), 1e-30)))
