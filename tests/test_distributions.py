"""Distribution specs: table-driven, string in, object out."""

from __future__ import annotations

import random

import pytest
from hydra.utils import instantiate
from ray.tune.search.sample import Categorical, Float, Integer

from rl_pbt.distributions import (
    Choice,
    Grid,
    LogRandInt,
    LogUniform,
    RandInt,
    Uniform,
    as_distribution,
)
from rl_pbt.errors import ConfigError

D = "rl_pbt.distributions."

CASES = [
    # spec, class, (low, high), integer, log, Tune domain type
    ({"_target_": D + "Uniform", "low": 0.9, "high": 1.0}, Uniform, (0.9, 1.0), False, False,
     Float),
    ({"_target_": D + "LogUniform", "low": 1e-5, "high": 1e-2}, LogUniform, (1e-5, 1e-2), False,
     True, Float),
    ({"_target_": D + "RandInt", "low": 1, "high": 30}, RandInt, (1, 30), True, False, Integer),
    ({"_target_": D + "LogRandInt", "low": 64, "high": 4096}, LogRandInt, (64, 4096), True, True,
     Integer),
    ({"_target_": D + "Choice", "values": [10, 20, 30]}, Choice, (10, 30), True, False,
     Categorical),
]


@pytest.mark.parametrize(("spec", "cls", "bounds", "integer", "log", "domain"), CASES)
def test_spec_instantiates_samples_and_converts(spec, cls, bounds, integer, log, domain):
    dist = instantiate(spec, _convert_="all")
    assert type(dist) is cls
    assert (dist.low, dist.high) == bounds
    assert dist.integer is integer and dist.log is log
    rng_state = random.getstate()
    random.seed(0)
    draws = [dist() for _ in range(500)]
    random.setstate(rng_state)
    assert all(bounds[0] <= d <= bounds[1] for d in draws)
    assert all(isinstance(d, int) for d in draws) is integer
    assert len(set(draws)) > 1
    tune_domain = dist.to_tune()
    assert isinstance(tune_domain, domain)
    samples = [tune_domain.sample() for _ in range(200)]
    assert all(bounds[0] <= s <= bounds[1] for s in samples)


def test_log_uniform_is_uniform_in_log_space():
    random.seed(1)
    dist = LogUniform(1e-5, 1e-1)
    draws = [dist() for _ in range(4000)]
    below = sum(d < 1e-3 for d in draws) / len(draws)
    assert 0.45 < below < 0.55  # half the decades below 1e-3


def test_randint_includes_both_ends_like_the_guide():
    random.seed(2)
    dist = RandInt(1, 3)
    assert {dist() for _ in range(300)} == {1, 2, 3}
    assert {dist.to_tune().sample() for _ in range(300)} == {1, 2, 3}


@pytest.mark.parametrize(
    ("dist", "value", "expected"),
    [
        (Uniform(0.9, 1.0), 1.2, 1.0),
        (Uniform(0.9, 1.0), 0.5, 0.9),
        (Uniform(0.9, 1.0), 0.95, 0.95),
        (RandInt(1, 30), 36.0, 30),
        (RandInt(1, 30), 0.8, 1),
        (RandInt(1, 30), 7.4, 7),
        (LogUniform(1e-5, 1e-3), 2e-3, 1e-3),
        (Grid([1e-3, 5e-4, 1e-4]), 4.2e-4, 5e-4),
        (Choice(["a", "b"]), "b", "b"),
    ],
)
def test_clamp_keeps_values_in_bounds(dist, value, expected):
    clamped = dist.clamp(value)
    assert clamped == pytest.approx(expected)
    assert isinstance(clamped, int) is dist.integer


def test_plain_list_keeps_pbt_list_meaning():
    dist = as_distribution([1e-3, 5e-4, 1e-4])
    assert isinstance(dist, Grid)
    assert dist.for_pbt() == [1e-3, 5e-4, 1e-4]  # PBT shifts to a neighbour in a list
    assert isinstance(Choice([1, 2]).for_pbt(), Choice)  # a Choice is resampled instead


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"_target_": D + "Uniform", "low": 2.0, "high": 1.0}, "low=2.0 is greater than high=1.0"),
        ({"_target_": D + "LogUniform", "low": 0.0, "high": 1.0}, "log scale needs low > 0"),
        ({"_target_": D + "LogRandInt", "low": -1, "high": 8}, "log scale needs low > 0"),
        ({"_target_": D + "RandInt", "low": 1.5, "high": 8}, "low must be an integer"),
        ({"_target_": D + "Choice", "values": []}, "values is empty"),
    ],
)
def test_bad_specs_raise_config_error(spec, message):
    with pytest.raises(Exception) as caught:
        instantiate(spec, _convert_="all")
    err = caught.value.__cause__ or caught.value
    assert isinstance(err, ConfigError)
    assert message in str(err)


def test_as_distribution_rejects_other_values():
    with pytest.raises(ConfigError, match="expected a distribution spec"):
        as_distribution(0.3)
