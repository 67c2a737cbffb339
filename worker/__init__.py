"""The repair worker: an RQ worker that runs ``worker.jobs.run_repair`` (the library's repair
engine, the same code path as ``nnoculation repair``), publishes the repaired version to the
store, activates and announces it, plus a reconciliation loop for jobs lost to a crash.
Imports ``nnoculation`` and ``models``; never ``service``."""
