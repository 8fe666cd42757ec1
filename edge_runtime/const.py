"""Every bound, port, name and default of the node, with its unit and the reason beside each number.

Grouped by the room that uses it (``ARCHITECTURE.md``); nothing else in ``edge_runtime`` defines a bound of its own.
"""

# ------------------------------------------------------------------------------------------------ names and ports
ENV_PREFIX = "EDGEREC_"          # every environment variable the project reads starts with it
OLD_ENV_PREFIX = "EDGE_RUNTIME_"  # deprecated spelling, still read (a deprecation line is logged once per name)
DEFAULT_HOST = "127.0.0.1"       # loopback by default: exposing the daemon is an explicit choice
DEFAULT_PORT = 7700              # the node's MessagePack-RPC port
REGISTRY_PORT = 7710             # the registry's MessagePack-RPC port
DEFAULT_CHANNEL = "stable"       # registry channel a node follows unless told otherwise
CONFIG_PATH = "/etc/edgerec/edgerec.toml"   # read when it exists and no --config is given

# ------------------------------------------------------------------------------------------------ rpc/ (framing)
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
# Connections from one client address (TCP); when it is reached, or MAX_CONNECTIONS is, the new connection is
# admitted by closing the longest-idle one (connections that never sent a request first), so a flood of idle
# connections cannot lock legitimate clients out. A shop backend's connection pool from one address fits.
MAX_CONNECTIONS_PER_ADDRESS = 256
# Pending connections the kernel queues for accept(): a flood must not push a legitimate SYN into a 1 s retry.
LISTEN_BACKLOG = 4096
# Connections accepted per event-loop turn (asyncio's accept loop): small, so a flood of connects cannot hold the
# loop away from requests for long.
ACCEPT_BATCH = 64
# After a fatal protocol error the daemon sends the error and EOF, then discards input this long before closing, so
# the client reads the error rather than a TCP reset caused by its own unread bytes.
LINGER_SECONDS = 2.0         # s
HTTP_LINGER_BYTES = 1 << 20    # bytes the metrics endpoint reads and discards after a 431 before it closes
TLS_CERT_WARN_DAYS = 14       # days before its end that the process's own certificate is warned about at start
# On SIGTERM, requests in flight get at most this long to finish before they are cancelled.
DRAIN_SECONDS = 10.0         # s
MAX_MSGID = 0xFFFFFFFF       # msgpack-rpc msgids are uint32
# Reply bytes a client buffers unparsed: above a fetch chunk (MAX_CHUNK_BYTES) plus framing, far below RAM.
CLIENT_MAX_BUFFER_BYTES = 64 << 20   # bytes
CLIENT_TIMEOUT_SECONDS = 30.0        # s, blocking client: per socket operation
REPR_CHARS = 60              # characters of a bad value quoted in an error message (a huge value stays short)

# ------------------------------------------------------------------------------------------------ rpc/ (auth, TLS)
ROLES = ("shop", "ops", "peer")   # who may call what: rpc/auth.py holds the method table
TOKEN_BYTES = 32             # bytes of randomness in a token (256 bits), written as 64 hex characters
MIN_TOKEN_CHARS = 32         # a token file line shorter than this is refused (not a generated secret)
MAX_TOKEN_CHARS = 512        # longest token an auth call may present (longer: refused without hashing)
# An unauthenticated connection (tokens configured) is closed this long after it opened unless it authenticated.
AUTH_DEADLINE_SECONDS = 5.0  # s
AUTH_MAX_FAILURES = 3        # failed auth calls on one connection before it is closed
# Frame bytes a connection without a role may make the server buffer and decode (roles enforced): an auth call is
# ~90 bytes; 64 KiB keeps an anonymous client's decoding work small (a 1 MiB frame of a million empty maps is not).
MAX_ANONYMOUS_FRAME_BYTES = 64 << 10   # bytes
TLS_HANDSHAKE_SECONDS = 10.0   # s a TLS handshake may take (a connection that never completes one is dropped)
SECURITY_LOG_SECONDS = 10.0   # s between log lines about a repeated bound (a flood logs a count, not a line each)

