"""Randomized fault schedules against real runner processes, checked from outside.

A schedule (``schedule``) is a pure function of its seed: SIGKILLs, SIGSTOPs
past the lease, SIGTERMs, lock connections terminated, PostgreSQL restarts
and runner-to-runner sockets cut, on three runner processes
(``runner_app``) and one client process (``client_app``). The harness
(``harness``) plays it against a PostgreSQL server of its own, heals
everything, and checks the invariants (``invariants``) from the database
and from what the client printed, never from inside the processes under
test. ``test_fault_schedules`` runs a fixed set of seeds in CI; ``soak``
runs as many as asked.
"""
