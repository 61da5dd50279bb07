"""smart_host plugin."""
