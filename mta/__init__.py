"""smtpgw core: the ESMTP server and client, spool, queue, routing. No site policy lives here."""
