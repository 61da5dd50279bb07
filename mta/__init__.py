"""smtpgw core, in the order a message travels (docs/architecture.md, docs/flow.md).

``config`` -> ``smtp`` (wire pieces) -> ``model`` (what hooks see) -> ``smtp.server`` (a client's
session) -> ``spool`` (fsync'd) -> ``queue`` (when) -> ``delivery`` (where: connectors, next hops)
-> ``smtp.client`` (the next hop). ``plugin`` holds the hook contract, ``policy`` the core's own
answers, ``ops``/``app``/``cli`` what runs and operates it. No site policy lives here.
"""
