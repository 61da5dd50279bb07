"""Example site trigger: an ISP-style ``DEQUEUE domain`` command (the seed's "customized FINGER or
DEQUEUE commands"), answered like ETRN.

Enable it beside the etrn_dequeue plugin::

    plugins:
      enabled: [relay_acl, smart_host, etrn_dequeue, diag_logging]
      local: [etc/local_hooks/dequeue.py]

A client then says ``DEQUEUE example.org`` after EHLO. The same rules as ETRN apply -- the connector
holding the domain must be ``remote_triggered`` and list the client in ``delivery.authorized``; the
per-client rate limit counts both verbs -- and the same replies come back (250, 251, 458, 459).

To support another verb (``FINGER``-style ``TRIGGER``...), add it to VERBS. The other side of the
conversation -- a gateway asking its ISP with such a command -- needs no code: set the connector's
``etrn: {command: "DEQUEUE {domain}", ...}`` or run ``smtpgw etrn --command "DEQUEUE {domain}"``.
"""
from mta.plugin.hookspecs import hookimpl

VERBS = ("DEQUEUE",)
_gateway = None


@hookimpl
def smtpgw_configure(config, services):
    global _gateway
    _gateway = services


@hookimpl
def smtpgw_command(session, verb, argument):
    if verb not in VERBS or _gateway is None:
        return None
    etrn = _gateway.hooks.plugin("etrn_dequeue")
    if etrn is None:                # the plugin is not enabled: nothing is held, nothing to release
        return None
    return etrn.dequeue(session, argument, verb=verb)
