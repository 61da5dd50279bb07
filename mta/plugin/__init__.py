"""The hook contract (``hookspecs``: every hook, its arguments, what the core answers) and the
plugin manager that loads plugins and fires hooks (``manager``). Core modules fire hooks only
through the manager's helpers.
"""
