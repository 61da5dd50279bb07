"""The durable spool: where a message is fsync'd before the 250 (``files`` holds the durability
order), the writer child process that does the writes (``writer``, ``link``), and the store the
queue reads and updates (``store``), and the "why" steps kept beside a message that stays
queued (``traces``).
"""