# ------------------------------------------------------------------------------------------------ serving/ (requests)
# Larger k is not a recommendation any more but a catalog dump; the scan cost is the same, the reply is not.
MAX_K = 1000
# A request whose scoring (encoder + scan, Model.score_us, measured at load) takes at most this long is scored on
# the event loop: the hop to a scoring thread and back (two wake-ups, a future, a self-pipe write) cost more than
# it saved there (bench/bench_latency.py). Longer scans go to the scoring threads, where concurrent ones overlap.
INLINE_SCORE_US = 300.0      # µs
# History ids sent inline in a recommend call (also: ids in filters.exclude); the encoder reads only the last
# max_len (50) anyway.
MAX_HISTORY_IDS = 1000
MAX_BATCH_EVENTS = 10_000    # events in one track_batch; also items in one set_availability
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
# Category masks a model caches (one packed bitset of N / 8 bytes each: 256 x 12,101 items -> 390 KB).
ATTRIBUTE_MASK_CACHE = 256
# Out-of-stock ids remembered (ids unknown to the current model included: a later model may know them).
MAX_OUT_OF_STOCK = 1_000_000
# Event timestamps above this (unix s, year 2286) are rejected as garbage.
MAX_TS = 1e10                # s
SCORING_THREADS = 2          # threads that run encoder + scan; both release the GIL
# Batches of concurrent recommend requests (serving/batch.py): requests per batch at most, and the largest k + its
# exclusions a request may have to join a shared scan; a request over it is scored alone (a shared scan keeps the
# group's largest k for every query).
BATCH_MAX_REQUESTS = 32
BATCH_MAX_FETCH = 256
# The recommend fast path (serving/fastpath.py) answers plain frames that arrive together one by one, unbatched,
# when a batch would save a request less scan time than this: what the general path (decode, checks, futures,
# reply encode) costs a request beyond the fast path. Measured by bench/bench_latency.py on the Beauty bundle
# (12,101 items; 2-core AMD EPYC, 2026-12-02): daemon own path 86-121 µs per batched request against 56-69 µs per
# fast one, while a batch of 8 saves 30-40 µs of scan per query; 8 clients 3,935-4,876 requests/s batched against
# 6,729 through the fast path one by one.
FAST_OVER_BATCH_US = 60.0     # µs
# Rounds of the load-time check that padded encoder calls are bit-identical to lone calls (Model.batch_exact,
# serving/model.py probe_batch_exact): 24 sessions each, ~1.5 ms per round on the Beauty bundle.
BATCH_PROBE_ROUNDS = 4
# The native encoder serves only when it gives ONNX Runtime's vectors up to this relative difference on probe
# sessions (serving/encoder.py native_agreement; float rounding measured 1e-7 to 1e-6 on Beauty bundles).
NATIVE_ENCODER_TOLERANCE = 1e-4
# Table rows the load-time check compares one by one (as one-item sessions; larger tables: that many at random).
# 200k rows: about 0.7 s of a model load on the 2-core Xeon.
NATIVE_CHECK_ROWS = 200_000
# The warm-up's batched encoder shapes (a batch-exact encoder, Service.warm_up): 2 .. this many sessions, windows of
# 1 .. WARM_BATCH_WINDOW items (112 calls, ~12 ms on the Beauty bundle; 9 of 10 Beauty contexts are that short).
WARM_BATCH_SESSIONS = 8
WARM_BATCH_WINDOW = 16
# A request is scored on the event loop (a small model, INLINE_SCORE_US) only when it is light: k + its exclusions
# at most BATCH_MAX_FETCH and at most this many categories; a heavier one (measured: k = 1000 with 1,000 exclusions
# and 100 categories, ~5 ms) goes to a scoring thread, or it would hold every other connection meanwhile.
INLINE_MAX_CATEGORIES = 8
BATCH_WAIT_US = 0.0          # µs a batch waits for more after its first request (0: to the end of the loop turn)
MALLOC_ARENAS = 2            # glibc arenas (a model loaded in a worker thread reuses what the loop freed)
BLAS_THREADS = 1             # per mat-vec: requests already run in parallel scoring threads
CHECK_K = 10                 # the model / served-path check asks for this many items
# CPython collector thresholds once the node serves (default 700, 10, 10): a young collection every 100,000
# allocations bounds cyclic garbage to a few MB while taking collections off most requests.
GC_THRESHOLDS = (100_000, 100, 1000)

