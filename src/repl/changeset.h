/*
 * changeset.h - the unit of replication and its wire format.
 *
 * A changeset is every row change one capture cycle found: one or more whole
 * application transactions, coalesced to at most one entry per row (the last
 * image wins). It is encoded as CBOR (docs/protocol.md), optionally
 * zstd-compressed, and cut into parts no larger than the chunk limit; each part
 * travels as one NATS message with a fixed binary header.
 *
 * Nothing decoded from the network is trusted: the decoder enforces every limit
 * below and rejects anything else with HL_ERR_DECODE, never crashing.
 */
#ifndef HL_CHANGESET_H
#define HL_CHANGESET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/status.h"

#define HL_CS_FORMAT_VERSION 1
#define HL_SCHEMA_HASH_LEN 32

/* Decoder limits (hostile-input bounds). */
#define HL_CS_MAX_NAME 4096     /* bytes in a table or column name */
#define HL_CS_MAX_TABLES 100000 /* tables in one changeset */
#define HL_CS_MAX_COLS 32767    /* columns in one table (SQLite's hard limit) */
#define HL_CS_MAX_KEY 64        /* values in one primary key */

/* SQLite's five storage classes, same numbering as SQLITE_INTEGER etc. minus one. */
typedef enum hl_vtype { HL_VAL_NULL = 0, HL_VAL_INT = 1, HL_VAL_REAL = 2, HL_VAL_TEXT = 3, HL_VAL_BLOB = 4 } hl_vtype;

/* One SQLite value. TEXT and BLOB bytes are owned by the containing changeset
 * (or by whoever built the value); TEXT is not NUL-terminated on the wire but
 * the changeset always stores a NUL after it (not counted in n). */
typedef struct hl_value {
    hl_vtype type;
    union {
        int64_t i;
        double r;
        struct {
            unsigned char *p;
            size_t n;
        } b;
    } u;
} hl_value;

typedef struct hl_cs_table {
    char *name;
    char **cols; /* every column of the row images, in order */
    size_t ncols;
    char **pk; /* primary-key column names in key order; npk == 0: keyed by rowid */
    size_t npk;
} hl_cs_table;

typedef enum hl_op { HL_OP_UPSERT = 1, HL_OP_DELETE = 2 } hl_op;

/* A row's key, vals and their TEXT/BLOB bytes are one allocation owned by
 * the changeset (starting at key): read them, never free or replace them. */
typedef struct hl_cs_row {
    uint32_t table; /* index into tables */
    hl_op op;
    uint64_t hlc;  /* row version: 48 bits ms, 16 bits counter */
    hl_value *key; /* npk values (1 = the rowid when npk == 0) */
    size_t nkey;
    hl_value *vals; /* ncols values for HL_OP_UPSERT; NULL for HL_OP_DELETE */
    size_t nvals;
} hl_cs_row;

typedef struct hl_changeset {
    uint64_t origin;  /* node id of the writer */
    uint64_t epoch;   /* random id of the origin database incarnation */
    uint64_t seq;     /* per-(origin, epoch) changeset sequence, from 1 */
    uint64_t hlc;     /* highest row hlc */
    uint64_t wall_ms; /* origin wall clock at capture, ms since the epoch (for lag metrics) */
    unsigned char schema_hash[HL_SCHEMA_HASH_LEN];
    hl_cs_table *tables;
    size_t ntables, tables_cap;
    hl_cs_row *rows;
    size_t nrows, rows_cap;
    size_t approx_bytes; /* built: running estimate of the encoded size; decoded: hl_changeset_mem_cost() */
    size_t mem_bytes;    /* built: what its tables and row blocks cost (most of hl_changeset_mem_cost()) */
} hl_changeset;

/* Allocates an empty changeset (all fields zero). Returns NULL on OOM. */
hl_changeset *hl_changeset_new(void);
/* Frees cs and everything it owns. NULL is a no-op. */
void hl_changeset_free(hl_changeset *cs);

/* Adds a table description; names are copied. *idx receives its index. */
hl_status hl_changeset_add_table(hl_changeset *cs, const char *name, const char *const *cols, size_t ncols,
                                 const char *const *pk, size_t npk, uint32_t *idx);

/* Adds a row; key and vals (NULL for deletes) are deep-copied. nkey must be
 * max(npk, 1) and nvals the table's ncols for upserts. Raises cs->hlc to hlc
 * when hlc is higher and adds the row's rough encoded size to cs->approx_bytes.
 * A rowid key (npk == 0) must be an INTEGER; REAL values must not be NaN
 * (SQLite never stores NaN). Copied TEXT and BLOB values always get a non-NULL
 * pointer, even when empty, so sqlite3_bind_blob() binds an empty BLOB and not
 * NULL. */
