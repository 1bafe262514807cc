"""The command line: click groups (one module per group), output rendering, one catch point."""