# ------------------------------------------------------------------------------------------------ serving/ (new items)
# add_items: items the node composes from their attributes before any retraining (serving/compose.py).
# Items one add_items call may carry. Each call copies the served arrays once (copy-on-write, so running scans are
# never touched; built in a worker thread). Measured here, d = 64 int8: 0.6 ms per call at 12,101 items (9 ms with
# 1,000 items, mostly composing them), 57 ms at 1M items (id index 17 ms, id list 6 ms, matrix 12 ms; fp32 120 ms),
# the event loop stalling up to 21 ms (1 item) / 62 ms (1,000 items) meanwhile. So a catalog feed should send new
# items in batches, not one call per item; 1,000 items of typical size (~100 B each) fit a frame easily.
MAX_ADD_ITEMS = 1000
# Items composed onto one model (added and not yet known to a trained model). Each is a scanned row (d bytes int8)
# and an entry of the added-items file, rewritten on every call (measured 0.8 MB, 18 ms at 10,000 items with 4
# values each; composing all of them onto a new model at a swap: ~100 ms, in a worker thread); past this the
# catalog has outgrown the model: retrain, and the items the new model knows leave the set.
MAX_ADDED_ITEMS = 10_000
MAX_ITEM_ATTRIBUTES = 64     # attribute values per new item (Beauty items carry 1 to 6: brand and categories)
MAX_ATTRIBUTE_CHARS = 256    # characters of one attribute value (as long as an id)
ADDED_ITEMS_FILE = "added_items.json"   # the node's added items, in its state directory (restored at boot)
# Rows of the int8 item matrix dequantized at once to take the mean item embedding (a float32 block of 4 MiB at
# d = 64), instead of a float32 copy of the whole matrix (256 MB at 1M items).
ITEM_MEAN_BLOCK_ROWS = 16_384

# ------------------------------------------------------------------------------------------------ scoring/ (top-k)
MAX_QUERIES = 4096           # queries per call (the daemon sends 1; benchmarks up to 64)
MAX_DIM = 16384              # d of float32 queries / items
# int8 queries: |sum| <= 128 * 128 * d < 2^24 keeps float32 lanes exact up to d = 1024.
MAX_DIM_INT8_QUERY = 1024
MAX_RESULTS = 10_000_000     # B * min(k, N) entries per call (int64 ids + float32 scores: 120 MB)
MAX_THREADS = 256            # threads one scan may split the item range over

# ------------------------------------------------------------------------------------------------ bundle/
MAX_VERSION_CHARS = 128      # a model version is a directory name
MAX_CHANNEL_CHARS = 64       # a registry channel name
# A manifest claiming more for one file is refused before any transfer.
MAX_FILE_BYTES = 1 << 34     # bytes (16 GiB)
HASH_BUFFER_BYTES = 1 << 18  # one reused 256 KiB buffer: hashing a bundle allocates nothing per block

# ------------------------------------------------------------------------------------------------ fleet/
MAX_CHUNK_BYTES = 1 << 20    # bytes per fetch reply (1 MiB): bounds the reply frame and the memory per transfer
# bytes a node asks per fetch call; 256 KiB keeps the transfer's buffers (reply frame, decoded chunk, socket
# buffer) small on both ends during a swap.
SYNC_CHUNK_BYTES = 256 << 10
SYNC_TIMEOUT_SECONDS = 10.0  # s per RPC call of the sync loop
SYNC_KEEP = 3                # bundle versions kept on disk (>= 2 so that a rollback target stays)
SYNC_POLL_SECONDS = 30.0     # s between registry polls while it answers
SYNC_MAX_BACKOFF_SECONDS = 300.0   # s: the poll interval backs off from 1 s up to this while it is unreachable
# With peers, wait a random 0..this before fetching a new version, so nodes that start later find it on a peer
# instead of all hitting the registry at once.
SYNC_FETCH_JITTER_SECONDS = 2.0    # s
SYNC_DISCOVERY_GRACE_SECONDS = 3.0  # s the first check waits for zeroconf to find a registry
MAX_SKIPPED_VERSIONS = 50    # versions remembered as skipped (oldest forgotten first): bounds state.json and health
MAX_SERVED_VERSIONS = 50     # versions remembered as served (the rollback history)
MAX_BOOT_ERRORS = 10         # refused bundles listed in health
MAX_ERROR_CHARS = 500        # characters of one error kept in sync state / health
NODE_ANNOUNCE_SECONDS = 5.0  # s between a node's zeroconf TXT refreshes (load, version)
REGISTRY_ANNOUNCE_SECONDS = 1.0    # s between the registry's rescans of its bundle directory
ZEROCONF_RESOLVE_MS = 3000   # ms to resolve one announced service
NODE_DOWN_SECONDS = 5.0      # s a FleetClient routes around a node that failed to answer

