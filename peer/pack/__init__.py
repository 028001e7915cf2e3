"""bob's payload: a Git PACK v2 stream inside the records (docs/protocol.md §8), sans I/O.

When the other peer is bob, the records carry a Git pack instead of our own messages
(peer/messages.py). Nothing here touches a socket; the only disk access is the reader's
private spools (directories) and the encoders reading the files they send. bob uses a
pack two ways:

- one file: a type-4 object whose content is the file name, then the blob;
- a directory: Git blobs and trees (deltas allowed) plus a type-1 "root" object,
  ``<dir name>\\0<20-byte top tree id><count in decimal>``.

Names in a received pack come from the other peer: each one goes through
`peer.offer.name_problem`, the project's one rule book for names.

| module | what it holds |
|---|---|
| `format` | constants, object headers, names, `PackLimits`, the events |
| `reader` | `PackReader`: describe before the user decides, extract after |
| `store` | the spools and the object store that resolves deltas |
| `writer` | `single_file_records`, `directory_pack`: what we send to bob |
"""

from .format import (
    DEFAULT_LIMITS,
    Directory,
    FileData,
    PackEnd,
    PackError,
    PackEvent,
    PackLimits,
    SingleFile,
    TreeEntry,
    object_header,
)
from .reader import PackReader
from .writer import DirectoryPack, directory_pack, single_file_records

__all__ = [
    "DEFAULT_LIMITS",
    "Directory",
    "DirectoryPack",
    "FileData",
    "PackEnd",
    "PackError",
    "PackEvent",
    "PackLimits",
    "PackReader",
    "SingleFile",
    "TreeEntry",
    "directory_pack",
    "object_header",
    "single_file_records",
]
