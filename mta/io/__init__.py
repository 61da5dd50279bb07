"""Low-level I/O helpers on the hot path: Twisted shortcuts (``fastpath``) and batched log-file
writes off the reactor's way (``linebuffer``).
"""
