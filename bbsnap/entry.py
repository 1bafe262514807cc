"""The `bbsnap` console command: through the command server when one of this install
answers (bbsnap/cmdserver), else in this process.

Imports nothing before it knows which: without a server it costs one stat of the socket's
path; with one, the command starts in the server's pre-imported fork and this process only
relays its signals and exit status. Run at a terminal without one, it starts one for the
next command once this one is done (cmdserver/autostart.py).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from bbsnap.cmdserver import client

    argv = sys.argv[1:]
    code = client.run(argv)
    if code is None:
        from bbsnap.cli.main import run_command
        from bbsnap.cmdserver import autostart

        code = run_command()  # output written, catalogue settled: the command is done
        if autostart.wanted(argv, at_terminal=autostart.interactive()):
            autostart.start_in_background()  # a server for the next command
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
