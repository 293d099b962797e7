"""The embedded ``dir://`` backend: a folder that behaves like one 0-db namespace.

Values live in append-only segment files with an append-only index beside
them, like 0-db's own data and index files; creating one file per value costs
more than writing the value on ext4.

Layout::

    <folder>/meta.json          {"format": 1, "mode": "seq"|"user", "id": ...}, written once, atomically
    <folder>/lock               writers hold flock(LOCK_EX) on it for the short append
    <folder>/index.log          48-byte header, then one record per set / delete
    <folder>/data/NNNNNNNN.seg  raw values, appended; a new segment past ``segment_size``

An index record (see ``format``) maps a key to (segment, offset, length,
order), with a CRC. ``order`` is the seq id in seq mode and a counter
taken at each write in user mode, so ``scan`` walks keys in write order (seq:
ascending id; user: order of each key's last write). The header holds a magic,
the backend's random id (also in meta.json), a generation bumped by
``compact``, the first segment number writers may use and the next free id.

Several processes may open the same folder. A writer takes the flock, reads
the index records others appended since it last looked, allocates the next id
(ids start at 0 and only grow; deleted ids are never reused, updates and
deletes consume none; only a record lost to a crash can see its id again),
appends the value to the current segment, appends the index record and
releases the lock. Readers never lock: every get / exists /
scan first reads the index tail (one ``stat`` when nothing changed), so a
read sees every write that returned before it began, in any process. A record
cut short or failing its CRC at the tail (a crash mid-append) is ignored by
readers and cut off by the next writer; value bytes without their record are
dead space, never visible. ``compact`` gives the space of deleted values back
segment by segment: a segment's live values are copied to the write segment,
relocation records appended, the segment removed (``compact`` module); now and
then a new index with one record per live key is swapped in with one ``rename``,
and other processes notice the new index file (a new inode) and reload it.

A folder that disappears while open (removed, moved away, an unmounted disk)
gives ``BackendUnavailable`` and is never recreated; ``open`` creates a missing
folder only when its parent exists (``create=False``: never). A folder that
comes back empty (a replaced disk) reads as an empty backend, and the next
write sets a new backend up in it, as ``open`` would; a folder that now holds
another backend is used if it has the same mode (``ModeMismatch`` otherwise).

``fsync`` (a constructor option) decides what is on stable storage when a
write returns. Every mode survives a crash of the process (the data is in the
OS page cache, visible to every process); they differ on power loss / kernel
crash:

* ``"always"``: the value is fdatasync'ed, then its index record is appended and
  fdatasync'ed (and the folder, when a segment was created), all before
  ``put`` / ``set`` / ``delete`` return: an acknowledged write survives power
  loss. Costs two fsyncs per write (about 1 ms here).
* ``"batch"`` (default): writes are not synced inline; a background flush
  fdatasyncs the written segments, then the index, at most ``fsync_interval``
  seconds (1 s) after a write, and ``sync()`` / ``close()`` flush at once.
  Power loss can drop writes of the last interval; a record whose value did
  not reach the disk can then return stale bytes, which shard checksums catch.
* ``"never"``: no fsync except on ``sync()``; the kernel writes back when it likes
  (about 30 s). For tests, benchmarks and scratch data.

Why ``"batch"`` is the default: it is what 0-db itself does (it syncs each write
only with ``--sync``), and each shard is one of k+m on separate disks with a
checksum in its record, so maint repairs what a power cut drops, while
``"always"`` would double the cost of every shard write. Call ``sync()`` on
the backends a file went to before acknowledging it if a hard guarantee is needed.

Blocking IO runs in worker threads (``asyncio.to_thread``, one hop per call;
``DirBackend.put_batch`` writes a batch across backends in one hop, and
``get_batch`` reads one, such as a chunk's shards, key after key); values
are read with ``os.pread`` from cached read-only descriptors. Each process keeps the whole
index in memory, like 0-db: 16 bytes per id ever issued in seq mode (arrays),
a dict entry per key in user mode; opening parses about a million records per
2 s on this machine.

Modules: ``format`` (the bytes on disk: names, header, CRC'd records),
``index`` (the in-memory index), ``folder`` (setting a folder up, meta.json,
segment files, OS errors), ``compact`` (compaction), ``backend`` (``DirBackend``).
"""

from services.common.backends.dirstore.backend import DEFAULT_SEGMENT_SIZE, FSYNC_POLICIES, DirBackend, DirUsage
from services.common.backends.dirstore.compact import CompactResult
from services.common.backends.dirstore.folder import ModeMismatch

__all__ = ["DEFAULT_SEGMENT_SIZE", "FSYNC_POLICIES", "CompactResult", "DirBackend", "DirUsage", "ModeMismatch"]
