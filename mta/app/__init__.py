"""The application: ``twistd smtpgw`` (``tap``), the composition root that builds the gateway from
the configuration (``gateway``), the checks run before anything listens (``preflight``), the
operator's services (``operator``) and SIGHUP (``reload``, ``reload_config``).
"""
