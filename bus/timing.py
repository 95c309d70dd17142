"""Every timing of the bus's liveness, in one place: heartbeats, silences, link upkeep, and
what the broker, edges and workers do when a peer or the broker goes quiet.

These values lean on each other (a silence limit must outlast a few heartbeats, a retry must
outlast the placement window it works around), which is why they live side by side rather
than in the modules that use them.  Seconds unless the name ends in ``_MS``.  The broker's
``--peer-timeout`` and the edge's ``--bus-loss-timeout`` default to the values here.
"""
from __future__ import annotations

# --- links: ZeroMQ options of every bus socket (bus/loopsock.py tune_link) -----------------
# Without these a cut link is noticed only when TCP gives up (minutes) and a healed one is used
# again only at the kernel's next doubling retransmission.  ZeroMQ's own PING/PONG (ZMTP 3.1,
# answered by libzmq's I/O thread, so a busy event loop does not count as a dead link) notices a
# stalled connection; the connecting side then drops it and reconnects at once, and keeps
# retrying every LINK_RECONNECT_MIN_MS..LINK_RECONNECT_MAX_MS while the link is down.
LINK_HEARTBEAT_MS = 500         # a ZMTP PING when nothing else was sent for this long
LINK_TIMEOUT_MS = 2000          # no traffic at all for this long: the connection is dead
LINK_RECONNECT_MIN_MS = 100     # first reconnection attempt after a connection is lost ...
LINK_RECONNECT_MAX_MS = 500     # ... and the longest wait between attempts
LINK_CONNECT_TIMEOUT_MS = 500   # a SYN lost in a cut is retried after this, not the kernel's backoff
LINK_HANDSHAKE_MS = 3000        # a connection accepted but never greeted (half-healed link) is dropped
# The broker's listening sockets keep a silent connection this much longer than --peer-timeout:
# it is the peers that notice a cut and reconnect, the broker only waits for them.
BROKER_LINK_MARGIN_MS = 1000

# --- the broker's view of its peers (broker/router.py) -------------------------------------
# How often the broker probes every peer (a HEARTBEAT naming its instance); a probe to a vanished
# peer fails at once.  Also the router loop's longest sleep, so housekeeping runs this often.
BROKER_PROBE_INTERVAL = 0.25
# Seconds of silence before a still-connected peer counts as dead (`--peer-timeout`).  A peer
# whose connection is gone is noticed by the next probe; this only catches a stuck one or a cut
# link, so it is generous: a busy edge may not heartbeat for a few seconds, and a link between
# machines cut for 10 s (plus ~1 s to reconnect) must not cost a worker or an edge its channels.
PEER_LIVENESS = 15.0
# A peer closes its connection only after this much silence on it (LINK_TIMEOUT_MS), so a
# connection that ends after a silence this long most likely died in a cut link, and the peer
# is reconnecting; one that ends right after a word from its peer died with the process.
CUT_SILENCE = LINK_TIMEOUT_MS / 1000
# Right after a (re)start the broker knows no peer until it heartbeats: for this long (or
# --peer-timeout if shorter) messages for unknown peers are parked rather than bounced.
BROKER_WARM_UP = 3.0
# A worker not heard from for this long gets no new connect or join while one that was heard
# from exists: workers heartbeat every PEER_HEARTBEAT_INTERVAL from their event loop (and any
# reply counts), so a longer silence means a handler is blocking it (time.sleep, a CPU-bound
# call).  Two intervals plus 0.2 s for a loaded machine's scheduling: a worker misjudged as
# silent only misses placements for a moment (and with none fresh, the one heard from last is
# chosen), while everything placed on a blocked one within this window waits for the edge to
# send it again (PLACEMENT_RETRY, which must stay longer than this).
PLACE_FRESH = 1.2
# With no live worker (a restarted broker before the first worker heartbeat, or a worker
# restart gap), joins and connects wait this long for one instead of being bounced at once;
# during the warm-up they wait at least until it ends.
WORKER_WAIT = 2.0

