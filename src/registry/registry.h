/*
 * registry.h - the cluster's schema registry: which node runs which schema.
 *
 * A NATS KV bucket (schema.registry_bucket) holds one entry per live node,
 * key "node.<id>", value a small JSON object (docs/protocol.md §8): its
 * current and previous schema hash, replicated tables, harmonylite version,
 * start time and last heartbeat. The bucket's max age is three heartbeats:
 * a node that stops heartbeating drops out by itself; a graceful stop
 * deletes its entry at once.
 *
 * The running node (hl_registry_start) writes its entry from a thread of
 * its own every schema.heartbeat seconds (at once when its schema changes),
 * reads every live entry back and keeps the cluster view and the readiness
 * verdict (hl_registry_view) for the engine to publish. Nothing here blocks
 * the engine: every KV call runs on the registry thread.
 *
 * Entries come from the network: each is checked (key and node id agree,
 * hashes are 64 hex digits, bounded sizes) and a bad one is logged and left
 * out, never trusted.
 */
#ifndef HL_REGISTRY_H
#define HL_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/status.h"
#include "config/config.h"
#include "natsio/conn.h"
#include "natsio/kv.h"

/* Keys are HL_REG_KEY_PREFIX "<node id>". */
#define HL_REG_KEY_PREFIX "node."
/* Largest entry accepted, and most tables listed in one. */
#define HL_REG_MAX_ENTRY_BYTES (1024 * 1024)
#define HL_REG_MAX_TABLES 10000
/* Most live nodes kept in a view (more are logged and left out). */
#define HL_REG_MAX_NODES 1024

typedef struct hl_reg_entry {
    uint64_t node_id;
    char hash[65]; /* 64 lowercase hex digits */
    char prev[65]; /* previous hash, "" when none */
    char version[64];
    uint64_t started_ms, heartbeat_ms; /* wall clock of the node */
    char **tables;
    size_t ntables;
} hl_reg_entry;

void hl_reg_entry_free(hl_reg_entry *e); /* frees the tables; NULL is a no-op */
void hl_reg_entries_free(hl_reg_entry *v, size_t n);
/* The JSON value of e (malloc'd), NULL when out of memory. */
char *hl_reg_entry_encode(const hl_reg_entry *e);
/* Parses and checks the value of key; HL_ERR_DECODE with why filled when it is not a valid entry. */
hl_status hl_reg_entry_decode(const char *key, const unsigned char *v, size_t len, hl_reg_entry *out, char *why,
                              size_t whylen);

typedef enum hl_cluster_status {
    HL_CLUSTER_CONSISTENT = 0,   /* every live node runs the same schema */
    HL_CLUSTER_UPGRADING = 1,    /* not all the same, but every two nodes are compatible */
    HL_CLUSTER_INCOMPATIBLE = 2, /* some two live nodes are not compatible */
} hl_cluster_status;

const char *hl_cluster_status_name(hl_cluster_status s);
/* Two schemas are compatible when equal or one is the other's previous hash. */
bool hl_reg_compatible(const hl_reg_entry *a, const hl_reg_entry *b);
hl_cluster_status hl_cluster_status_of(const hl_reg_entry *v, size_t n);
/*
 * Whether node self (one of v) is the odd one out: no node running one of
 * the schemas the most live nodes run is compatible with it (docs/operations.md
 * states the rule). reason (may be NULL) says why when true.
 */
bool hl_cluster_odd_one_out(const hl_reg_entry *v, size_t n, uint64_t self, char *reason, size_t reasonlen);
/* The cluster view as JSON text (malloc'd): status, live nodes grouped by hash. */
char *hl_cluster_json(const hl_reg_entry *v, size_t n);
/* The cluster view for people. */
void hl_cluster_print(FILE *f, const hl_reg_entry *v, size_t n);

/* Opens the registry bucket (creating it when create) with c's settings. */
hl_status hl_registry_open_bucket(hl_kv **out, hl_nats *n, const hl_config *c, bool create);
/* Every live entry of the bucket (sorted by node id); invalid ones are logged and left out. */
hl_status hl_registry_read(hl_kv *kv, hl_reg_entry **out, size_t *n);

/* ---- the operator's commands (status.c); each returns the exit status ---- */

/* -schema-status: the local view from db_path alone (works with NATS down):
 * hashes, tables, held changesets per origin. 0, or 1 when the database cannot be read. */
int hl_schema_status_local(const hl_config *c, bool json);
/* -schema-status-cluster: every live node grouped by hash; 0 consistent or
 * upgrading, 1 incompatible or when the registry cannot be read. */
int hl_schema_status_cluster(const hl_config *c, bool json);

/* ---- the running node ---- */

typedef struct hl_registry hl_registry;

/* Starts the registry thread for node_id on connection n (which must outlive hl_registry_stop). */
hl_status hl_registry_start(hl_registry **out, const hl_config *c, hl_nats *n, uint64_t node_id);
/* The local schema: hashes as hex ("" prev: none) and the tables as /schema's JSON. Thread-safe. */
void hl_registry_set_local(hl_registry *r, const char *hash, const char *prev, const char *tables_json);
/*
 * The latest view when it changed since *gen (which it updates): *odd and
 * reason (hl_cluster_odd_one_out, or false with the registry unreachable),
 * *cluster_json (malloc'd; caller frees). False when nothing changed.
 */
bool hl_registry_view(hl_registry *r, uint64_t *gen, bool *odd, char *reason, size_t reasonlen, char **cluster_json);
/* Stops the thread; remove_entry deletes this node's entry (graceful stop). NULL is a no-op. */
void hl_registry_stop(hl_registry *r, bool remove_entry);

#endif
