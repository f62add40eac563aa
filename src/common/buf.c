#include "common/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void hl_buf_init(hl_buf *b, size_t limit)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->limit = limit;
    b->err = HL_OK;
}

void hl_buf_free(hl_buf *b)
{
    if (!b)
        return;
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void hl_buf_reset(hl_buf *b)
{
    b->len = 0;
    b->err = HL_OK;
    if (b->data)
        b->data[0] = 0;
}

hl_status hl_buf_status(const hl_buf *b)
{
    return b->err;
}

/* Records the first error; returns the sticky one. */
static hl_status fail(hl_buf *b, hl_status st)
{
    if (!b->err)
        b->err = st;
    return b->err;
}

hl_status hl_buf_fail(hl_buf *b, hl_status st)
{
    return st ? fail(b, st) : b->err;
}

/* Makes room for n more bytes plus the trailing NUL. */
static hl_status grow(hl_buf *b, size_t n)
{
    if (b->err)
        return b->err;
    if (n > b->limit || b->len > b->limit - n)
        return fail(b, HL_ERR_TOO_LARGE);
    size_t need = b->len + n + 1;
    if (need <= b->cap)
        return HL_OK;
    size_t ncap = b->cap ? b->cap : 64;
    while (ncap < need)
        ncap = ncap > SIZE_MAX / 2 ? need : ncap * 2;
    unsigned char *p = realloc(b->data, ncap);
    if (!p)
        return fail(b, HL_ERR_NOMEM);
    b->data = p;
    b->cap = ncap;
    return HL_OK;
}

hl_status hl_buf_add(hl_buf *b, const void *p, size_t n)
{
    hl_status st = grow(b, n);
    if (st)
        return st;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return HL_OK;
}

hl_status hl_buf_addc(hl_buf *b, unsigned char c)
{
    return hl_buf_add(b, &c, 1);
}

hl_status hl_buf_adds(hl_buf *b, const char *s)
{
    return hl_buf_add(b, s, strlen(s));
}

hl_status hl_buf_addf(hl_buf *b, const char *fmt, ...)
{
    va_list ap;
    if (b->err)
        return b->err;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return fail(b, HL_ERR_INVALID);
    hl_status st = grow(b, (size_t)n);
    if (st)
        return st;
    va_start(ap, fmt);
    vsnprintf((char *)b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return HL_OK;
}

static hl_status add_quoted(hl_buf *b, const char *s, char q)
{
    size_t old = b->len;
    hl_buf_addc(b, (unsigned char)q);
    for (const char *p = s; !b->err && *p; p++) {
        hl_buf_addc(b, (unsigned char)*p);
        if (*p == q)
            hl_buf_addc(b, (unsigned char)q);
    }
    hl_buf_addc(b, (unsigned char)q);
    hl_status st = b->err;
    if (st) {
        /* Nothing of the quoted text stays; the error does. */
        b->len = old;
        if (b->data)
            b->data[old] = 0;
    }
    return st;
}

hl_status hl_buf_add_ident(hl_buf *b, const char *s)
{
    return add_quoted(b, s, '"');
}

hl_status hl_buf_add_sqlstr(hl_buf *b, const char *s)
{
    return add_quoted(b, s, '\'');
}

const char *hl_buf_str(const hl_buf *b)
{
    return b->data ? (const char *)b->data : "";
}

unsigned char *hl_buf_steal(hl_buf *b, size_t *len)
{
    unsigned char *p = b->data;
    if (len)
        *len = b->len;
    b->data = NULL;
    b->len = b->cap = 0;
    b->err = HL_OK;
    return p;
}

void hl_hex(const unsigned char *p, size_t n, char *hex)
{
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        hex[2 * i] = d[p[i] >> 4];
        hex[2 * i + 1] = d[p[i] & 15];
    }
    hex[2 * n] = 0;
}
