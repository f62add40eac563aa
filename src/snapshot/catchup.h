/*
 * catchup.h - a running node behind the streams' retention catching up from
 * the newest snapshot that covers its gap, without replacing its database
 * (docs/snapshots.md, "Catching up").
 *
 * A thread downloads and verifies the snapshot beside db_path; the engine
 * thread then merges it a bounded transaction per hl_catchup_turn
 * (hl_db_merge_*), moves its positions up and deletes the file.
 */
#ifndef HL_CATCHUP_H
#define HL_CATCHUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "config/config.h"
#include "db/db.h"

/* Snapshot rows merged per write transaction: the application's writers wait
 * for one such transaction at most. */
#define HL_CATCHUP_BATCH_ROWS 2000

typedef struct hl_catchup hl_catchup;

typedef enum hl_catchup_state {
    HL_CATCHUP_DOWNLOADING = 0, /* looking for, downloading and verifying a covering snapshot */
    HL_CATCHUP_WAITING,         /* no snapshot covers the gap (yet): tried again periodically; see the reason */
    HL_CATCHUP_MERGING,         /* merging, a batch per hl_catchup_turn */
    HL_CATCHUP_DONE,            /* merged and positions moved: start the fetchers from the recorded positions */
} hl_catchup_state;

/* True when c names a snapshot store a catch-up can read. */
bool hl_catchup_configured(const hl_config *c);

/*
 * Starts catching up n streams: need[i] is the position the snapshot must
 * reach on stream i (the stream's first sequence - 1; 0: not behind). wake
 * (may be NULL) is called from the download thread when there is work for
 * the engine. The engine thread owns the result.
 */
hl_status hl_catchup_start(hl_catchup **out, const hl_config *c, hl_db *d, int n, char *const *streams,
                           const uint64_t *need, void (*wake)(void *), void *wake_arg);
/* One engine turn: picks up a finished download, merges one batch. reason
 * receives what /readyz says. */
hl_catchup_state hl_catchup_turn(hl_catchup *cu, char *reason, size_t len);
/* True while there is merge work to do at once (the engine does not sleep). */
bool hl_catchup_busy(const hl_catchup *cu);
/* Rows merged so far, in total, across all attempts. */
uint64_t hl_catchup_rows(const hl_catchup *cu);
/* Stops the download thread, deletes the downloaded file; NULL is a no-op. */
void hl_catchup_free(hl_catchup *cu);

#endif
