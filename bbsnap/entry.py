"""The `bbsnap` console command: through the command server when one of this install
answers (bbsnap/cmdserver), else in this process.

Imports nothing before it knows which: without a server it costs one stat of the socket's
path; with one, the command starts in the server's pre-imported fork and this process only
relays its signals and exit status.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from bbsnap.cmdserver import client

    code = client.run(sys.argv[1:])
    if code is None:
        from bbsnap.cli.main import main as run_here

        run_here()  # never returns
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
