/*
 * watch.c - when to look for new commits of the application.
 *
 * inotify on the database's directory wakes the engine when the database or
 * its -wal file is written. A commit writes its frames to the -wal file (the
 * inotify event) before it updates the wal-index header in the -shm file
 * through mmap (no event), with an fsync in between under synchronous = FULL.
 * A wake-up can therefore find nothing new, and with a long-lived application
 * connection no later event comes. After every wake-up from the files the
 * watcher asks for another look at 1, 2, 4 ... ms, then every RECHECK_MAX_MS,
 * for RECHECK_WINDOW_MS: a PRAGMA data_version each for the engine, and
 * nothing at all once the files are quiet. The polling interval (or, without
 * it, the 5 s heartbeat) is the fallback: a commit is late, never lost.
 *
 * While the application writes hard, looking at every event would make the
 * engine capture after nearly every commit: a write transaction of its own
 * each time (and the publisher's delete of the acknowledged changeset), and
 * each one the application's next commit runs into, to sleep in SQLite's
 * busy handler for a millisecond or more. So after a capture that found the
 * application writing faster than BUSY_ROWS_PER_MS since the previous one,
 * the watcher holds further looks for BUSY_HOLD_MS: events meanwhile only
 * note that a look is due, and it comes when the hold ends. A writer slower
 * than that (1,000 single-row commits a second, isolated writes) is never
 * held, so its lag is unchanged.
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"
#include "db/db.h"

#define RECHECK_FIRST_MS 1
#define RECHECK_MAX_MS 100
#define RECHECK_WINDOW_MS 5000
#define HEARTBEAT_LOOK_MS 5000 /* without a polling interval */
#define BUSY_ROWS_PER_MS 8     /* a capture rate above this (8,000 rows/s) means a busy writer */
#define BUSY_HOLD_MS 10        /* then the next look waits this long after the capture */

struct hl_watch {
    int fd; /* inotify, -1 when unavailable */
    char *db_base, *wal_base;
    int poll_ms; /* polling_interval; 0: inotify alone (and the heartbeat look) */
    uint64_t last_look;
    uint64_t recheck_at, recheck_end, recheck_step; /* recheck_end 0: no re-checks due */
    uint64_t last_capture;                          /* when the last capture that found rows ended */
    uint64_t hold_until;                            /* no look before this (a busy writer) */
    bool held;                                      /* a look came due during the hold */
};

hl_status hl_watch_open(hl_watch **out, const char *db_path, int polling_interval_ms)
{
    hl_watch *w = calloc(1, sizeof *w);
    char *p1 = strdup(db_path), *p2 = strdup(db_path);
    hl_status st = HL_OK;
    *out = NULL;
    if (!w || !p1 || !p2) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    w->fd = -1;
    w->poll_ms = polling_interval_ms;
    w->last_look = hl_mono_ms();
    const char *dir = dirname(p1);
    const char *base = basename(p2);
    size_t wl = strlen(base) + 5;
    w->db_base = strdup(base);
    w->wal_base = malloc(wl);
    if (!w->db_base || !w->wal_base) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    snprintf(w->wal_base, wl, "%s-wal", base);
    w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->fd < 0 || inotify_add_watch(w->fd, dir, IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) < 0) {
        hl_logf(HL_LOG_WARN, "inotify unavailable (%s): relying on polling_interval", strerror(errno));
        if (w->fd >= 0)
            close(w->fd);
        w->fd = -1;
    }
out:
    free(p1);
    free(p2);
    if (st)
        hl_watch_free(w);
    else
        *out = w;
    return st;
}

void hl_watch_free(hl_watch *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    free(w->db_base);
    free(w->wal_base);
    free(w);
}

int hl_watch_fd(const hl_watch *w)
{
    return w ? w->fd : -1;
}

int hl_watch_poll_fd(const hl_watch *w, uint64_t now)
{
    /* A look is already due when the hold ends: further events change
     * nothing, and waking for each (one per application commit) would cost
     * the engine a wake-up and the application a busier machine. They wait
     * in the inotify queue, merged. */
    if (!w || (w->held && now < w->hold_until))
        return -1;
    return w->fd;
}

int hl_watch_timeout(const hl_watch *w, uint64_t now)
{
    uint64_t due = UINT64_MAX;
    if (w->recheck_end)
        due = w->recheck_at;
    uint64_t every = w->poll_ms > 0 ? (uint64_t)w->poll_ms : HEARTBEAT_LOOK_MS;
    if (w->last_look + every < due)
        due = w->last_look + every;
    if (w->held)
        due = w->hold_until; /* until then a look is only noted */
    if (due <= now)
        return 0;
    return due - now > INT_MAX ? INT_MAX : (int)(due - now);
}

/* Drains inotify events; true when one concerns the database or its WAL. */
static bool touched(hl_watch *w)
{
    char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
    bool hit = false;
    for (;;) {
        ssize_t n = read(w->fd, buf, sizeof buf);
        if (n <= 0)
            break;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if (ev->len && (strcmp(ev->name, w->db_base) == 0 || strcmp(ev->name, w->wal_base) == 0))
                hit = true;
            p += sizeof *ev + ev->len;
        }
    }
    return hit;
}

bool hl_watch_after_poll(hl_watch *w, bool readable, bool timed_out, uint64_t now)
{
    bool look = false;
    if (readable && w->fd >= 0 && touched(w)) {
        /* Look now, and again on the schedule: this commit (or one whose
         * event was merged with it) may not be visible yet. */
        look = true;
        w->recheck_step = RECHECK_FIRST_MS;
        w->recheck_at = now + w->recheck_step;
        w->recheck_end = now + RECHECK_WINDOW_MS;
    } else if (w->recheck_end && now >= w->recheck_at) {
        look = true;
        w->recheck_step = w->recheck_step * 2 < RECHECK_MAX_MS ? w->recheck_step * 2 : RECHECK_MAX_MS;
        w->recheck_at = now + w->recheck_step;
        if (w->recheck_at > w->recheck_end)
            w->recheck_end = 0;
    }
    /* The fallback poll, or without one the heartbeat's look (one PRAGMA). */
    uint64_t every = w->poll_ms > 0 ? (uint64_t)w->poll_ms : HEARTBEAT_LOOK_MS;
    if (timed_out && now - w->last_look >= every)
        look = true;
    if (look && now < w->hold_until) {
        w->held = true; /* the capture comes when the hold ends */
        look = false;
    } else if (w->held && now >= w->hold_until) {
        look = true;
    }
    if (look) {
        w->held = false;
        w->last_look = now;
    }
    return look;
}

void hl_watch_captured(hl_watch *w, uint64_t rows, uint64_t now)
{
    if (!w || !rows)
        return;
    uint64_t since = w->last_capture ? now - w->last_capture : UINT64_MAX;
    w->last_capture = now;
    if (since != UINT64_MAX && rows > BUSY_ROWS_PER_MS * (since + 1))
        w->hold_until = now + BUSY_HOLD_MS;
}
