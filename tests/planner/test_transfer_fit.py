"""Fitting a link's fixed and per-byte transfer cost from measured hops."""
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
    assert fit.max_residual_s == pytest.approx(0.0, abs=1e-12)
    assert fit.transfer(1_000_000) == pytest.approx(FIXED + 1e6 * PER_BYTE, rel=1e-9)


def test_noise_either_side_of_the_line_cancels_in_the_least_squares_fit():
    sizes = [1000, 2000, 3000, 4000]
    noise = [+1e-6, -1e-6, -1e-6, +1e-6]    # symmetric: the least-squares line is the true one
    fit = fit_transfer([(b, FIXED + b * PER_BYTE + e) for b, e in zip(sizes, noise)])
    assert fit.fixed_s == pytest.approx(FIXED + 0.0, rel=1e-6)
    assert fit.max_residual_s == pytest.approx(1e-6, rel=1e-3)


def test_a_negative_intercept_is_refitted_through_the_origin_and_fits_a_profile():
    fit = fit_transfer([(1000, 0.5e-3), (2000, 2.0e-3), (3000, 3.0e-3)])    # least squares: fixed < 0
    assert fit.fixed_s == 0.0
    assert fit.s_per_byte == pytest.approx((1000 * 0.5e-3 + 2000 * 2e-3 + 3000 * 3e-3) / (1e6 + 4e6 + 9e6))
    DeviceProfile("link", [1], [[0.0]], [], [0.0], fit.fixed_s, fit.s_per_byte)     # accepted as it is


def test_a_falling_line_becomes_the_constant_of_its_mean():
    fit = fit_transfer([(1000, 3e-3), (2000, 1e-3)])
    assert (fit.fixed_s, fit.s_per_byte) == (pytest.approx(2e-3), 0.0)


@pytest.mark.parametrize("points,needle", [
    ([(1000, 1e-3)], "two or more sizes"),
    ([(1000, 1e-3), (1000, 2e-3)], "two or more sizes"),
    ([(1000, -1e-3), (2000, 1e-3)], "(bytes, seconds)"),
    ([(1000, float("nan")), (2000, 1e-3)], "(bytes, seconds)"),
    ([(1000,), (2000, 1e-3)], "(bytes, seconds)"),
])
def test_points_that_cannot_make_a_fit_are_refused_by_name(points, needle):
    with pytest.raises(ProfileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        fit_transfer(points)
