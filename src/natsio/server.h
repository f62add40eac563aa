/*
 * server.h - the embedded mode: a supervised nats-server child process.
 *
 * harmonylite writes a nats-server config into <data_dir>/nats/nats-server.conf
 * (JetStream on, store dir <data_dir>/nats/jetstream, client listener
 * nats.bind_address, cluster listener nats.cluster_addr, routes and leaf
 * remotes from a peer set (below), `include` of nats.server_config when set), starts
 * nats.server_bin, re-emits every line the child prints through hl_log, and
 * restarts it with exponential backoff (250 ms .. 30 s) when it dies.
 */
#ifndef HL_NATSIO_SERVER_H
#define HL_NATSIO_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/status.h"
#include "config/config.h"

typedef struct hl_nats_server hl_nats_server;

/*
 * The peer set: what the generated config connects to, apart from hl_config's
 * fixed settings. Both lists are sorted (strcmp) and free of duplicates, so
 * two sets that hold the same peers render the same text and compare equal
 * whatever order DNS answered in. Bare "host:port" routes get "nats://".
 * It changes at runtime (discovery.h); hl_nats_server_apply_peers() puts a new
 * one into the running child.
 */
typedef struct hl_peer_set {
    hl_strlist routes; /* cluster route URLs */
    hl_strlist leafs;  /* leaf node remote URLs (nats.leaf_servers) */
} hl_peer_set;

void hl_peer_set_init(hl_peer_set *p);
void hl_peer_set_free(hl_peer_set *p);
/* Inserts url in order unless present. HL_ERR_INVALID for an empty url. */
hl_status hl_peer_set_add_route(hl_peer_set *p, const char *url);
hl_status hl_peer_set_add_leaf(hl_peer_set *p, const char *url);
/* Deep copy; dst must be initialized (its contents are replaced). */
hl_status hl_peer_set_copy(hl_peer_set *dst, const hl_peer_set *src);
bool hl_peer_set_equal(const hl_peer_set *a, const hl_peer_set *b);
/* added = in `to` but not in `from`, removed = the reverse (both sorted).
 * Both must be initialized and empty. */
hl_status hl_peer_set_diff(const hl_peer_set *from, const hl_peer_set *to, hl_peer_set *added, hl_peer_set *removed);
/* The fixed part of c's peers: nats.cluster_peers entries that are URLs (the
 * dns:// and dns+srv:// ones are discovery's) and nats.leaf_servers. */
hl_status hl_peer_set_from_config(const hl_config *c, hl_peer_set *out);

/* Renders the generated nats-server config for c with peers p into out. */
hl_status hl_nats_server_render(const hl_config *c, const hl_peer_set *p, hl_buf *out);
/* The same with hl_peer_set_from_config(c) (used by start; unit-tested). */
hl_status hl_nats_server_render_config(const hl_config *c, hl_buf *out);

/* Writes the config, starts the child and the supervisor thread. The child's
 * client port is accepting connections when this returns HL_OK (waits up to
 * timeout_ms). c must outlive the server. */
hl_status hl_nats_server_start(hl_nats_server **out, const hl_config *c, int timeout_ms);
/* The same with an initial peer set (e.g. discovery's first answer) instead of
 * hl_peer_set_from_config(c). peers is copied. */
hl_status hl_nats_server_start_peers(hl_nats_server **out, const hl_config *c, const hl_peer_set *peers,
                                     int timeout_ms);

/* "nats://127.0.0.1:<port>" (0.0.0.0/:: bind addresses become loopback). */
const char *hl_nats_server_client_url(const hl_nats_server *s);

/* True while the child process is alive. Thread-safe. */
bool hl_nats_server_running(const hl_nats_server *s);
/* Number of times the child was restarted after dying. Thread-safe. */
uint64_t hl_nats_server_restarts(const hl_nats_server *s);

/*
 * Makes peers the running child's peer set: re-renders the config, checks it
 * with `nats-server -t` and, when it differs from the running one, replaces
 * the file atomically (mode 0600) and sends the child SIGHUP, nats-server's
 * config reload: routes change without a restart (leaf remotes need 2.10+), JetStream
 * stays up and no client is dropped. A config nats-server refuses leaves the
 * running file and peer set untouched. Called by discovery's thread; one
 * caller at a time (apply and reload are not reentrant against each other).
 */
hl_status hl_nats_server_apply_peers(hl_nats_server *s, const hl_peer_set *peers);

/* apply_peers with hl_peer_set_from_config() of the hl_config given to start
 * (the caller changed e.g. nats.cluster_peers). Not thread-safe against a
 * concurrent change of the hl_config itself. */
hl_status hl_nats_server_reload(hl_nats_server *s);

/* Copy of the peer set the running config was rendered from. Thread-safe. */
hl_status hl_nats_server_peers(hl_nats_server *s, hl_peer_set *out);

/* Pid of the current child, 0 while none is running (between a death and its
 * restart). For diagnostics and tests; the pid is stale once the child dies. */
int hl_nats_server_pid(const hl_nats_server *s);

/* Stops supervising, sends SIGUSR2 (lame duck), waits up to timeout_ms for the
 * child to exit, then SIGKILLs it; frees s. NULL is a no-op. */
void hl_nats_server_stop(hl_nats_server *s, int timeout_ms);

#endif
