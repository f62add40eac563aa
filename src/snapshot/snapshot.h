/*
 * snapshot.h - taking a snapshot of the database and restoring one
 * (docs/snapshots.md).
 *
 * A snapshot is a consistent copy of db_path taken without blocking the
 * application's writers (VACUUM INTO on a read connection), with this node's
 * capture machinery removed and the replicated state kept, zstd-compressed,
 * uploaded to the configured store, then its manifest.
 */
#ifndef HL_SNAPSHOT_H
#define HL_SNAPSHOT_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"
#include "config/config.h"
#include "snapshot/manifest.h"

/*
 * Takes a snapshot of c->db_path now and uploads it to c's store, then
 * removes all but the newest snapshot.keep. On success writes where it went
 * ("/backups/x/snap-....manifest.json", "s3://bucket/prefix/snap-...") to where. On failure returns an
 * error and writes one line saying why to err; snapshots already in the store
 * are left as they were.
 */
hl_status hl_snapshot_save(const hl_config *c, char *where, size_t wlen, char *err, size_t errlen);

/*
 * The same from a running node (src/snapshot/schedule.c): also returns the
 * manifest stored (*m, free with hl_manifest_free) and its name, and leaves
 * libcurl's global state initialised (the caller called hl_store_curl_init
 * before starting its threads).
 */
hl_status hl_snapshot_save_manifest(const hl_config *c, hl_manifest *m, char mname[HL_SNAPSHOT_NAME_MAX + 1],
                                    char *where, size_t wlen, char *err, size_t errlen);

/* What hl_snapshot_restore did. */
typedef enum hl_restore_result {
    HL_RESTORE_DONE = 0,    /* a snapshot was restored into db_path */
    HL_RESTORE_HAS_DATA,    /* db_path has data and force was not given: nothing done */
    HL_RESTORE_NO_SNAPSHOT, /* the store holds no snapshot: nothing done, start empty */
} hl_restore_result;

/*
 * For an init container, before the application starts: when db_path is
 * missing or empty (or force), downloads the newest snapshot that verifies
 * (size, SHA-256, integrity_check, schema hash), writes it beside db_path,
 * fsyncs, renames it into place and fsyncs the directory. Snapshots that do
 * not verify are logged and skipped for the next older one. Fails when
 * snapshots exist but none verifies, or on an I/O or store error; err says why.
 */
hl_status hl_snapshot_restore(const hl_config *c, bool force, hl_restore_result *res, char *info, size_t infolen,
                              char *err, size_t errlen);

/*
 * For a running node behind the streams' retention (src/snapshot/catchup.c):
 * downloads the newest snapshot that verifies (as -restore does) and whose
 * position for each of the n streams is at least need[i] (0: any), into a new
 * dot file beside db_path whose name is written to path; the caller deletes
 * it. info describes it. HL_ERR_NOT_FOUND: no snapshot, or none covers the
 * gap; other errors: the store or every covering snapshot failed. err says
 * why. Stops early when *stop becomes nonzero.
 */
hl_status hl_snapshot_fetch_covering(const hl_config *c, int n, char *const *streams, const uint64_t *need,
                                     const volatile int *stop, char *path, size_t pathlen, char *info, size_t infolen,
                                     char *err, size_t errlen);

#endif
