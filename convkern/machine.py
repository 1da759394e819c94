"""What this machine is, as the tuner and the reports need it: the CPU's
identity (brand, family, model, stepping), its cache sizes (read from sysfs,
with None where the kernel does not say) and its cores."""

from __future__ import annotations

import functools
import os
import platform
from typing import Dict, Optional


def _cpuinfo() -> Dict[str, str]:
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _size(text: str) -> Optional[int]:
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        return None


def _caches() -> Dict[str, Optional[int]]:
    """Bytes of L1d, L2 and L3 as one core sees them (sysfs cpu0), None if unknown."""
    found: Dict[str, Optional[int]] = {"L1d": None, "L2": None, "L3": None}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return found
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            def read(name, entry=entry):
                with open(os.path.join(root, entry, name)) as f:
                    return f.read().strip()
            level, kind, size = read("level"), read("type"), _size(read("size"))
        except OSError:
            continue
        if level == "1" and kind == "Data":
            found["L1d"] = size
        elif level in ("2", "3") and kind == "Unified":
            found[f"L{level}"] = size
    return found


@functools.lru_cache(maxsize=1)
def identity() -> Dict[str, object]:
    """The CPU's brand and family/model/stepping, its caches and cores."""
    info = _cpuinfo()
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id", ""),
        "family": info.get("cpu family", ""),
        "model": info.get("model", ""),
        "stepping": info.get("stepping", ""),
        "cores": os.cpu_count() or 1,
        "caches": _caches(),
    }


def describe() -> str:
    """One line: brand, family/model/stepping, caches and cores."""
    m = identity()
    caches = ", ".join(f"{k} {v // 1024} KiB" if v else f"{k} ?" for k, v in m["caches"].items())
    return (f"{m['cpu']} (family {m['family']} model {m['model']} stepping {m['stepping']}), "
            f"{caches}, {m['cores']} cores")
