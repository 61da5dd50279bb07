"""Built-in smtpgw plugins, loaded by name through the ``smtpgw.plugins`` entry-point group."""
