"""Ingest: streaming uploads into a spool file, a Redis job queue, and store worker processes.

* ``spool``   an upload written to a private temp file while hashed (BLAKE3-192) and counted.
* ``jobs``    the job store: a Redis hash per job, a Stream with a consumer group, completion notices.
* ``worker``  the store worker process (dedup via meta, Engine.store, PutRecord, signed receipt)
              and the pool that spawns and supervises one per core.
* ``service`` the thin IngestService servicer and ``build``.
"""
