"""etrn_dequeue: hold mail for remote-triggered delivery and release it on ETRN/ATRN/TURN
(the seed's "Queue mail for remote triggered delivery").

Registered now so sites can enable it; the behaviour lands with its own issue. Until then it
answers no hook, so enabling it changes nothing.
"""


class EtrnDequeue:
    """No hooks yet: the holding and dequeue verbs come with the etrn_dequeue issue."""


__all__ = ["EtrnDequeue"]
