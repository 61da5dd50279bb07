"""Makes ``twistd smtpgw`` exist; imports nothing of ours until it is used."""
from twisted.application.service import ServiceMaker

smtpgw = ServiceMaker(
    "smtpgw",
    "mta.app.tap",
    "smtpgw: a plugin-based, event-driven SMTP gateway",
    "smtpgw",
)
