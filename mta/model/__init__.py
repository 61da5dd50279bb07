"""The public objects that hooks receive and the core passes between its stages: ``Session`` and
``Envelope`` (``envelope``), the received ``message``, a queued entry and its per-recipient state
(``queue_entry``), next hops and delivery results (``nexthop``), client networks (``netaddr``).
"""