# ------------------------------------------------------------------------------------------------ events/
EVENT_DB = "events.db"         # the node's event log, in its state directory
PSEUDONYM_KEY_FILE = "pseudonym.key"   # the HMAC key, in the state directory unless configured elsewhere
PSEUDONYM_KEY_BYTES = 32       # 256-bit HMAC-SHA256 key
PSEUDONYM_HEX_CHARS = 32       # pseudonym length: the first 128 bits of the HMAC (collisions: ~2^64 shoppers)
MAX_EVENT_ID_CHARS = 128       # a client's event id (idempotent retries)
EVENT_LOG_MAX_BYTES = 1 << 30  # bytes of live rows before oldest-first compaction (1 GiB)
EVENT_RETENTION_SECONDS = 30 * 86400    # s: events older than this are erased (GDPR storage limitation)
SESSION_TTL_SECONDS = 7 * 86400         # s: events older than this are not restored into sessions at boot
COMPACT_EVERY_SECONDS = 60.0   # s between retention / size compactions (also after every COMPACT_EVERY_ROWS)
COMPACT_EVERY_ROWS = 100_000   # rows inserted between size checks
COMPACT_FRACTION = 0.1         # of the rows dropped, oldest first, when the size cap is reached
CHECKPOINT_SECONDS = 0.5       # s between WAL checkpoints (own thread; bounds the WAL to ~0.5 s of events)
REOPEN_SECONDS = 1.0           # s between attempts to reopen a log that failed (disk full, read-only, gone)
MAX_WRITE_GROUP = 20_000       # events committed in one transaction at most (group commit)
ANALYTICS_MINUTES = 60         # minutes of per-minute analytics buckets kept (the last hour)
ANALYTICS_TOP_ITEMS = 10       # items listed per event type in stats / metrics
ANALYTICS_ITEMS_PER_MINUTE = 5000   # distinct items counted per minute and type (Misra-Gries bound)
HLL_BITS = 12                  # HyperLogLog registers 2^12 per minute: ~1.6 % error on distinct shoppers

# ------------------------------------------------------------------------------------------------ upstream (fleet/)
# Shipping a node's committed events to the trainer side (fleet/shipper.py) and storing them (fleet/collector.py).
COLLECTOR_DB = "collected.db"  # the collector's SQLite file, in its --collect directory
UPSTREAM_STATE = "upstream.json"   # the node's shipping cursor (last acknowledged seq), in its state directory
NODE_ID_FILE = "node_id"       # the node's generated id when sync.node_id is not set, in its state directory
SHIP_MAX_BATCH_BYTES = 512 * 1024   # bytes of event fields per batch at most (well inside MAX_FRAME_BYTES)
SHIP_HEARTBEAT_SECONDS = 10.0  # s between reachability checks of an idle collector (health tells the truth)
SHIP_BATCH_EVENTS = 1000       # events per ingest batch (one commit at the collector; ~60 KB of MessagePack)
MAX_INGEST_EVENTS = 10_000     # events one ingest call may carry (bounds one commit and one frame)
SHIP_INTERVAL_SECONDS = 1.0    # s between looks at the log when everything is shipped (bounds event-to-collector)
SHIP_MAX_BACKOFF_SECONDS = 60.0   # s: retry delay doubles from SHIP_INTERVAL_SECONDS up to this while refused
SHIP_TIMEOUT_SECONDS = 30.0    # s for one ingest round trip (a commit of MAX_INGEST_EVENTS with fsync fits)
MAX_FUTURE_SKEW_SECONDS = 300.0   # s an event's time may lie ahead of the collector's clock
COLLECTOR_RETENTION_SECONDS = 90 * 86400   # s collected events are kept (by receive time) for training
NATS_SUBJECT_PREFIX = "edgerec.events"   # JetStream subject of a node's batches: <prefix>.<node id>
NATS_STREAM = "EDGEREC_EVENTS"

# ------------------------------------------------------------------------------------------------ ops/
METRICS_HOST = "127.0.0.1"   # the Prometheus endpoint listens on loopback unless configured
MAX_HTTP_CONNECTIONS = 16    # concurrent scrapes; more are closed at once
HTTP_TIMEOUT_SECONDS = 5.0   # s to send the request head, and to take the response
HTTP_HEAD_BYTES = 8192       # bytes of a scrape's request head
# request latency histogram buckets (s): 100 µs .. 2.5 s
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)

# The status page's ring of the last minutes (ops/status.py): memory is at most STATUS_BUCKETS x (methods + 1) x
# (STATUS_OCTAVES x STATUS_BINS_PER_OCTAVE + 2) x 4 bytes, about 75 KiB per method ever called.
STATUS_BUCKET_SECONDS = 10.0   # s per time bucket
STATUS_BUCKETS = 90            # buckets kept: 15 minutes
STATUS_BINS_PER_OCTAVE = 8     # latency histogram bins per octave (p50 / p99 within half a bin, 4.4 %)
STATUS_OCTAVES = 26            # 1 µs .. 2^26 µs (67 s); slower requests land in the top bin
STATUS_MAX_CODES = 32          # distinct error codes counted per bucket; more fold into code 0
STATUS_WINDOW_SECONDS = 60     # default window of the figures, s
STATUS_REFRESH_MS = 2000       # the page's refresh period, ms

# [model] providers (serving/encoder.py): ONNX Runtime knows about 20 execution providers; a longer list is a mistake
MAX_PROVIDERS = 16
MAX_PROVIDER_CHARS = 64
