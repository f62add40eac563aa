/*
 * manifest.h - the JSON document that describes one snapshot (docs/snapshots.md).
 *
 * A manifest is uploaded after its object, so a reader that finds a manifest
 * which parses and whose object matches its size and SHA-256 has a complete
 * snapshot. Manifests come from a store anyone with write access to the
 * bucket can fill: the parser trusts no number and no name in them.
 */
#ifndef HL_SNAPSHOT_MANIFEST_H
#define HL_SNAPSHOT_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#define HL_MANIFEST_FORMAT 1
#define HL_MANIFEST_MAX_BYTES (1u << 20) /* a manifest larger than this is refused unread */
#define HL_MANIFEST_MAX_STREAMS 4096     /* replication_log.shards is at most 1024 */
#define HL_SNAPSHOT_NAME_MAX 200         /* object and manifest names, bytes */

/* Suffixes of the two files of a snapshot: <base>.db.zst, then <base>.manifest.json. */
#define HL_SNAPSHOT_OBJECT_SUFFIX ".db.zst"
#define HL_SNAPSHOT_MANIFEST_SUFFIX ".manifest.json"

typedef struct hl_manifest_stream {
    char name[256]; /* JetStream stream name */
    uint64_t seq;   /* stream sequence up to which every message is in the snapshot */
} hl_manifest_stream;

typedef struct hl_manifest {
    int format;                            /* HL_MANIFEST_FORMAT */
    uint64_t node;                         /* node that took it */
    uint64_t epoch;                        /* that node's origin epoch */
    uint64_t created_ms;                   /* wall clock, ms since the Unix epoch */
    char version[64];                      /* harmonylite version that took it */
    char schema_hash[65];                  /* hex SHA-256 of the replicated schema (src/db/schema.c) */
    uint64_t hlc;                          /* the taking node's last hybrid logical clock */
    char object[HL_SNAPSHOT_NAME_MAX + 1]; /* name of the compressed database in the same store */
    uint64_t size;                         /* bytes of the object */
    char sha256[65];                       /* hex SHA-256 of the object */
    uint64_t db_size;                      /* bytes of the database once decompressed */
    hl_manifest_stream *streams;           /* owned */
    size_t nstreams;
} hl_manifest;

/*
 * True when name is acceptable as an object or manifest name: 1 to
 * HL_SNAPSHOT_NAME_MAX bytes of [A-Za-z0-9._-], not starting with '.'
 * (so never "..", never a path, never a dot file of the dir store).
 */
int hl_snapshot_name_ok(const char *name);

/*
 * Serialises m as JSON (pretty printed). Returns a malloc'd string the caller
 * frees, or NULL when out of memory.
 */
char *hl_manifest_to_json(const hl_manifest *m);

/*
 * Parses len bytes of JSON into *m (which it overwrites; free with
 * hl_manifest_free, also after an error). Refuses anything that is not a
 * complete, valid format-1 manifest: missing or mistyped fields, numbers out
 * of range, bad names or hashes, more than HL_MANIFEST_MAX_STREAMS streams,
 * input over HL_MANIFEST_MAX_BYTES. On error returns HL_ERR_DECODE (or
 * HL_ERR_NOMEM) and writes one line saying what is wrong to err.
 */
hl_status hl_manifest_parse(hl_manifest *m, const char *json, size_t len, char *err, size_t errlen);

/* Frees what m owns and zeroes it. NULL is a no-op. */
void hl_manifest_free(hl_manifest *m);

#endif
