"""Use cases. Each service receives its ports in its constructor and never prints:
progress goes through callbacks, failures are raised as BbsnapError."""
