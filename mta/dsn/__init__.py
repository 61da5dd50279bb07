"""Delivery status notifications: the RFC 3461 ESMTP parameters on both sides (``params``) and the
RFC 3464 reports sent back to senders (``reports``).
"""
