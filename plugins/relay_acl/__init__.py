"""relay_acl plugin."""
