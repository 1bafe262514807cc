"""Output rendering: the seed's tables, vertical `key: value` tables, JSON, YAML, TSV.

Everything meant for eyes (tables, ``-s``, ``show``, and the notes, progress and errors
on stderr) goes through :func:`escape`: a name, description, file name or guest-reported
text can hold terminal control sequences (``ESC ]0;...BEL`` retitles the window,
``ESC [2J`` clears it) or a newline that splits a row or a progress line. JSON and YAML
carry the data verbatim, with those characters written as their own escapes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from bbsnap.text import CONTROL_CHARACTERS, escape

OUTPUT_FORMATS = ("table", "json", "yaml")


# What JSON's encoder leaves raw with ensure_ascii=False: DEL, the C1 controls (0x9b is CSI
# to many terminals) and the Unicode line separators (which also end lines in JavaScript).
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029]")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The seed's look: header, a dashed rule, rows, a dashed rule."""
    cells = _escaped(rows)
    # Column by column and through one format string: per-cell Python loops were most of
    # the 10k-row `images list` (bench_cli.py).
    widths = [len(column) for column in columns]
    if cells:
        widths = [max(width, max(map(len, values)))
                  for width, values in zip(widths, zip(*cells, strict=True), strict=True)]
    row_format = " " + "  ".join(f"%-{width}s" for width in widths)
    header = row_format % tuple(columns)
    rule = "-" * len(header)
    return "\n".join([header, rule, *(row_format % tuple(row) for row in cells), rule]) + "\n"


def _escaped(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    """Every cell as :func:`escape` makes it. One search over all the text first: a listing
    rarely holds a control character, and escaping cell by cell was a third of the table."""
    cells = [[v if type(v) is str else ("" if v is None else str(v)) for v in row] for row in rows]
    if CONTROL_CHARACTERS.search("".join(["".join(row) for row in cells])):
        cells = [[escape(v) for v in row] for row in cells]
    return cells


def simple(rows: Sequence[Sequence[Any]]) -> str:
    """Tab-separated values, no header: ``-s/--simple``."""
    return "".join("\t".join(escape(v) for v in row) + "\n" for row in rows)


def vertical(pairs: Sequence[tuple[str, Any]]) -> str:
    """``show``: keys right-aligned on the colon, as the seed prints them."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "".join(f"{k.rjust(width)}: {escape(v)}\n" for k, v in pairs)


def as_json(data: Any) -> str:
    import json

    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False)
    # Outside strings the encoder writes only ASCII, so these are always inside one.
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def as_yaml(data: Any) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Strings with control or line-break characters go double-quoted, escaped: plain or
        single-quoted YAML would fold a NEL or U+2028 into a space and lose it."""

    def represent_str(dumper: yaml.SafeDumper, value: str) -> Any:
        style = '"' if CONTROL_CHARACTERS.search(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return str(yaml.dump(data, Dumper=Dumper, sort_keys=True, allow_unicode=True,
                         default_flow_style=False))


def as_data(data: Any, fmt: str) -> str:
    return as_json(data) if fmt == "json" else as_yaml(data)


def listing(columns: Sequence[str], rows: Sequence[Sequence[Any]], records: Sequence[Any],
            fmt: str, tab_separated: bool) -> str:
    """A list command's output in the chosen form: data, tab-separated or the seed's table."""
    return listing_of(columns, lambda: rows, lambda: records, fmt, tab_separated)


def listing_of(columns: Sequence[str], rows: Callable[[], Sequence[Sequence[Any]]],
               records: Callable[[], Sequence[Any]], fmt: str, tab_separated: bool) -> str:
    """:func:`listing`, building only the rows or only the records the chosen form shows (a
    long catalogue is read whenever someone types `images list`)."""
    if fmt != "table":
        return as_data(list(records()), fmt)
    return simple(rows()) if tab_separated else table(columns, rows())
