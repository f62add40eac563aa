/*
 * server.h - the embedded mode: a supervised nats-server child process.
 *
 * harmonylite writes a nats-server config into <data_dir>/nats/nats-server.conf
 * (JetStream on, store dir <data_dir>/nats/jetstream, client listener
 * nats.bind_address, cluster listener and routes from nats.cluster_addr /
 * nats.cluster_peers, `include` of nats.server_config when set), starts
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

/* Renders the generated nats-server config for c into out (used by start; unit-tested). */
hl_status hl_nats_server_render_config(const hl_config *c, hl_buf *out);

/* Writes the config, starts the child and the supervisor thread. The child's
 * client port is accepting connections when this returns HL_OK (waits up to
 * timeout_ms). c must outlive the server. */
hl_status hl_nats_server_start(hl_nats_server **out, const hl_config *c, int timeout_ms);

/* "nats://127.0.0.1:<port>" (0.0.0.0/:: bind addresses become loopback). */
const char *hl_nats_server_client_url(const hl_nats_server *s);

/* True while the child process is alive. Thread-safe. */
bool hl_nats_server_running(const hl_nats_server *s);
/* Number of times the child was restarted after dying. Thread-safe. */
uint64_t hl_nats_server_restarts(const hl_nats_server *s);

/*
 * Re-renders the config from the hl_config given to start (the caller changed
 * e.g. nats.cluster_peers after a DNS lookup), checks it with `nats-server -t`
 * and, when it differs from the running one, replaces the file and sends
 * SIGHUP. nats-server reloads routes, authorization and logging this way; a
 * changed listen address, store dir or server_name needs a restart. Not
 * thread-safe against a concurrent change of the hl_config itself.
 */
hl_status hl_nats_server_reload(hl_nats_server *s);

/* Pid of the current child, 0 while none is running (between a death and its
 * restart). For diagnostics and tests; the pid is stale once the child dies. */
int hl_nats_server_pid(const hl_nats_server *s);

/* Stops supervising, sends SIGUSR2 (lame duck), waits up to timeout_ms for the
 * child to exit, then SIGKILLs it; frees s. NULL is a no-op. */
void hl_nats_server_stop(hl_nats_server *s, int timeout_ms);

#endif
