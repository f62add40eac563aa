/*
 * hlc.h - hybrid logical clock: 48 bits of milliseconds, 16 bits of counter.
 *
 * A local write gets hlc = max(write_ms << 16, last + 1); seeing a remote
 * version advances last past it. So a write made after this node saw a remote
 * version always orders after it, even when wall clocks are skewed.
 */
#ifndef HL_HLC_H
#define HL_HLC_H

#include <stdbool.h>
#include <stdint.h>

#define HL_HLC_MS(h) ((h) >> 16)
/* Versions are stored as SQLite INTEGERs: never above 2^63 - 1, so 47 bits of
 * milliseconds (until the year 6429). Every version arithmetic saturates here. */
#define HL_HLC_MAX ((uint64_t)INT64_MAX)
#define HL_HLC_MAX_MS (HL_HLC_MAX >> 16)

/* Wall clock, milliseconds since the Unix epoch. */
uint64_t hl_now_ms(void);
/* Monotonic clock, milliseconds (for timeouts). */
uint64_t hl_mono_ms(void);

/* Returns the version for a local write made at wall time write_ms and stores
 * it in *last. Saturates at HL_HLC_MAX instead of wrapping. */
uint64_t hl_hlc_next(uint64_t *last, uint64_t write_ms);

/* Receive rule: *last = max(*last, remote), remote capped at HL_HLC_MAX. The
 * caller checks first that remote is not too far ahead (hl_hlc_ahead). */
void hl_hlc_observe(uint64_t *last, uint64_t remote);

/* True when version h is more than max_drift_ms ahead of wall time now_ms
 * (or above HL_HLC_MAX): such a version must not be observed or applied. */
bool hl_hlc_ahead(uint64_t h, uint64_t now_ms, uint64_t max_drift_ms);

/* Last-writer-wins order of two versions: (hlc, node) compared lexicographically.
 * Returns <0, 0, >0 like strcmp. */
int hl_version_cmp(uint64_t hlc_a, uint64_t node_a, uint64_t hlc_b, uint64_t node_b);

#endif
