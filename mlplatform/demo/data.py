"""The embedded demo dataset: seeded, realistic consumer-loan applications with a default label.

A dozen numeric, categorical and boolean features, missing values, an application timestamp, an
identifier column (which the platform should drop), class imbalance (about 15% defaults) and a
learnable but noisy signal. ``drift`` (0 = none, 1 = strong) shifts the feature distributions
and the relationship between features and default, as the economy turning would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

TARGET = "defaulted"
TIME_COLUMN = "application_date"
PURPOSES = ("debt_consolidation", "credit_card", "home_improvement", "car", "medical", "other")
HOME_OWNERSHIP = ("RENT", "MORTGAGE", "OWN")
REGIONS = ("north", "south", "east", "west", "central")


def generate_loans(
    n_rows: int = 5000,
    seed: int = 7,
    drift: float = 0.0,
    start: str = "2025-01-01",
    days: int = 365,
) -> pd.DataFrame:
    """Generate loan applications and whether each defaulted.

    Args:
        n_rows: number of applications.
        seed: random seed; the same arguments always give the same frame.
        drift: 0 to 1, how far the population and the default mechanism have moved.
        start: first application date.
        days: applications are spread uniformly over this many days after ``start``.

    Returns:
        One row per application, the label in column ``defaulted`` (0/1).

    """
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be within [0, 1], got {drift}")
    rng = np.random.default_rng(seed)
    n = n_rows

    age = np.clip(rng.normal(41 - 6 * drift, 11, n), 18, 85).round()
    income = np.round(rng.lognormal(np.log(58_000) - 0.35 * drift, 0.55, n), -2)
    employment_years = np.clip(rng.gamma(2.0, 3.5 - 1.5 * drift, n), 0, 45).round(1)
    credit_score = np.clip(rng.normal(690 - 45 * drift, 55, n), 300, 850).round()
    loan_amount = np.round(rng.lognormal(np.log(14_000) + 0.3 * drift, 0.6, n), -2)
    term_months = rng.choice([36, 60], n, p=[0.7 - 0.3 * drift, 0.3 + 0.3 * drift])
    debt_to_income = np.clip(rng.beta(2.2, 6 - 2 * drift, n) * 60, 0, 60).round(2)
    open_accounts = rng.poisson(7 + 3 * drift, n)
    delinquencies_2y = rng.poisson(0.3 + 0.5 * drift, n)
    purpose = rng.choice(PURPOSES, n, p=[0.38, 0.22, 0.12, 0.1, 0.08, 0.1])
    home_ownership = rng.choice(
        HOME_OWNERSHIP, n, p=[0.4 + 0.2 * drift, 0.45 - 0.15 * drift, 0.15 - 0.05 * drift]
    )
    region = rng.choice(REGIONS, n)
    has_cosigner = rng.random(n) < 0.12
    interest_rate = np.clip(
        24 - (credit_score - 600) * 0.045 + 1.5 * (term_months == 60) + rng.normal(0, 1.5, n), 4, 30
    ).round(2)

    # The default mechanism. With drift, debt burden matters more and credit score less.
    logit = (
        -2.3
        - (0.009 - 0.004 * drift) * (credit_score - 690)
        + (0.035 + 0.05 * drift) * (debt_to_income - 20)
        + 0.5 * np.log(loan_amount / income * 4 + 1e-9)
        + 0.08 * (interest_rate - 14)
        + 0.35 * delinquencies_2y
        - 0.04 * employment_years
        - 0.6 * has_cosigner
        + 0.45 * (purpose == "medical")
        + 0.25 * (home_ownership == "RENT")
        + 0.25 * (term_months == 60)
        + 0.9 * drift * (region == "south")
    )
    defaulted = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)

    offsets = np.sort(rng.uniform(0, days * 86_400, n))
    application_date = pd.Timestamp(start) + pd.to_timedelta(offsets, unit="s")

    frame = pd.DataFrame(
        {
            "application_id": np.arange(100_000, 100_000 + n),
            TIME_COLUMN: application_date.floor("s").strftime("%Y-%m-%dT%H:%M:%S"),
            "age": age,
            "income": income,
            "employment_years": employment_years,
            "credit_score": credit_score,
            "loan_amount": loan_amount,
            "term_months": term_months,
            "interest_rate": interest_rate,
            "debt_to_income": debt_to_income,
            "open_accounts": open_accounts,
            "delinquencies_2y": delinquencies_2y,
            "purpose": purpose,
            "home_ownership": home_ownership,
            "region": region,
            "has_cosigner": has_cosigner,
            TARGET: defaulted,
        }
    )
    # Real data has holes: income and employment are often not reported, scores sometimes absent.
    for column, share in (("income", 0.06), ("employment_years", 0.09), ("credit_score", 0.03)):
        frame.loc[rng.random(n) < share, column] = np.nan
    frame.loc[rng.random(n) < 0.02, "purpose"] = None
    return frame


@dataclasses.dataclass(frozen=True)
class Extract:
    """One export of the loan book, as the upstream job writes it for a retrain.

    Attributes:
        n_rows: applications in the export.
        seed: its random seed.
        drift: how far its population has moved (see :func:`generate_loans`).
        start: its first application date (it spans a year).
        mislabelled_region: a region whose every loan the export marks as defaulted, as an
            upstream bug would (the region's repayments missing from the join); ``None`` for a
            sound export.

    """

    n_rows: int
    seed: int
    drift: float
    start: str
    mislabelled_region: str | None = None


ROLLOUT_LIVE_DRIFT = 0.6
"""How far today's applicants (the rollout demo's live traffic) are from last year's."""

ROLLOUT_EXTRACTS = (
    Extract(3000, seed=21, drift=0.0, start="2024-07-01"),
    Extract(6000, seed=22, drift=ROLLOUT_LIVE_DRIFT, start="2025-07-01"),
    Extract(6000, seed=23, drift=ROLLOUT_LIVE_DRIFT, start="2025-07-01", mislabelled_region="east"),
)
"""The rollout demo's three exports, one per retrain.

v1 learns from last year's applicants; v2 from this year's, who are today's too: it is better
live. v3 learns from an export whose join lost the east region's repayments, so every east loan
reads as defaulted. Its test split carries the same bug, so the offline gate passes it (it ranks
the east loans first, as the bad labels say); live traffic and its labels are sound, and there
it scores the east region far too high and ranks worse than v2.
"""


def generate_extract(extract: Extract) -> pd.DataFrame:
    """The applications of one export, with the export's labelling bug if it has one."""
    frame = generate_loans(
        extract.n_rows, seed=extract.seed, drift=extract.drift, start=extract.start
    )
    if extract.mislabelled_region is not None:
        frame.loc[frame["region"] == extract.mislabelled_region, TARGET] = 1
    return frame


def write_extract(path: Path, extract: Extract) -> Path:
    """Replace the file at ``path`` with one export (atomically), as the upstream job does.

    Returns:
        ``path``.

    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    generate_extract(extract).to_csv(temporary, index=False)
    temporary.replace(path)
    return path


def write_demo_source(directory: Path, n_rows: int = 5000, drift: float = 0.0) -> Path:
    """Write the demo dataset as CSV under ``directory`` unless it is already there.

    Returns:
        The CSV's path.

    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "loans.csv"
    if not path.exists():
        temporary = path.with_suffix(".csv.tmp")
        generate_loans(n_rows=n_rows, drift=drift).to_csv(temporary, index=False)
        temporary.replace(path)
    return path
