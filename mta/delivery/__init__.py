"""One delivery attempt: which connectors carry a domain (``connectors``), where the next hop is
chosen (``nexthops``: MX, implicit MX, null MX), when a connector may send (``windows``), the
attempt itself (``attempt``) and local delivery (``maildir``).
"""
