/*
 * timers.h - the engine's periodic jobs (after redis's ae time events).
 *
 * A fixed table of repeating timers, each with its period and the monotonic
 * time it is next due. The event loop sleeps at most hl_timers_timeout() and
 * then calls hl_timers_run(), which runs what is due and schedules it again
 * one period later. Single-threaded: only the loop that owns it touches it.
 */
#ifndef HL_TIMERS_H
#define HL_TIMERS_H

#include <stdint.h>

#define HL_TIMERS_MAX 8

typedef void (*hl_timer_fn)(void *arg);

typedef struct hl_timers {
    struct {
        const char *name;
        uint64_t every_ms, next_ms;
        hl_timer_fn fn;
        void *arg;
    } t[HL_TIMERS_MAX];
    int n;
} hl_timers;

/* Adds a timer first due every_ms after now; returns its id, or -1 when full. */
int hl_timers_add(hl_timers *ts, const char *name, uint64_t every_ms, hl_timer_fn fn, void *arg, uint64_t now);
/* Makes timer id due at once (its next run comes one period after that). */
void hl_timers_due_now(hl_timers *ts, int id);
/* Milliseconds until the next timer is due: 0 when one is, INT_MAX without timers. */
int hl_timers_timeout(const hl_timers *ts, uint64_t now);
/* Runs every timer due at now, then schedules each one period later. */
void hl_timers_run(hl_timers *ts, uint64_t now);

#endif
