"""The meta service: file records and ids, dedup, and downloads (``python -m services.meta``).

* ``catalog``: records behind file ids, atomic dedup, compare-and-swap updates (no grpc).
* ``download``: request validation before the first byte, 1 MiB re-slicing (no grpc).
* ``mime``: content types and content-disposition values (no grpc).
* ``service``: the thin grpc.aio servicer and ``build``.
"""
