"""Disk images: content-based format detection, untrusted-header checks, and qemu-img."""
