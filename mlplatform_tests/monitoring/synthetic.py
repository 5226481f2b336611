"""Synthetic traffic of known shapes, for the drift and profile tests (not a test module)."""

import numpy as np
import pandas as pd

# Twelve shapes (symmetric, skewed, heavy-tailed, bimodal, bounded, discrete), each at two scales.
_SHAPES = {
    "normal": lambda rng, n, s: rng.normal(50, 10 * s, n),
    "lognormal": lambda rng, n, s: rng.lognormal(10, 0.6 * s, n),
    "exponential": lambda rng, n, s: rng.exponential(3 * s, n),
    "gamma": lambda rng, n, s: rng.gamma(2 * s, 2, n),
    "beta": lambda rng, n, s: rng.beta(2 * s, 5, n),
    "student_t": lambda rng, n, s: rng.standard_t(2 + s, n),
    "uniform": lambda rng, n, s: rng.uniform(0, s, n),
    "weibull": lambda rng, n, s: rng.weibull(1.5 * s, n),
    "laplace": lambda rng, n, s: rng.laplace(0, 2 * s, n),
    "mixture": lambda rng, n, s: np.where(
        rng.random(n) < 0.3, rng.normal(0, s, n), rng.normal(5, 2 * s, n)
    ),
    "poisson": lambda rng, n, s: rng.poisson(4 * s, n).astype(float),
    "rounded": lambda rng, n, s: np.round(rng.normal(700, 50 * s, n)),
}
NUMERIC = [f"{shape}_{scale}" for shape in _SHAPES for scale in (1, 2)]
CITIES = [f"city_{i:02d}" for i in range(40)]
_CATEGORIES = {
    "colour": (["red", "green", "blue"], [0.5, 0.3, 0.2]),
    "plan": (["basic", "premium"], [0.8, 0.2]),
    "segment": ([f"segment_{i}" for i in range(8)], [0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03]),
    "city": (CITIES, list(np.arange(40, 0, -1) / np.arange(40, 0, -1).sum())),
}
CATEGORICAL = list(_CATEGORIES)


def traffic(n: int, seed: int, shifted=(), remixed=()) -> pd.DataFrame:
    """Rows from one fixed distribution, with a few missing values as traffic has.

    ``shifted`` numeric columns move by half a standard deviation (KS D 0.2 or more);
    ``remixed`` categorical columns get their category shares reversed.
    """
    rng = np.random.default_rng(seed)
    columns = {}
    for name in NUMERIC:
        shape, scale = name.rsplit("_", 1)
        values = _SHAPES[shape](rng, n, int(scale))
        if name in shifted:
            values = values + 0.5 * values.std()
        columns[name] = values
    columns["flag"] = (rng.random(n) < 0.15).astype(float)
    for name, (values, shares) in _CATEGORIES.items():
        columns[name] = rng.choice(values, n, p=shares[::-1] if name in remixed else shares)
    frame = pd.DataFrame(columns)
    frame.loc[rng.random(n) < 0.05, "lognormal_1"] = np.nan
    frame.loc[rng.random(n) < 0.03, "segment"] = None
    return frame
