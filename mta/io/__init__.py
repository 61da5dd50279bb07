"""Low-level I/O helpers on the hot path: Twisted shortcuts (``fastpath``), log lines rendered once (``rendered_log``) and batched log-file
writes off the reactor's way (``linebuffer``).
"""