hl_status hl_changeset_add_row(hl_changeset *cs, uint32_t table, hl_op op, uint64_t hlc, const hl_value *key,
                               size_t nkey, const hl_value *vals, size_t nvals);

/*
 * What cs costs in memory as hl_changeset_decode() builds it: every
 * allocation it makes (rounded as an allocator does) and its scratch arrays.
 * A decoder refuses a changeset costing more than its limit, so a sender must
 * not publish one that costs more than the receivers' limit. A decoded
 * changeset's approx_bytes holds this cost.
 */
size_t hl_changeset_mem_cost(const hl_changeset *cs);

/* Encodes cs as the CBOR payload (docs/protocol.md §2), zstd-compressed when
 * compress is set (level 1). Appends to out. */
hl_status hl_changeset_encode(const hl_changeset *cs, bool compress, hl_buf *out);

/*
 * Decodes a payload produced by hl_changeset_encode. compressed says whether it
 * is zstd-framed; max_bytes caps the decompressed size and, separately, what
 * the decoded changeset costs in memory (hl_changeset_mem_cost()), which is
 * checked before each allocation. On success *out is a new changeset the
 * caller frees. Any malformation: HL_ERR_DECODE (or
 * HL_ERR_TOO_LARGE), *out NULL, and if err is non-NULL a short reason is
 * written there.
 */
hl_status hl_changeset_decode(const void *p, size_t n, bool compressed, size_t max_bytes, hl_changeset **out, char *err,
                              size_t errlen);

/* Appends the canonical encoding of a primary key (a CBOR array of the values,
 * shortest integer forms, floats as 64-bit) to out. Identifies the row in
 * __harmonylite__conflicts: equal keys give equal bytes. */
hl_status hl_key_encode(const hl_value *key, size_t n, hl_buf *out);

/* Decodes a key written by hl_key_encode into out (at most HL_CS_MAX_KEY
 * values); text and blob values point into scratch, which must hold len +
 * HL_CS_MAX_KEY bytes. *n receives the number of values. */
hl_status hl_key_decode(const void *p, size_t len, hl_value *out, size_t *n, unsigned char *scratch);

/* ---- parts: the NATS message envelope (docs/protocol.md §1) ---- */

#define HL_PART_MAGIC "HLC1"
#define HL_PART_HEADER_LEN 48
#define HL_PART_FLAG_ZSTD 0x01
/* The changeset is continued by its origin's next sequence: a transaction too
 * big for one changeset travels as a chain, applied as one (protocol.md §1.5). */
#define HL_PART_FLAG_MORE 0x02
#define HL_PART_FLAGS (HL_PART_FLAG_ZSTD | HL_PART_FLAG_MORE)

typedef struct hl_part {
    uint8_t version; /* HL_CS_FORMAT_VERSION */
    uint8_t flags;   /* HL_PART_FLAG_* */
    uint64_t origin, epoch, seq;
    uint32_t index, count;     /* 0 <= index < count */
    uint64_t total_len;        /* length of the whole payload */
    const unsigned char *data; /* this part's slice (points into the message) */
    size_t len;
} hl_part;

/* Writes the 48-byte header for p (data/len ignored) to hdr. */
void hl_part_header_write(const hl_part *p, unsigned char hdr[HL_PART_HEADER_LEN]);

/* Parses a message; on success p->data/len point into msg. Checks magic,
 * version, index < count, len <= total_len, count >= 1, reserved == 0. */
hl_status hl_part_parse(const void *msg, size_t n, hl_part *p);

/* Number of parts a payload of total_len bytes needs with chunk_bytes per part
 * (1 for an empty payload); 0 when chunk_bytes is 0 or more than UINT32_MAX
 * parts would be needed. */
uint32_t hl_part_count(size_t total_len, size_t chunk_bytes);

/*
 * Describes part index of a payload of total_len bytes cut at chunk_bytes: sets
 * p->version, index, count, total_len, data (points into payload) and len. The
 * caller sets origin, epoch, seq and flags, which all parts share. Returns
 * HL_ERR_INVALID when chunk_bytes is 0, index is out of range or the payload
 * needs more than UINT32_MAX parts.
 */
hl_status hl_part_slice(hl_part *p, const void *payload, size_t total_len, size_t chunk_bytes, uint32_t index);

/* Room for the longest NATS message id, NUL included. */
#define HL_PART_MSG_ID_LEN 72

