"""etrn_dequeue: hold mail for remote-triggered delivery and release it on ETRN/ATRN/TURN (the seed's
"Queue mail for remote triggered delivery"), and ask an ISP to dequeue ours (connectors' ``etrn``)."""
from smtpgw_plugins.etrn_dequeue.plugin import EtrnDequeue, HandOff

__all__ = ["EtrnDequeue", "HandOff"]