# --- a peer's view of the broker (bus/peer.py, for edges and workers alike) ----------------
# How often an edge or a worker tells the broker it is alive (with its load), from its own
# event loop, so a stuck loop goes silent.
PEER_HEARTBEAT_INTERVAL = 0.5
# Seconds without any frame from the broker (it probes every BROKER_PROBE_INTERVAL, so this is
# 8 probes missed) after which a peer takes the bus for down: a cut link, a dead or stuck
# broker.  Messages may have been lost meanwhile, so when the broker answers again channels are
# settled as after a broker restart (EDGE_SYNC / SYNC).  The bus sockets drop a connection after
# LINK_TIMEOUT_MS of silence, so this catches every reconnection; a plain broker restart stays
# under it or just past it (and is noticed by its new instance id instead).
BROKER_SILENCE_LIMIT = 2.0
# A new broker instance seen this soon after the bus came back from a silence is the same event
# (the new broker's first frames to us can be parked ones, then its heartbeat names it).
SAME_OUTAGE_WINDOW = 0.5

# --- edges (edge/hub.py, edge/replace.py) ----------------------------------------------------
# Clients of an edge cut off from the bus would only see their pushes stall (the edge answers
# their heartbeats itself): after this long without the broker they are closed with 1012, over
# BUS_LOSS_DRAIN seconds, and reconnect through the load balancer to an edge that has the bus
# (`--bus-loss-timeout`).  Longer than a plain broker restart (~1-2 s of silence), which must
# cost no channel.
BUS_LOSS_TIMEOUT = 5.0
BUS_LOSS_DRAIN = 2.0
# After a broker restart (or a silence) the edge lists its channels to every worker it has had
# channels on, and a live worker answers at once with its own list.  One holding channels of
# ours that has said nothing this long after is taken for dead (it died while the broker was
# down, so the new broker never heard of it and would report it only when its BROKER_WARM_UP
# ends): its channels get phx_error and phoenix.js rejoins them on a live worker.  A live
# worker answers within about half a second of our own reconnection: workers and edges lost the
# broker together and retry every 0.1-0.5 s (+ libzmq's jitter), the broker holds our EDGE_SYNC
# until the worker's first message (its queued heartbeat, sent as its connection comes up) and
# the worker answers from its loop.  The rest is for a loaded loop: 1.5 s is also how long the
# broker's placement trusts a silent worker (three missed heartbeats).
SYNC_ANSWER_TIMEOUT = 1.5
# A push that was in flight when the bus went down may have died with the broker or the link.
# One still unanswered this long after the bus is back gets an error reply, so the client hears
# of it before phoenix.js's own 10 s timeout: a worker answers a healthy push in milliseconds,
# and a reply delayed by the outage itself comes within a second of the reconnection.
OUTAGE_REPLY_AFTER = 4.0
# A connect or join still unanswered this long is sent once more for placement.  A healthy
# worker answers in milliseconds (a few hundred under load); by this time the broker has
# stopped placing on a worker that went silent when it took the first copy (PLACE_FRESH plus
# 0.5 s for the worker's last words and the broker's loop), so the copy goes to another one.
# Each request is sent again once at most.
PLACEMENT_RETRY = 1.7

# --- workers (workers/runner.py, workers/presence.py) ---------------------------------------
# After a new broker instance or a silence, a worker waits this long before telling each edge
# which of its channels it holds (SYNC), so that the peers have reconnected and resubscribed:
# what the sync sets off (terminate callbacks, presence leaves) may broadcast.
WORKER_RESYNC_DELAY = 1.0
# Presence replication between workers: every owner announces its full state this often ...
PRESENCE_ANNOUNCE_INTERVAL = 1.0
# ... and an owner silent this long (while our own announcements still come back, so the bus
# is up) has its entries dropped.
PRESENCE_OWNER_TIMEOUT = 2.5

# --- the status page (edge/status.py, workers/status.py) ------------------------------------
# Every edge and worker publishes a snapshot of itself on zchannels:status this often, from its
# own loop; the page drops a process silent for 5 s.
STATUS_SNAPSHOT_INTERVAL = 1.0
