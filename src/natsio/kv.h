/*
 * kv.h - JetStream key-value buckets (nats.c's KV API), for cluster state that
 * is not a changeset: the schema registry, the snapshot lease, the object store.
 *
 * A bucket is a stream "KV_<bucket>"; a key's revision is the stream sequence
 * of its last write, so revisions only grow. Values coming back from the
 * network are checked against the handle's max_value_bytes, and keys and
 * revisions seen by a watch are validated before anyone sees them.
 *
 * Every call but the watch's reads blocks for one to three JetStream requests
 * (each up to the connection's JetStream wait, 5 s); none may be made from a nats.c
 * callback. Free every hl_kv_watcher and hl_kv before hl_nats_close().
 * An hl_kv may be used from several threads at once; an hl_kv_watcher is read
 * by one thread (hl_kv_watch_fd is safe anywhere).
 */
#ifndef HL_NATSIO_KV_H
#define HL_NATSIO_KV_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "natsio/conn.h"

/* Longest key accepted (ours; NATS subjects have no fixed limit). */
#define HL_KV_MAX_KEY 255
/* Longest bucket name accepted. */
#define HL_KV_MAX_BUCKET 64
/* Default and largest max_value_bytes: a value is one message, so it must also
 * fit the server's max_payload. */
#define HL_KV_DEFAULT_VALUE_BYTES (1024 * 1024)
#define HL_KV_MAX_VALUE_BYTES (64 * 1024 * 1024)

typedef struct hl_kv hl_kv;
typedef struct hl_kv_watcher hl_kv_watcher;

typedef struct hl_kv_opts {
    int history;             /* revisions kept per key, 1..64 (0: 1) */
    int64_t ttl_ms;          /* bucket max age: every revision expires this long after it was
                              * written (0: never). Per-key TTL needs nats-server >= 2.11; unused */
    int replicas;            /* 1..5 (0: 1) */
    int64_t max_value_bytes; /* largest value put or accepted (0: HL_KV_DEFAULT_VALUE_BYTES) */
    int64_t max_bytes;       /* bucket size limit (0: unlimited); a full bucket refuses writes */
    bool memory;             /* memory storage instead of file storage */
    bool bind_only;          /* never create: only max_value_bytes is used */
} hl_kv_opts;

/*
 * Binds to bucket, creating it with opts when it does not exist. opts NULL or
 * opts->bind_only: bind only, HL_ERR_NOT_FOUND when missing (values are then
 * bounded by opts->max_value_bytes, or HL_KV_DEFAULT_VALUE_BYTES). An existing
 * bucket created with other settings is refused (HL_ERR_CONFIG, logged), never
 * changed. HL_ERR_INVALID for a bad name or option.
 */
hl_status hl_kv_open(hl_kv **out, hl_nats *n, const char *bucket, const hl_kv_opts *opts);
/* Frees the handle; the bucket stays on the server. NULL is a no-op. */
void hl_kv_free(hl_kv *kv);
/* Deletes the bucket and everything in it from the server. */
hl_status hl_kv_destroy_bucket(hl_nats *n, const char *bucket);

/* True when key is a valid key: 1..HL_KV_MAX_KEY of [A-Za-z0-9_=/\\.-], no
 * empty dot-separated token. */
bool hl_kv_valid_key(const char *key);

/*
 * The current value of key: *value (malloc'd, NUL-terminated, caller frees;
 * may be NULL), *len and *revision (either may be NULL). HL_ERR_NOT_FOUND when
 * the key never existed, was deleted or expired; HL_ERR_TOO_LARGE when the
 * stored value is over max_value_bytes; HL_ERR_TIMEOUT / HL_ERR_NATS when the
 * server does not answer.
 */
hl_status hl_kv_get(hl_kv *kv, const char *key, unsigned char **value, size_t *len, uint64_t *revision);
/* Writes key unconditionally; *revision (may be NULL) gets the new revision.
 * HL_ERR_TOO_LARGE for a value over max_value_bytes (nothing sent), or over
 * the bucket's or the server's limit (refused by the server). */
hl_status hl_kv_put(hl_kv *kv, const char *key, const void *value, size_t len, uint64_t *revision);
/* Writes key only if it has no value (never written, deleted or expired);
 * HL_ERR_CONFLICT when it has one. */
hl_status hl_kv_create(hl_kv *kv, const char *key, const void *value, size_t len, uint64_t *revision);
/* Writes key only if its current revision is expected (compare-and-set);
 * HL_ERR_CONFLICT when somebody wrote or deleted it since. */
hl_status hl_kv_update(hl_kv *kv, const char *key, const void *value, size_t len, uint64_t expected,
                       uint64_t *revision);
/* Deletes key (a delete marker; history is kept). Deleting an absent key is not an error. */
hl_status hl_kv_delete(hl_kv *kv, const char *key);

typedef enum hl_kv_op {
    HL_KV_PUT = 1,
    HL_KV_DELETE = 2,    /* deleted or purged: value is NULL */
    HL_KV_CAUGHT_UP = 3, /* every value current when the watch started was delivered (once) */
} hl_kv_op;

typedef struct hl_kv_entry {
    hl_kv_op op;
    char *key; /* NULL for HL_KV_CAUGHT_UP */
    unsigned char *value;
    size_t len;
    uint64_t revision;
} hl_kv_entry;

void hl_kv_entry_free(hl_kv_entry *e);

/*
 * Watches keys matching pattern (a key, or with "*" for one token and ">" for
 * the rest, e.g. "schema.>"). The current value (or delete marker) of each
 * matching key is delivered first, then HL_KV_CAUGHT_UP, then every later
 * change in revision order. A thread reads the entries into a bounded queue
 * (it stops reading while the queue is full, and JetStream's flow control
 * holds the rest on the server) and makes hl_kv_watch_fd() readable while
 * entries wait.
 */
hl_status hl_kv_watch(hl_kv *kv, const char *pattern, hl_kv_watcher **out);
/* An fd to poll() for POLLIN: readable while hl_kv_watch_next() has something to return. */
int hl_kv_watch_fd(const hl_kv_watcher *w);
/*
 * The next entry (*out, caller frees with hl_kv_entry_free), waiting up to
 * timeout_ms (0: do not wait). HL_ERR_TIMEOUT: nothing yet. An entry that
 * fails the checks is logged and returned as its status, so the caller knows
 * something was refused; later entries still follow: HL_ERR_DECODE (bad key,
 * revision not above the previous one, unknown operation; *out NULL) or
 * HL_ERR_TOO_LARGE (value over max_value_bytes; *out names the key and
 * revision, value NULL, len 0). HL_ERR_NATS once the watch ended (the
 * connection closed): it stays ended, open a new one.
 */
hl_status hl_kv_watch_next(hl_kv_watcher *w, int timeout_ms, hl_kv_entry **out);
/* Stops the reader thread and frees the watch. NULL is a no-op. */
void hl_kv_watch_free(hl_kv_watcher *w);

#endif
