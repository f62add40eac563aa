/*
 * status.h - harmonylite status codes.
 *
 * Every fallible function returns an hl_status. The numbers are stable (they
 * appear in logs); add new codes at the end, never renumber.
 */
#ifndef HL_STATUS_H
#define HL_STATUS_H

typedef enum hl_status {
    HL_OK = 0,
    HL_ERR_NOMEM = 1,       /* allocation failed or a size cap was hit */
    HL_ERR_INVALID = 2,     /* invalid argument or input */
    HL_ERR_CONFIG = 3,      /* configuration error (message already logged/printed) */
    HL_ERR_IO = 4,          /* file or OS error */
    HL_ERR_SQLITE = 5,      /* SQLite returned an error */
    HL_ERR_NATS = 6,        /* NATS / JetStream error */
    HL_ERR_DECODE = 7,      /* malformed message or encoded data */
    HL_ERR_TOO_LARGE = 8,   /* input exceeds a configured or built-in limit */
    HL_ERR_SCHEMA = 9,      /* schema mismatch: unknown table or column */
    HL_ERR_BUSY = 10,       /* database busy / locked; retry later */
    HL_ERR_NOT_FOUND = 11,  /* requested object does not exist */
    HL_ERR_TIMEOUT = 12,    /* operation timed out */
    HL_ERR_STOPPED = 13,    /* shutting down */
    HL_ERR_CONSTRAINT = 14, /* a row violated a constraint */
    HL_ERR_GAP = 15,        /* missing changesets (stream truncated past our position) */
    HL_ERR_INTERNAL = 16,   /* a "cannot happen" branch was taken */
    HL_ERR_CONFLICT = 17,   /* KV: the key exists (create) or its revision moved on (update) */
} hl_status;

/* Returns a static, human readable string for st. Never NULL. */
const char *hl_status_str(hl_status st);

#endif
