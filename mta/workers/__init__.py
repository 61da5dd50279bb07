"""Several worker processes on one gateway (``gateway.workers``), so that both cores work.

One Python process runs one reactor thread, and that thread is what limits smtpgw's throughput.
With ``workers: N`` the twistd process is worker 0 and also the supervisor: it binds every listen
address itself (before dropping privileges), then starts N-1 more twistd processes (workers 1..N-1)
that inherit those listening sockets and accept from them too, so the kernel hands each connection
to whichever process is free to take it. Nothing else is shared but the spool directory:

* **Ownership.** A queue id made by worker *i* > 0 ends in ``-i`` (``0190f2c3d4e5a1b2c3d4e5f6-1``);
  an id without that suffix belongs to worker 0 (so a spool written with ``workers: 1``, or by
  ``smtpgw queue`` on a stopped gateway, is worker 0's). Each worker scans, delivers, retries and
  cleans up only the entries it owns (``owner = suffix % N``, so lowering N hands the entries of
  a removed worker to a remaining one). Files never change hands while two processes run.
* **One owner at a time.** Each worker holds ``<spool>/worker.<i>.lock`` (flock) while its queue
  runs; a worker that finds the lock taken (an earlier worker *i* still finishing) waits for it, so
  no two processes ever deliver the same entry.
* **Parent death.** A worker reads its stdin, a pipe from the supervisor: at end of file (the
  supervisor is gone, even by ``kill -9``) it stops listening at once and shuts down cleanly.
* **Worker death.** The supervisor restarts a worker that exits (after 1 s, backing off to 30 s
  when it keeps dying young); its entries wait on disk meanwhile.
* **Logs.** A worker logs to its stdout, which the supervisor relays into its own log, prefixed
  ``worker i:``. SIGHUP to the supervisor is passed on to every worker.
* **Control.** Worker *i* > 0 answers ``smtpgw queue`` requests on ``<control socket>.<i>``; worker 0
  answers on the control socket itself and forwards each request to the owner of the ids it names,
  or to every worker for a list, a domain or ``all``, merging the answers (:mod:`mta.ops.fanout`).

* **Connection limits.** A virtual server's ``max_connections`` is the gateway's total: every
  worker counts its connections in ``<spool>/worker.counts``, a file they all map, and a worker
  admits a client only while the sum over all workers is below the limit
  (:mod:`mta.workers.counts`; two workers admitting at the same instant may overshoot by at most
  N-1). A connector's outbound ``max_connections`` and ``max_connections_per_host`` are split
  instead: each worker may open ``ceil(limit / N)`` of them (at least 1, :meth:`WorkerInfo.share`),
  so the gateway's total stays within the limit rounded up to a multiple of N (4 with ``workers: 2``
  and a limit of 3; N when the limit is below N).

Still per worker: the metrics endpoint (worker 0's own figures, its ``connections_active`` too);
a diag_logging or protocol log file is appended to by every worker.

* **Remote triggers.** An ETRN/DEQUEUE answered by one worker is passed to the others over their
  control sockets, with a marker in ``<spool>/triggers/`` for a worker that was restarting; an ATRN
  makes the others hand the entries it asks for over to the worker holding the client's connection
  (a copy under an id that worker owns, then the old files removed). :mod:`mta.cluster.triggers`.

Modules: ``identity`` (which worker this is, queue ids and their owners), ``endpoint`` (listening
sockets shared with the workers), ``supervisor`` (starting, watching and restarting workers),
``counts`` (the shared connection counts), ``lock`` (one owner per worker slot).
"""
