"""Country and coordinates for a client address, from a MaxMind DB file (maxminddb).

Optional: without a database every lookup is unknown, and country rules treat unknown
as untrusted (``country_in`` fails, ``country_not_in`` matches). Lookups are memory-mapped
reads; results are cached (bounded) per address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from pathlib import Path
from typing import Any

import maxminddb

from authz.core.signals import Geo

_UNKNOWN = Geo(None)
_CACHE_SIZE = 16_384


class GeoIP:
    def __init__(self, database: Path | str) -> None:
        self._reader = maxminddb.open_database(str(database), maxminddb.MODE_MMAP)
        self._cache: OrderedDict[str, Geo] = OrderedDict()

    def lookup(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> Geo:
        if ip is None:
            return _UNKNOWN
        key = str(ip)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            record = self._reader.get(key)
        except (ValueError, maxminddb.InvalidDatabaseError):
            record = None
        geo = _parse(record)
        self._cache[key] = geo
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return geo

    def close(self) -> None:
        self._reader.close()


def _parse(record: Any) -> Geo:
    if not isinstance(record, dict):
        return _UNKNOWN
    country = record.get("country")
    code = country.get("iso_code") if isinstance(country, dict) else None
    location = record.get("location")
    lat = lon = None
    if isinstance(location, dict):
        la, lo = location.get("latitude"), location.get("longitude")
        if isinstance(la, int | float) and isinstance(lo, int | float):
            lat, lon = float(la), float(lo)
    return Geo(code if isinstance(code, str) and len(code) == 2 else None, lat, lon)
