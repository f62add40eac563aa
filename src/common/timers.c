#include "common/timers.h"

#include <limits.h>

int hl_timers_add(hl_timers *ts, const char *name, uint64_t every_ms, hl_timer_fn fn, void *arg, uint64_t now)
{
    if (ts->n == HL_TIMERS_MAX || !fn || every_ms == 0)
        return -1;
    int id = ts->n++;
    ts->t[id].name = name;
    ts->t[id].every_ms = every_ms;
    ts->t[id].next_ms = now + every_ms;
    ts->t[id].fn = fn;
    ts->t[id].arg = arg;
    return id;
}

void hl_timers_due_now(hl_timers *ts, int id)
{
    if (id >= 0 && id < ts->n)
        ts->t[id].next_ms = 0;
}

int hl_timers_timeout(const hl_timers *ts, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < ts->n; i++)
        if (ts->t[i].next_ms < next)
            next = ts->t[i].next_ms;
    if (next == UINT64_MAX)
        return INT_MAX;
    if (next <= now)
        return 0;
    return next - now > INT_MAX ? INT_MAX : (int)(next - now);
}

void hl_timers_run(hl_timers *ts, uint64_t now)
{
    for (int i = 0; i < ts->n; i++) {
        if (ts->t[i].next_ms > now)
            continue;
        /* Scheduled before it runs: a job that makes itself due again
         * (hl_timers_due_now) runs on the next turn, not in a loop here. */
        ts->t[i].next_ms = now + ts->t[i].every_ms;
        ts->t[i].fn(ts->t[i].arg);
    }
}
