/*
 * log.h - one line per event, console or JSON.
 *
 * Thread-safe. Console lines look like
 *   2026-11-22T15:34:14.123Z INF capture rows=12 table="books"
 * JSON lines are one object: {"time":..,"level":..,"msg":..,"node_id":..,<fields>}.
 * Fields are passed as a printf-free list of key/value string pairs so the
 * JSON writer can escape them; never pass secrets.
 */
#ifndef HL_LOG_H
#define HL_LOG_H

#include <stdbool.h>
#include <stdint.h>

typedef enum hl_log_level { HL_LOG_DEBUG = 0, HL_LOG_INFO = 1, HL_LOG_WARN = 2, HL_LOG_ERROR = 3 } hl_log_level;

/* format_json: true for JSON lines. Safe to call again at run time (SIGHUP). */
void hl_log_setup(hl_log_level level, bool format_json, uint64_t node_id);
void hl_log_set_level(hl_log_level level);
hl_log_level hl_log_get_level(void);
bool hl_log_enabled(hl_log_level level);
/* Parses "debug", "info", "warn", "error"; returns -1 when unknown. */
int hl_log_parse_level(const char *s);

/* Logs msg (printf format) with optional fields: after the format's arguments pass
 * key/value string pairs ending with NULL, e.g.
 *   hl_log(HL_LOG_INFO, "applied changeset", "origin", "3", "rows", "12", NULL);
 * Use the HL_LOG* macros below; msg is a plain string, not a format. */
void hl_log(hl_log_level level, const char *msg, ...);
/* Formats a message with printf and logs it without fields. */
void hl_logf(hl_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Rate limit for a repetitive event (a flood of bad messages, a failure retried
 * in a loop): at most `burst` lines per `window_ms`; the first line after a
 * quiet window says how many were suppressed. Zero-initialise, set burst and
 * window_ms. Not thread-safe: one per thread or call site.
 */
typedef struct hl_ratelimit {
    uint64_t window_ms;
    uint32_t burst;
    uint64_t start;      /* window start, monotonic ms */
    uint32_t count;      /* lines logged in this window */
    uint64_t suppressed; /* lines dropped since the last one logged */
} hl_ratelimit;

/* True when the caller may log now; *suppressed gets the count dropped before it. */
bool hl_ratelimit_allow(hl_ratelimit *rl, uint64_t *suppressed);

#define hl_debugf(...)                                                                                                 \
    do {                                                                                                               \
        if (hl_log_enabled(HL_LOG_DEBUG))                                                                              \
            hl_logf(HL_LOG_DEBUG, __VA_ARGS__);                                                                        \
    } while (0)
#define hl_infof(...) hl_logf(HL_LOG_INFO, __VA_ARGS__)
#define hl_warnf(...) hl_logf(HL_LOG_WARN, __VA_ARGS__)
#define hl_errorf(...) hl_logf(HL_LOG_ERROR, __VA_ARGS__)

#endif
