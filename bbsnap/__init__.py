"""bbsnap: a local virtualization snapshot engine on QEMU/KVM, driven through libvirt.

Only the version lives here: importing the package must stay cheap (the CLI's
start-up time is a measured goal) and free of side effects.
"""

__version__ = "0.1.0"
