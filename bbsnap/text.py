"""Text from images, sidecars, guests or users made safe for a terminal (DESIGN §8).

Used by the CLI's renderers and by every line bbsnap writes to stderr, library code's
warnings included, so a name, a file name or a guest agent's error message stays one line
and cannot drive the terminal.
"""

from __future__ import annotations

import re
from typing import Any

# C0 and C1 controls and Unicode line/paragraph separators: anything that could break a row
# in two or drive the terminal.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(value: Any) -> str:
    """*value* as text safe to print on a terminal: each control character becomes its
    Python escape (``\\n``, ``\\x1b``, ``\\u2028``), so the text stays one line and
    cannot drive the terminal. None is the empty string."""
    text = value if type(value) is str else ("" if value is None else str(value))
    if CONTROL_CHARACTERS.search(text):
        text = CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text