/* Writes the part's Nats-Msg-Id, "<origin>-<epoch as 16 lowercase hex>-<seq>-<index>"
 * (docs/protocol.md §1.3), NUL-terminated and truncated to len bytes. */
void hl_part_msg_id(const hl_part *p, char *buf, size_t len);
/* The reverse of hl_part_msg_id: sets p's origin, epoch, seq and index from a
 * Nats-Msg-Id; HL_ERR_DECODE when id is not one (anything else in it, a
 * number out of range). */
hl_status hl_part_msg_id_parse(const char *id, hl_part *p);

/*
 * Reassembles the parts of one origin's changesets (docs/protocol.md §1.4).
 * Parts of other origins interleave in the stream; keep one hl_reasm per
 * origin. Parts of one changeset may arrive in any order, and parts of several
 * changesets of the origin may be pending at once: a writer whose server died
 * mid-publish re-publishes the parts the dead connection lost after others
 * that its client library had buffered were already stored. A part's place in
 * the payload follows from its own header (every part but the last is exactly
 * chunk bytes long), so no configuration value is needed.
 */
#define HL_REASM_MAX_PENDING 16 /* incomplete changesets per origin */
#define HL_REASM_DONE_RING 64   /* completed changesets remembered per origin */

typedef struct hl_reasm_entry {
    uint64_t epoch, seq;
    uint32_t count, have;      /* parts announced, parts received */
    uint8_t flags;             /* HL_PART_FLAG_* of the parts */
    uint64_t total_len, chunk; /* payload length; length of every part but the last */
    uint64_t bytes;            /* payload bytes received so far */
    uint64_t first_stream_seq; /* lowest stream sequence of a part received */
    bool repeat;               /* a copy of a changeset delivered a moment ago (hl_reasm_mark_done) */
    int64_t stamp_ns;          /* for the caller: stream time of the first part received */
    uint64_t stamp_ms;         /* for the caller: local time it was received */
    unsigned char *data;       /* total_len bytes (at least 1 allocated) */
    unsigned char *have_bits;  /* one bit per part */
} hl_reasm_entry;

typedef struct hl_reasm {
    size_t max_bytes;        /* largest payload accepted */
    hl_reasm_entry *pending; /* npending incomplete changesets, oldest first */
    size_t npending;
    uint64_t held; /* sum of pending[].bytes */
    struct {
        uint64_t epoch, seq;
    } done[HL_REASM_DONE_RING]; /* recently delivered, to ignore their re-published parts */
    size_t ndone, done_next;
} hl_reasm;

void hl_reasm_init(hl_reasm *r, size_t max_bytes);
/* Frees every pending changeset; r may be NULL. r can be used again after
 * hl_reasm_init(). */
void hl_reasm_free(hl_reasm *r);
/* True while a changeset is partly received. */
bool hl_reasm_pending(const hl_reasm *r);

/*
 * Feeds one part received at stream sequence sseq. On HL_OK, *out is the
 * changeset the part belongs to (complete when have == count: take it with
 * hl_reasm_take()), or NULL when the changeset already has the part. A part
 * of a changeset delivered a moment ago starts an entry marked repeat: a
 * whole copy completes (the apply step counts it as a duplicate), and a copy
 * of only some parts (a writer re-publishing after the duplicate window
 * forgot only some) can be dropped quietly when it expires. Errors, after
 * which the part is ignored and every pending changeset kept:
 *   HL_ERR_TOO_LARGE  total length over max_bytes (nothing is buffered);
 *   HL_ERR_DECODE     the part's geometry is impossible, or it disagrees with
 *                     the changeset's other parts (count, total length,
 *                     flags, part length);
 *   HL_ERR_BUSY       HL_REASM_MAX_PENDING changesets are pending: drop one
 *                     (hl_reasm_drop) and feed again.
 */
hl_status hl_reasm_feed(hl_reasm *r, const hl_part *p, uint64_t sseq, hl_reasm_entry **out);
/* Removes complete changeset e (from hl_reasm_feed) and returns its payload,
 * malloc'd, for the caller to free; sets *len and *flags. */
unsigned char *hl_reasm_take(hl_reasm *r, hl_reasm_entry *e, size_t *len, uint8_t *flags);
/* Records that changeset (epoch, seq) was delivered whole, so that parts of
 * it received again soon after start entries marked repeat (the last
 * HL_REASM_DONE_RING are remembered). Only a changeset that decoded is
 * marked. */
void hl_reasm_mark_done(hl_reasm *r, uint64_t epoch, uint64_t seq);
/* Drops pending changeset e unfinished. */
void hl_reasm_drop(hl_reasm *r, hl_reasm_entry *e);

#endif
