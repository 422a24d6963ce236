"""What a run reports while it trains: ``metrics.jsonl`` lines and the progress bar.

``metrics.jsonl`` holds one strict-JSON line per logged step (every ELBO term, the schedule, and
``"skipped": true`` for a non-finite step, whose NaN/Inf values are written as null). The bar, on
stderr, shows the objective and every ELBO term in at most 8 characters each.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from tqdm import tqdm

__all__ = ["progress_bar", "bar_postfix", "json_record", "truncate_metrics"]


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr that draws its final state once (see :class:`_Bar`)."""
    return _Bar(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                bar_format="{desc} {percentage:3.0f}%|{bar:10}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


class _Bar(tqdm):
    """tqdm draws the final state on the last ``update`` and again in ``close``: two identical lines
    where stderr is a log or a pipe. Here the last update only counts; ``close`` draws it."""

    def update(self, n=1):
        if self.total is not None and self.n + n >= self.total:
            self.n += n
            return None
        return super().update(n)


def _short(value: float) -> str:
    """A loss value in at most 8 characters for the progress bar: 2333, 9.5, 0.1, 4.12e+32, nan."""
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2g}"


#: The bar shows the objective and every ELBO term (nelbo is their sum, in metrics.jsonl).
_BAR_TERMS = ("loss", "recon", "kl_z0", "kl_path", "kl_spike", "kl_slab", "hj", "div")


def bar_postfix(scalars: dict, skipped_total: int) -> str:
    """The bar's postfix at one step: ``loss=2333 recon=9.5 ... div=0.1`` (`` skipped=N`` once a step was skipped)."""
    return (" ".join(f"{k}={_short(scalars[k])}" for k in _BAR_TERMS)
            + (f" skipped={skipped_total}" if skipped_total else ""))


def json_record(record: dict) -> str:
    """One strict-JSON metrics line: NaN/Inf floats become null (``NaN`` is not JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


def truncate_metrics(path: str, step: int) -> Optional[float]:
    """Drop logged lines after ``step`` (a resumed run logs them again), and a line cut short by a
    kill mid-write (it would not parse). Returns the ``time`` of the last line kept (None if none)."""
    if not os.path.exists(path):
        return None

    def keep(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    with open(path) as f:
        lines = [line for line in f if keep(line)]
    with open(path, "w") as f:
        f.writelines(lines)
    return json.loads(lines[-1]).get("time") if lines else None
