"""The queue manager (``manager``: from "on disk" to delivered, bounced or expired), and when each
message is next due (``scheduler``), where retries are scheduled.
"""
