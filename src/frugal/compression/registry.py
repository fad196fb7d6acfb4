"""A registry of named records, filled on first use from modules that each define one record."""

from __future__ import annotations

import importlib
from typing import Any

from frugal.errors import FrugalError


class Registry:
    """Records by their `.name`: the built-in ones come from `modules` (each defines the attribute `attr`),
    loaded on first use in that order; `register` adds more."""

    def __init__(self, kind: str, modules: tuple[str, ...], attr: str):
        self.kind, self.modules, self.attr = kind, modules, attr
        self._records: dict[str, Any] = {}

    def records(self) -> dict[str, Any]:
        if not self._records:
            for module in self.modules:
                record = getattr(importlib.import_module(module), self.attr)
                self._records[record.name] = record
        return self._records

    def register(self, record: Any) -> Any:
        """Add a record (its name must be new); returns it."""
        records = self.records()
        if record.name in records and records[record.name] is not record:
            raise FrugalError(f"{self.kind} {record.name!r} is already registered")
        records[record.name] = record
        return record
