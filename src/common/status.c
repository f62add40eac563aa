#include "common/status.h"

const char *hl_status_str(hl_status st)
{
    switch (st) {
    case HL_OK:
        return "ok";
    case HL_ERR_NOMEM:
        return "out of memory or size cap reached";
    case HL_ERR_INVALID:
        return "invalid argument";
    case HL_ERR_CONFIG:
        return "configuration error";
    case HL_ERR_IO:
        return "I/O error";
    case HL_ERR_SQLITE:
        return "SQLite error";
    case HL_ERR_NATS:
        return "NATS error";
    case HL_ERR_DECODE:
        return "malformed data";
    case HL_ERR_TOO_LARGE:
        return "too large";
    case HL_ERR_SCHEMA:
        return "schema mismatch";
    case HL_ERR_BUSY:
        return "database busy";
    case HL_ERR_NOT_FOUND:
        return "not found";
    case HL_ERR_TIMEOUT:
        return "timed out";
    case HL_ERR_STOPPED:
        return "stopped";
    case HL_ERR_CONSTRAINT:
        return "constraint violation";
    case HL_ERR_GAP:
        return "gap in replication log";
    case HL_ERR_INTERNAL:
        return "internal error";
    case HL_ERR_CONFLICT:
        return "key exists or revision changed";
    }
    return "unknown status";
}
