#include "common/hlc.h"

#include <time.h>

uint64_t hl_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t hl_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t hl_hlc_next(uint64_t *last, uint64_t write_ms)
{
    uint64_t phys = (write_ms < HL_HLC_MAX_MS ? write_ms : HL_HLC_MAX_MS) << 16;
    uint64_t h = phys > *last ? phys : *last < HL_HLC_MAX ? *last + 1 : HL_HLC_MAX;
    *last = h;
    return h;
}

void hl_hlc_observe(uint64_t *last, uint64_t remote)
{
    if (remote > HL_HLC_MAX)
        remote = HL_HLC_MAX;
    if (remote > *last)
        *last = remote;
}

bool hl_hlc_ahead(uint64_t h, uint64_t now_ms, uint64_t max_drift_ms)
{
    if (h > HL_HLC_MAX)
        return true;
    uint64_t limit =
        max_drift_ms < HL_HLC_MAX_MS && now_ms < HL_HLC_MAX_MS - max_drift_ms ? now_ms + max_drift_ms : HL_HLC_MAX_MS;
    return HL_HLC_MS(h) > limit;
}

int hl_version_cmp(uint64_t hlc_a, uint64_t node_a, uint64_t hlc_b, uint64_t node_b)
{
    if (hlc_a != hlc_b)
        return hlc_a < hlc_b ? -1 : 1;
    if (node_a != node_b)
        return node_a < node_b ? -1 : 1;
    return 0;
}
