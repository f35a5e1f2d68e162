"""A small name -> factory registry shared by models, inits, datasets and similarity measures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def alias(self, old: str, name: str) -> None:
        """Accept ``old`` (a former or alternative spelling) for the registered ``name``."""
        if old in self._entries or old in self._aliases:
            raise ValueError(f"{self.kind} {old!r} is already registered")
        self._aliases[old] = name

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (itself unless it is an alias)."""
        return self._aliases.get(name, name)

    def aliases(self) -> dict[str, str]:
        """Alias -> registered name."""
        return dict(self._aliases)

    def get(self, name: str) -> T:
        try:
            return self._entries[self.canonical(name)]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
