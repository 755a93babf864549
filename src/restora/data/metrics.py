"""Task metrics and their 95% confidence intervals.

GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): the reference's
final answer follows `#### `; a generation is correct when its LAST number equals it as a
number (commas stripped: "1,000.0" == 1000). SQL metrics live in sql.py.

Intervals: a Wilson score interval for a proportion (Wilson 1927; it stays inside [0, 1]
and behaves at k = 0 or k = n, unlike the normal approximation) and a normal-approximation
interval for a mean (mean ± z·s/√n, sample standard deviation s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

__all__ = [
    "Estimate", "extract_last_number", "gsm8k_reference", "gsm8k_correct", "text_exact_match",
    "wilson_interval", "mean_interval", "proportion", "summarize",
]

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# A number: optional minus (not when it is a binary minus right after a digit), digits with
# optional thousands commas, optional decimals. "1,000.50" -> "1,000.50"; "3-4" -> "3", "4".
_NUMBER = re.compile(r"(?:(?<![\d)])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _to_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def extract_last_number(text: str) -> Decimal | None:
    """The last number in `text`, commas stripped, or None when there is none."""
    for match in reversed(_NUMBER.findall(text)):
        value = _to_decimal(match.rstrip(","))
        if value is not None:
            return value
    return None


def gsm8k_reference(answer: str) -> Decimal:
    """The number after the last `#### ` of a GSM8K reference answer."""
    head, sep, tail = answer.rpartition("####")
    value = _to_decimal(tail.strip()) if sep else None
    if value is None:
        raise ValueError(f"GSM8K reference has no number after '#### ': {answer[-60:]!r}")
    return value


def gsm8k_correct(prediction: str, reference: str) -> bool:
    """Whether the last number of `prediction` equals the reference's `#### N`."""
    predicted = extract_last_number(prediction)
    return predicted is not None and predicted == gsm8k_reference(reference)


def text_exact_match(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace (generic jsonl tasks)."""
    return prediction.strip() == reference.strip()


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval over n scored rows."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high, "n": self.n}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes/n."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def proportion(outcomes: Iterable[bool | float], z: float = Z95) -> Estimate:
    """Fraction of true outcomes with its Wilson interval."""
    values = [float(o) for o in outcomes]
    if any(v not in (0.0, 1.0) for v in values):
        raise ValueError("proportion: outcomes must be 0/1 or booleans")
    n, k = len(values), int(sum(values))
    low, high = wilson_interval(k, n, z)
    return Estimate(k / n, low, high, n)


def mean_interval(values: Sequence[float], z: float = Z95) -> Estimate:
    """Mean with a normal-approximation interval (mean ± z·s/√n); n = 1 gives a zero-width interval."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return Estimate(mean, mean - half, mean + half, n)


def summarize(scores: Iterable[Mapping[str, float | None]]) -> dict[str, Estimate]:
    """Per-metric proportions over rows of Task.score results, skipping None (unscorable rows)."""
    columns: dict[str, list[float]] = {}
    for row in scores:
        for name, value in row.items():
            column = columns.setdefault(name, [])
            if value is not None:
                column.append(value)
    return {name: proportion(values) for name, values in columns.items() if values}
