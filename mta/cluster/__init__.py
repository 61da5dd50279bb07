"""Several gateways as one (``gateway.cluster``): a shared-nothing spool on each node, Redis for what
the nodes share. Nothing here is on a message's path before its ``250``; with ``gateway.cluster.redis``
null (the default) only what the workers of one gateway share runs: remote triggers (``triggers``) and
per-client counts (``windows``), on the spool and the control sockets instead of Redis."""
