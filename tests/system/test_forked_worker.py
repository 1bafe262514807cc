"""A worker forked by a process that leaves a libvirt connection to its garbage collector
(in a reference cycle, not yet collected: a long-lived command server, a test runner
hosting commands) finishes: the child never collects what it inherited. Before the fix,
the child's first collection closed that connection with an RPC over a socket number the
child had closed and its own connection had taken, and hung there for good, holding the
server's lock (proc.fork_detached). Needs the real libvirtd: test:///default has no
socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests.system.conftest import URI


def test_a_worker_forked_beside_an_uncollected_libvirt_connection_finishes(tmp_path):
    log = tmp_path / "worker.log"
    script = textwrap.dedent(f"""
        import gc, os
        from pathlib import Path
        import libvirt
        from bbsnap import proc
        gc.disable()  # the cycle below is still there at the fork
        class Holder:
            pass
        holder = Holder()
        holder.itself, holder.conn = holder, libvirt.open({URI!r})
        holder.domains = holder.conn.listAllDomains(0)
        del holder
        def work():
            own = libvirt.open({URI!r})
            gc.enable()
            gc.collect()  # what the worker's own garbage sets off sooner or later
            print("libvirt", own.getLibVersion(), flush=True)
            own.close()
            print("worker done", flush=True)
            return 0
        pid = proc.fork_detached(work, log_path=Path({str(log)!r}))
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("exit", os.waitstatus_to_exitcode(status), flush=True)
    """)
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert caller.stdout is not None
    pid = int(caller.stdout.readline())
    try:
        out, _ = caller.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)  # the hung worker: its caller then reports and exits
        out, _ = caller.communicate(timeout=60)
    assert out.strip() == "exit 0", f"the worker hung or failed; its log: {log.read_text()!r}"
    assert log.read_text().splitlines()[-1] == "worker done"
