"""Output rendering: the seed's tables, vertical `key: value` tables, JSON, YAML, TSV.

Tables and TSV are for eyes and ``cut``: control characters in cells are escaped
so one row stays one line. ``show``, JSON and YAML give values verbatim.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

OUTPUT_FORMATS = ("table", "json", "yaml")


# C0 and C1 controls and Unicode line/paragraph separators: anything that could break a row
# in two or drive the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _cell(value: Any) -> str:
    text = value if type(value) is str else ("" if value is None else str(value))
    if _CONTROL.search(text):
        text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The seed's look: header, a dashed rule, rows, a dashed rule."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, value in enumerate(row):
            if len(value) > widths[i]:
                widths[i] = len(value)

    def line(values: Sequence[str]) -> str:
        return " " + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))

    header = line(columns)
    rule = "-" * len(header)
    body = [line(row) for row in cells]
    return "\n".join([header, rule, *body, rule]) + "\n"


def simple(rows: Sequence[Sequence[Any]]) -> str:
    """Tab-separated values, no header: ``-s/--simple``."""
    return "".join("\t".join(_cell(v) for v in row) + "\n" for row in rows)


def vertical(pairs: Sequence[tuple[str, Any]]) -> str:
    """``show``: keys right-aligned on the colon, as the seed prints them."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "".join(f"{k.rjust(width)}: {'' if v is None else v}\n" for k, v in pairs)


def as_json(data: Any) -> str:
    import json

    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def as_yaml(data: Any) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Strings with control or line-break characters go double-quoted, escaped: plain or
        single-quoted YAML would fold a NEL or U+2028 into a space and lose it."""

    def represent_str(dumper: yaml.SafeDumper, value: str) -> Any:
        style = '"' if _CONTROL.search(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return str(yaml.dump(data, Dumper=Dumper, sort_keys=True, allow_unicode=True,
                         default_flow_style=False))


def as_data(data: Any, fmt: str) -> str:
    return as_json(data) if fmt == "json" else as_yaml(data)


def listing(columns: Sequence[str], rows: Sequence[Sequence[Any]], records: Sequence[Any],
            fmt: str, tab_separated: bool) -> str:
    """A list command's output in the chosen form: data, tab-separated or the seed's table."""
    if fmt != "table":
        return as_data(list(records), fmt)
    return simple(rows) if tab_separated else table(columns, rows)
