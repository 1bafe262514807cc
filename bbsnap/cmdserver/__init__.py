"""The command server: `bbsnap` commands run in a fork of a process that has everything
imported already, so a command starts in milliseconds instead of ~0.2 s.

Opt-in (`bbsnap command-server start`). The `bbsnap` entry point (bbsnap/entry.py) hands
its command line, environment, working directory, umask and standard streams to the
server when one of this install answers, and runs the command itself otherwise. Modules:
paths (where the socket is, and whether to trust it), protocol (the request's framing),
request (a request as the server reads it),
client (the entry point's side: nothing imported beyond the interpreter's built-ins),
server (the listening process and its spare child), session (one command, in the child).
"""
