"""A wrapper that keeps secrets out of logs, reprs, exceptions and tracebacks."""

from __future__ import annotations

import hashlib


class Secret:
    """A string whose ``repr`` and ``str`` are masked; ``reveal()`` is the only way in.

    Equality compares the content (a changed secret is a config change), hashing uses a
    digest so the value never lands in a dict's debug output.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        return hashlib.sha256(self._value.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Secret is not picklable")
