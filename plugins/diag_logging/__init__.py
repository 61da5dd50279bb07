"""diag_logging plugin."""
