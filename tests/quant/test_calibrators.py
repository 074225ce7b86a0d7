import numpy as np
import pytest
import torch

from slimkit.core.affine import fake_quantize
from slimkit.quant.calibrators import CALIBRATORS, make_observer
from slimkit.quant.calibrators.histogram import StreamingHistogram


def _outlier_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, generator=g)
    x[:20] = torch.tensor([40.0, -35.0, 50.0, 38.0] * 5)  # a few huge outliers
    return x


def _error(x, observer):
    s, z = observer.qparams()
    return float(((fake_quantize(x, s, z, observer.qmin, observer.qmax) - x) ** 2).mean())


def _observe(name, x, **kw):
    o = make_observer(name, **kw)
    for chunk in x.split(10_000):  # streamed in batches
        o.update(chunk)
    return o


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_beats_minmax_on_gaussian_with_outliers(name):
    # clipping exists for the bulk of the distribution: the error there must fall well below
    # min-max's, whose grid is stretched by 20 outliers in 200,000 values
    x = _outlier_data()
    bulk = x[20:]
    base = _error(bulk, _observe("minmax", x))
    err = _error(bulk, _observe(name, x))
    # percentile and KL clip the outliers outright; MSE also weighs the outliers' own clipping
    # error, so it stops at a wider range but must still beat min-max
    bound = base if name == "mse" else 0.2 * base
    assert err < bound, f"{name}: {err:.3e} vs min-max {base:.3e}"


def test_mse_also_wins_on_its_own_objective_including_outliers():
    x = _outlier_data()
    assert _error(x, _observe("mse", x)) < _error(x, _observe("minmax", x))


def test_moving_average_damps_one_extreme_batch():
    batches = [torch.randn(1000) for _ in range(20)]
    batches[5] = batches[5] * 50
    mm, ma = make_observer("minmax"), make_observer("moving_average", momentum=0.1)
    for b in batches:
        mm.update(b)
        ma.update(b)
    x = torch.cat([b for i, b in enumerate(batches) if i != 5])
    assert _error(x, ma) < _error(x, mm)


def test_minmax_streaming_equals_global():
    x = torch.randn(1000) * 3
    o = _observe("minmax", x)
    assert o.compute_range() == (float(x.min()), float(x.max()))


def test_histogram_rebinning_preserves_mass_and_quantiles():
    g = torch.Generator().manual_seed(0)
    h = StreamingHistogram(bins=1024)
    parts = [torch.randn(5000, generator=g) * (1 + i) for i in range(5)]  # range grows each batch
    for p in parts:
        h.update(p)
    allx = torch.cat(parts).numpy()
    assert h.counts.sum() == pytest.approx(allx.size)
    for q in (0.01, 0.5, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(allx, q), abs=0.1)


def test_one_sided_activations_keep_zero_exact():
    x = torch.relu(torch.randn(50_000))
    for name in CALIBRATORS:
        s, z = _observe(name, x).qparams()
        assert int(z) == 0, name


def test_infinities_are_ignored_and_nan_rejected():
    o = make_observer("entropy")
    o.update(torch.tensor([float("-inf"), 1.0, 2.0, -1.0]))
    lo, hi = o.compute_range()
    assert np.isfinite(lo) and np.isfinite(hi)
    with pytest.raises(ValueError, match="NaN"):
        o.update(torch.tensor([float("nan")]))


def test_no_data_is_a_clear_error():
    with pytest.raises(ValueError, match="saw no finite values"):
        make_observer("mse").qparams()
    with pytest.raises(ValueError, match="unknown calibrator"):
        make_observer("kl")


def test_entropy_does_not_collapse_on_post_relu_activations():
    # ReLU outputs: a point mass at exactly zero plus a one-sided tail. Zero is exact on any grid,
    # so it must not pull the KL search towards a tiny range that clips the tail.
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(200_000, generator=g) * 2 - 1)
    o = _observe("entropy", x)
    lo, hi = o.compute_range()
    assert hi >= float(torch.quantile(x[x > 0][:100_000], 0.99))
    assert _error(x, o) < 3 * _error(x, _observe("minmax", x))


def test_entropy_of_all_zero_activations_is_a_zero_range():
    o = _observe("entropy", torch.zeros(1000))
    assert o.compute_range() == (0.0, 0.0)
    s, z = o.qparams()
    assert torch.isfinite(s).all() and float(s) > 0
