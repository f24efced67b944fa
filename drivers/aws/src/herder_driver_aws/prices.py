"""The spot price cache (SPEC §16.2): recent spot prices per (instance type, availability zone).

Spot prices change slowly and DescribeSpotPriceHistory is paginated and rate limited, so the
cache asks at most once per ``interval`` for the types herder is running as spot instances,
looking back three intervals, and forgets series nobody asked about for 64 intervals.
Failures are logged only: a missing price history costs nothing but a display.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from herder.cloud import InstancePrice, normalize_price_history

GIB = 1 << 30
#: Hours in the month EBS prices are quoted per (AWS uses 30 days for this).
HOURS_PER_MONTH = 30 * 24

PriceKey = tuple[str, str]  # (provider type, availability zone)


def ebs_hourly_cost(added_scratch: int, price_per_gib_month: float) -> float:
    """What the extra scratch volume of a type costs per hour."""
    if added_scratch <= 0:
        return 0.0
    return price_per_gib_month * math.ceil(added_scratch / GIB) / HOURS_PER_MONTH


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    return None


class SpotPriceCache:
    """Spot price series, refreshed from EC2 through ``fetch`` when older than ``interval``.

    ``fetch(**request)`` is ``ec2.describe_spot_price_history``.  Thread-safe; one refresh at
    a time (a second caller waits for the first rather than asking EC2 again).
    """

    def __init__(
        self,
        fetch: Callable[..., dict[str, Any]],
        interval: float,
        now: Callable[[], float],
        logger: logging.Logger,
    ) -> None:
        self._fetch = fetch
        self.interval = interval
        self._now = now
        self._log = logger
        self._lock = threading.Lock()  # guards the two maps; never held while calling EC2
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._series: dict[PriceKey, list[InstancePrice]] = {}
        self._updated: dict[PriceKey, float] = {}

    @property
    def enabled(self) -> bool:
        """A non-positive interval turns spot price lookups off."""
        return self.interval > 0

    def series(self, key: PriceKey) -> list[InstancePrice]:
        with self._lock:
            return list(self._series.get(key, []))

    def refresh(self, keys: Iterable[PriceKey]) -> None:
        """Fetch prices for ``keys`` if any of them was last updated more than an interval ago."""
        if not self.enabled:
            return
        wanted = set(keys)
        with self._refresh_lock:
            now = self._now()
            with self._lock:
                stale = [k for k in wanted if now - self._updated.get(k, -math.inf) > self.interval]
            if not stale:
                return
            try:
                rows = self._fetch_rows(sorted({t for t, _ in wanted}), now)
            except Exception as exc:
                self._log.warning("cannot update spot prices: %s", exc)
                return
            with self._lock:
                self._merge(rows, wanted, now)

    def _fetch_rows(self, types: list[str], now: float) -> list[tuple[PriceKey, InstancePrice]]:
        """Every history row since three intervals ago, all pages; bogus rows skipped."""
        request: dict[str, Any] = {
            "InstanceTypes": types,
            "ProductDescriptions": ["Linux/UNIX"],
            "StartTime": datetime.fromtimestamp(now - 3 * self.interval).astimezone(),
        }
        rows: list[tuple[PriceKey, InstancePrice]] = []
        while True:
            page = self._fetch(**request)
            for item in page.get("SpotPriceHistory", []):
                row = _row(item)
                if row is not None:
                    rows.append(row)
            token = page.get("NextToken")
            if not token:
                return rows
            request["NextToken"] = token

    def _merge(
        self, rows: list[tuple[PriceKey, InstancePrice]], wanted: set[PriceKey], now: float
    ) -> None:
        """Append ``rows``, mark ``wanted`` fresh, drop long-unwanted series, normalise."""
        for key, price in rows:
            self._series.setdefault(key, []).append(price)
        for key in wanted:
            self._updated[key] = now
        for key, updated in list(self._updated.items()):
            if now - updated > 64 * self.interval:
                del self._updated[key]
                self._series.pop(key, None)
        for key in list(self._series):
            if key not in self._updated:
                del self._series[key]
            else:
                self._series[key] = normalize_price_history(self._series[key])


def _row(item: dict[str, Any]) -> tuple[PriceKey, InstancePrice] | None:
    """One history row, or None when a field is missing or unreadable."""
    provider_type = item.get("InstanceType")
    zone = item.get("AvailabilityZone")
    when = _timestamp(item.get("Timestamp"))
    try:
        price = float(item.get("SpotPrice", ""))
    except ValueError:
        return None
    if not provider_type or not zone or when is None or not math.isfinite(price):
        return None
    return (str(provider_type), str(zone)), InstancePrice(start_time=when, price=price)
