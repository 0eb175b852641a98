"""The one exception type for bad market data."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data, with enough context to find and fix it.

    The message always names the file and, where one exists, the row or timestamp and the
    field, because an operator with several instances has to know *which* export to fix
    without reading a traceback.
    """

    def __init__(self, path: object, problem: str, *, row: object = None, field: str | None = None):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}")
        self.path = str(path)
        self.row = row
        self.field = field
