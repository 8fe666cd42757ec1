"""Bounds on every network-facing resource, with the reason beside each number."""

DEFAULT_HOST = "127.0.0.1"   # loopback by default: exposing the daemon is an explicit choice
DEFAULT_PORT = 7700

# A recommend request with a 1,000-item history is ~20 KB; 1 MiB leaves room for large track_batch calls while
# bounding what one connection can make the daemon buffer.
MAX_FRAME_BYTES = 1 << 20    # bytes
# Requests one connection may have in flight before the daemon stops reading from it (back-pressure, not errors):
# frames beyond it wait in the kernel's socket buffer, not in the daemon's memory.
MAX_INFLIGHT_PER_CONNECTION = 64
# Replies buffered for a client that does not read them; above it the daemon stops reading that client's requests.
WRITE_HIGH_WATER_BYTES = 1 << 20   # bytes
# Open connections; each may hold a partial frame of up to MAX_FRAME_BYTES, so this bounds that memory (1 GiB).
MAX_CONNECTIONS = 1024
# A frame started but not finished within this time closes the connection (slow-loris), however its bytes trickle.
STALLED_FRAME_SECONDS = 30.0       # s
# A connection without a byte or a request in flight for this long is closed (idle sockets cannot hold all
# MAX_CONNECTIONS slots for ever); clients reconnect.
IDLE_SECONDS = 300.0               # s
# Larger k is not a recommendation any more but a catalog dump; the scan cost is the same, the reply is not.
MAX_K = 1000
# history sent inline in a recommend call; the encoder reads only the last max_len (50) anyway.
MAX_HISTORY = 1000
MAX_BATCH_EVENTS = 10_000    # events in one track_batch
MAX_ID_CHARS = 256           # user / item id length
# Per-user session: ring of the most recent events. The encoder reads 50; the rest feeds exclude_seen.
SESSION_EVENTS = 100
# Users kept in memory (LRU). Measured ~450 B per event with 256-character ids (the worst case; ids of items the
# model knows share the model's strings): 100,000 x 100 events -> ~4.5 GB worst case, ~1 GB with short ids. Size
# it down on small devices (--max-sessions, --session-events).
MAX_SESSIONS = 100_000
CACHE_ENTRIES = 50_000       # cached recommend results (LRU)
# Result items held by the cache in all (an entry weighs 1 + k); ~60 B per item id reference and score -> ~60 MB.
CACHE_ITEMS = 1_000_000
# Attribute values one category filter may name; each costs a scan of the attribute table.
MAX_FILTER_VALUES = 100
# Out-of-stock ids remembered (ids unknown to the current model included: a later model may know them).
MAX_OUT_OF_STOCK = 1_000_000
# Event timestamps above this (unix s, year 2286) are rejected as garbage.
MAX_TS = 1e10
SCORING_THREADS = 2          # threads that run encoder + scan; both release the GIL
# After a fatal protocol error the daemon sends the error and EOF, then discards input this long before closing, so
# the client reads the error rather than a TCP reset caused by its own unread bytes.
LINGER_SECONDS = 2.0         # s
