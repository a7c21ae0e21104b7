"""Fitting a link's fixed and per-byte transfer cost from measured hops."""
import numpy as np
import pytest

from e3.planner.errors import ProfileError
from e3.planner.profiles import DeviceProfile
from e3.planner.transfer_fit import fit_transfer

FIXED, PER_BYTE = 150e-6, 2.5e-10      # 150 us a hop, 4 GB/s


def test_points_on_a_line_give_back_its_fixed_and_per_byte_cost_exactly():
    sizes = [49_408, 197_632, 790_528, 3_162_112, 98_560, 6_307_840]
    fit = fit_transfer([(b, FIXED + b * PER_BYTE) for b in sizes])
    assert fit.fixed_s == pytest.approx(FIXED, rel=1e-9)
    assert fit.s_per_byte == pytest.approx(PER_BYTE, rel=1e-9)
    assert fit.max_relative_error == pytest.approx(0.0, abs=1e-9)
    assert fit.transfer(1_000_000) == pytest.approx(FIXED + 1e6 * PER_BYTE, rel=1e-9)


def test_the_fit_weighs_each_point_by_its_own_time_so_small_hops_count_as_much_as_large_ones():
    # hops that grow faster than a line (as measured over the loopback link): an absolute fit lets the
    # largest size set the line and prices a one-row hop at a few microseconds
    x = np.array([49_408, 197_632, 790_528, 3_162_112])
    y = np.array([174e-6, 287e-6, 771e-6, 3903e-6])
    fit = fit_transfer(list(zip(x.tolist(), y.tolist())))
    slope, fixed = np.polyfit(x, y, 1)

    def rel(a, b):
        return (y - (a + b * x)) / y
    assert (rel(fit.fixed_s, fit.s_per_byte) ** 2).sum() < (rel(fixed, slope) ** 2).sum()    # what it minimises
    assert fit.max_relative_error == pytest.approx(np.abs(rel(fit.fixed_s, fit.s_per_byte)).max())
    assert fit.max_relative_error < np.abs(rel(fixed, slope)).max()
    assert 50e-6 < fit.fixed_s < 174e-6 and fixed < 10e-6


def test_a_negative_intercept_is_refitted_through_the_origin_and_fits_a_profile():
    points = [(1000, 0.5e-3), (2000, 2.0e-3), (3000, 3.0e-3)]      # the line through them: fixed < 0
    fit = fit_transfer(points)
    assert fit.fixed_s == 0.0
    r = [b / s for b, s in points]      # minimises sum (1 - k * r)^2: k = sum r / sum r^2
    assert fit.s_per_byte == pytest.approx(sum(r) / sum(v * v for v in r))
    DeviceProfile("link", [1], [[0.0]], [], [0.0], fit.fixed_s, fit.s_per_byte)     # accepted as it is


def test_a_falling_line_becomes_the_best_constant():
    fit = fit_transfer([(1000, 3e-3), (2000, 1e-3)])
    # minimises (1 - c/3ms)^2 + (1 - c/1ms)^2: c = (1/3 + 1) / (1/9 + 1) ms
    assert (fit.fixed_s, fit.s_per_byte) == (pytest.approx((1 / 3 + 1) / (1 / 9 + 1) * 1e-3), 0.0)


@pytest.mark.parametrize("points,needle", [
    ([(1000, 1e-3)], "two or more sizes"),
    ([(1000, 1e-3), (1000, 2e-3)], "two or more sizes"),
    ([(1000, -1e-3), (2000, 1e-3)], "(bytes >= 0, seconds > 0)"),
    ([(1000, 0.0), (2000, 1e-3)], "(bytes >= 0, seconds > 0)"),
    ([(1000, float("nan")), (2000, 1e-3)], "(bytes >= 0, seconds > 0)"),
    ([(1000,), (2000, 1e-3)], "(bytes >= 0, seconds > 0)"),
])
def test_points_that_cannot_make_a_fit_are_refused_by_name(points, needle):
    with pytest.raises(ProfileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        fit_transfer(points)
