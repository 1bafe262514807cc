"""Local state: the SQLite catalogue and its migrations, the data directory's layout and
modes, per-server locks, and the process tokens that tell a live worker from a dead one."""
