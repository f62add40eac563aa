/*
 * conn.h - the NATS connection, JetStream context and the change-log streams.
 *
 * One connection per process. nats.c runs its own threads; callbacks given here
 * run on them and must only enqueue work (never touch SQLite or block).
 */
#ifndef HL_NATSIO_CONN_H
#define HL_NATSIO_CONN_H

#include <nats/nats.h>
#include <stdbool.h>

#include "common/status.h"
#include "natsio/nkey.h"
#include "config/config.h"

typedef struct hl_nats hl_nats;

/*
 * Connects to urls (nurls >= 1) with the credentials/TLS from c->nats
 * (user_name/user_password, seed_file, creds_file, ca_file, cert_file/key_file),
 * reconnecting forever once connected (max reconnect -1, reconnect_wait_seconds).
 * The first connection is tried connect_retries times (-1: until stop_flag is
 * set) with reconnect_wait_seconds between tries. ack_cb/ack_closure become the
 * JetStream async-publish ack handler (jsOptions.PublishAsync.AckHandler), with
 * MaxPending = max_pending. stop_flag (may be NULL) is polled between tries so a
 * shutdown is not delayed. Never logs passwords or seeds.
 */
hl_status hl_nats_connect(hl_nats **out, const hl_config *c, const char *const *urls, size_t nurls,
                          jsPubAckHandler ack_cb, void *ack_closure, int64_t max_pending,
                          const volatile int *stop_flag);

natsConnection *hl_nats_conn(hl_nats *n);
jsCtx *hl_nats_js(hl_nats *n);
/* True while the connection is CONNECTED (not reconnecting/closed). Thread-safe. */
bool hl_nats_connected(hl_nats *n);

/* Connects the way a command (or a snapshot store) does: to nats.urls, or
 * without them to this node's running embedded server: nats.bind_address, a
 * wildcard host being this machine (127.0.0.1).
 * local (may be NULL) receives that local URL, or "" when nats.urls was used. */
hl_status hl_nats_connect_node(hl_nats **out, const hl_config *c, char *local, size_t locallen);

/* Stream and subject names for shard i: "<stream_prefix>-<i>", "<subject_prefix>.<i>". */
void hl_nats_stream_name(const hl_config *c, int shard, char *buf, size_t len);
void hl_nats_subject(const hl_config *c, int shard, char *buf, size_t len);

/*
 * Creates every shard's stream if missing (file storage, c->replication_log
 * replicas / max_entries / max_bytes / max_age, discard old, duplicate window),
 * or checks an existing one (and updates it when replication_log.update_existing).
 * While JetStream is not yet available (cluster forming, no meta leader) it
 * retries every 500 ms until timeout_ms, then returns HL_ERR_TIMEOUT.
 */
hl_status hl_nats_ensure_streams(hl_nats *n, const hl_config *c, int timeout_ms, const volatile int *stop_flag);

/* First and last sequence currently in a stream, as the server reports them:
 * 0/0 when it never held a message; first = last + 1 when every message was
 * removed (age/purge), so a reader can still see how far the stream got.
 * HL_ERR_NOT_FOUND when the stream does not exist. */
hl_status hl_nats_stream_bounds(hl_nats *n, const char *stream, uint64_t *first, uint64_t *last);

/*
 * Gives back a subscription the caller is done with, in place of
 * natsSubscription_Destroy. Its interest ends at once (the consumer is not
 * deleted on the server: an ephemeral one goes by itself), but it is freed
 * only once no message for it can still be on its way through nats.c's reader:
 * at hl_nats_close, or after some seconds. nats.c 3.4.1's reader looks a
 * subscription up and then locks it without holding a reference, so a
 * subscription freed while a message for it is in flight is used after free.
 * NULL is a no-op.
 */
void hl_nats_retire_sub(hl_nats *n, natsSubscription *sub);

/* Waits for outstanding async publishes (up to timeout_ms), flushes and closes,
 * then frees the retired subscriptions. NULL is a no-op. */
void hl_nats_close(hl_nats *n, int timeout_ms);
/* At exit, after every hl_nats_close: waits up to timeout_ms for nats.c's own
 * threads to end (they may call back into closed connections until then),
 * then frees the closed connections. No nats.c use is possible afterwards. */
void hl_nats_shutdown(int timeout_ms);

#endif
