"""bench/scaling.py's exponents: the slope of a power law on log-log axes, over all points of an
axis and over its last two (where a fixed cost no longer hides the growth)."""
from __future__ import annotations

import pytest

from tests.helpers import load_bench


def test_exponents_recover_power_laws_and_the_large_end_slope():
    bench = load_bench("scaling")
    rows = []
    for axis, values in bench.AXES.items():
        for x in values:
            # quadratic time plus a fixed cost that dominates small x; linear memory
            rows.append({"axis": axis, "value": x, "step_s": 5.0 + 1e-3 * x ** 2, "peak_mib": 0.5 * x})
    fits = bench.exponents(rows)
    assert set(fits) == set(bench.AXES)
    for axis, f in fits.items():
        assert f["peak_mib all"] == pytest.approx(1.0) and f["peak_mib top"] == pytest.approx(1.0)
        assert f["step_s all"] < f["step_s top"] < 2.0  # the fixed cost flattens the fit over all points
    assert bench.log_log_exponent([2, 4, 8], [3 * 2 ** 2.5, 3 * 4 ** 2.5, 3 * 8 ** 2.5]) == pytest.approx(2.5)
