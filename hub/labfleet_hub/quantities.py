"""Kubernetes resource quantities as the API server writes them (``500m``, ``4Gi``, ``1e9``).

Shared by the services that read what pods and Kueue hold (accounting's
collectors, the batch service's queue view). The catalogue's own
``parse_quantity`` stays separate: it checks what an admin typed and says
what is allowed.
"""

from __future__ import annotations

_CPU_SUFFIX = {"m": 1e-3, "u": 1e-6, "n": 1e-9}
_MEM_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "m": 1e-3,
}  # fmt: skip


def parse_cpu(value) -> float:
    """Cores in a CPU quantity: ``"500m"`` -> 0.5, ``"2"`` -> 2.0."""
    text = str(value).strip()
    if text and text[-1] in _CPU_SUFFIX:
        return float(text[:-1]) * _CPU_SUFFIX[text[-1]]
    return float(text)


def parse_memory(value) -> int:
    """Bytes in a memory quantity: ``"4Gi"``, ``"500M"``, ``"1e9"``."""
    text = str(value).strip()
    for suffix in sorted(_MEM_SUFFIX, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * _MEM_SUFFIX[suffix])
    return int(float(text))
