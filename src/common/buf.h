/*
 * buf.h - size-capped dynamic byte buffer (after curl's dynbuf).
 *
 * A buffer never grows beyond the cap given to hl_buf_init(); an append that
 * would exceed it fails with HL_ERR_TOO_LARGE and leaves the buffer unchanged,
 * so no input can grow memory without bound. The content is always followed by
 * a NUL byte (not counted in len) so text can be used as a C string.
 *
 * Errors are sticky, as in SQLite's sqlite3_str: after one append fails, every
 * later append does nothing and returns the same error, and hl_buf_status()
 * reports it, so code that builds a text appends without checking each step
 * and checks once at the end. hl_buf_reset() and hl_buf_init() clear it.
 */
#ifndef HL_BUF_H
#define HL_BUF_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct hl_buf {
    unsigned char *data; /* owned; NULL until the first append */
    size_t len;
    size_t cap;    /* allocated bytes */
    size_t limit;  /* maximum len */
    hl_status err; /* the first failed append since init/reset; HL_OK when none */
} hl_buf;

void hl_buf_init(hl_buf *b, size_t limit);
/* Frees the content; the buffer may be reused after hl_buf_init(). NULL is a no-op. */
void hl_buf_free(hl_buf *b);
/* Sets len to 0 and clears the error, keeps the allocation. */
void hl_buf_reset(hl_buf *b);
/* The first error of an append since init/reset (sticky), or HL_OK. */
hl_status hl_buf_status(const hl_buf *b);
/* Records st as the sticky error unless one is recorded already, and returns
 * the sticky error: a writer that refuses its input (a value it cannot
 * express) stops the text the same way a failed append does, so its caller
 * still checks hl_buf_status() once at the end. The content is unchanged. */
hl_status hl_buf_fail(hl_buf *b, hl_status st);
hl_status hl_buf_add(hl_buf *b, const void *p, size_t n);
hl_status hl_buf_addc(hl_buf *b, unsigned char c);
hl_status hl_buf_adds(hl_buf *b, const char *s);
/* printf-style append. */
hl_status hl_buf_addf(hl_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as an SQL identifier: wrapped in " with embedded " doubled. */
hl_status hl_buf_add_ident(hl_buf *b, const char *s);
/* Appends s as an SQL string literal: wrapped in ' with embedded ' doubled. */
hl_status hl_buf_add_sqlstr(hl_buf *b, const char *s);
/* Returns the content as a C string ("" when empty). Valid until the next change. */
const char *hl_buf_str(const hl_buf *b);
/* Takes ownership of the content (caller frees); the buffer is left empty. */
unsigned char *hl_buf_steal(hl_buf *b, size_t *len);

/* Writes 2n lowercase hex digits of p and a NUL to hex. */
void hl_hex(const unsigned char *p, size_t n, char *hex);

#endif
