"""SMTP as bytes on the wire, shared by both directions: replies as values and the catalogue of the
standard ones, mailbox addresses, the strict line splitter. ``client/`` and ``server/`` build on it.
"""
