"""The web console (``gateway.console``): the Queue Viewer and System Manager of smtpgw in a browser.

Served by the gateway itself (twisted.web, in worker 0) and working only through the control
interfaces ``smtpgw queue`` uses (:mod:`mta.ops.control`, :mod:`mta.ops.fanout`), so an action in the
browser and the same command typed in a shell take one code path.
"""
