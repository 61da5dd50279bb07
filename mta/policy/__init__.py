"""The core's own policy, registered as the ``core`` plugin with ``trylast``: what happens when no
site plugin has an opinion (local domains accepted, relaying denied, MX routing, connector windows).
"""
