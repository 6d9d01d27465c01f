"""Loading whole JSON files with errors that name the file (and the entry) instead of a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError
from data_prep.records import require_file


def load_json(path: Path, what: str) -> Any:
    """Parse a whole JSON file. It cannot be read row by row, so a byte that is not UTF-8 is an error
    naming the file and line (unlike text lists, where only that row is skipped)."""
    require_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise PrepInputError(f"{path}:{err.lineno}", f"invalid JSON ({err.msg}, column {err.colno})") from None
        except UnicodeDecodeError as err:
            where = _bad_utf8_line(path)
            raise PrepInputError(
                where, f"{what} is not valid UTF-8 ({err.reason}); a JSON file is parsed whole"
            ) from None


def _bad_utf8_line(path: Path) -> str:
    """`path:line` of the first byte that is not UTF-8 (only on the error path: reads the file again)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"{path}:{line}"
    return str(path)


def columns_to_records(path: Path, data: dict[str, Any], columns: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Column-wise JSON ({"col": [v0, v1, ...], ...}) as one dict per entry, checking lengths match."""
    for col in columns:
        if not isinstance(data.get(col), list):
            raise PrepInputError(str(path), f"expected a list under key {col!r}; keys present: {sorted(data)}")
    lengths = {col: len(data[col]) for col in columns}
    if len(set(lengths.values())) != 1:
        raise PrepInputError(str(path), f"column lists differ in length: {lengths}")
    for values in zip(*(data[col] for col in columns)):
        yield dict(zip(columns, values))


def require_key(path: Path, index: int, entry: Any, key: str, container: str = "entry") -> Any:
    if not isinstance(entry, dict):
        raise PrepInputError(f"{path}: {container} {index}", f"expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise PrepInputError(f"{path}: {container} {index}", f"missing key {key!r} (keys: {sorted(entry)})")
    return entry[key]
