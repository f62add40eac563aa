/*
 * s3xml.c - finding element text in S3's XML answers, bounded and strict.
 */
#include "snapshot/s3xml.h"

#include <stdlib.h>
#include <string.h>

#include "snapshot/manifest.h"

/* Finds needle (nlen bytes) in h[from..len); returns its offset or len when absent. */
static size_t find(const char *h, size_t len, size_t from, const char *needle, size_t nlen)
{
    if (nlen == 0 || len < nlen)
        return len;
    for (size_t i = from; i + nlen <= len; i++)
        if (h[i] == needle[0] && memcmp(h + i, needle, nlen) == 0)
            return i;
    return len;
}

/* Appends code point cp as UTF-8; returns bytes written or 0 when it does not fit or is not allowed. */
static size_t put_utf8(unsigned long cp, char *out, size_t room)
{
    if (cp == 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xC0 | (cp >> 6));
        b[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | (cp >> 12));
        b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | (cp >> 18));
        b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    if (n > room)
        return 0;
    memcpy(out, b, n);
    return n;
}

/* Unescapes s[0..n) into out (capacity cap, NUL-terminated); -1 when malformed or too long. */
static int unescape(const char *s, size_t n, char *out, size_t cap)
{
    static const struct {
        const char *name;
        char ch;
    } ents[] = {{"amp;", '&'}, {"lt;", '<'}, {"gt;", '>'}, {"quot;", '"'}, {"apos;", '\''}};
    size_t o = 0;
    if (cap == 0)
        return -1;
    for (size_t i = 0; i < n;) {
        if (s[i] == '<')
            return -1; /* markup inside: not a text element */
        if (s[i] != '&') {
            if (o + 1 >= cap)
                return -1;
            out[o++] = s[i++];
            continue;
        }
        size_t semi = find(s, n, i, ";", 1);
        if (semi == n || semi - i > 10)
            return -1;
        const char *e = s + i + 1;
        size_t el = semi - i; /* entity name with ';' */
        bool done = false;
        for (size_t k = 0; k < sizeof ents / sizeof ents[0] && !done; k++)
            if (strlen(ents[k].name) == el && memcmp(e, ents[k].name, el) == 0) {
                if (o + 1 >= cap)
                    return -1;
                out[o++] = ents[k].ch;
                done = true;
            }
        if (!done) {
            if (el < 3 || e[0] != '#')
                return -1;
            unsigned long cp = 0;
            bool hex = e[1] == 'x';
            size_t d = hex ? 2 : 1;
            if (d >= el - 1)
                return -1;
            for (; d < el - 1; d++) {
                char c = e[d];
                int v = c >= '0' && c <= '9'          ? c - '0'
                        : hex && c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : hex && c >= 'A' && c <= 'F' ? c - 'A' + 10
                                                      : -1;
                if (v < 0)
                    return -1;
                cp = cp * (hex ? 16 : 10) + (unsigned long)v;
                if (cp > 0x10FFFF)
                    return -1;
            }
            size_t w = put_utf8(cp, out + o, cap - 1 - o);
            if (!w)
                return -1;
            o += w;
        }
        i = semi + 1;
    }
    out[o] = 0;
    return 0;
}

int hl_s3xml_text(const char *xml, size_t len, size_t *pos, const char *tag, char *out, size_t cap)
{
    char open[80], close[80];
    size_t tl = strlen(tag);
    if (tl == 0 || tl + 4 > sizeof open || *pos > len)
        return -1;
    open[0] = '<';
    memcpy(open + 1, tag, tl);
    open[tl + 1] = '>';
    close[0] = '<';
    close[1] = '/';
    memcpy(close + 2, tag, tl);
    close[tl + 2] = '>';
    size_t a = find(xml, len, *pos, open, tl + 2);
    if (a == len)
        return 0;
    a += tl + 2;
    size_t b = find(xml, len, a, close, tl + 3);
    if (b == len)
        return -1;
    if (unescape(xml + a, b - a, out, cap) != 0)
        return -1;
    *pos = b + tl + 3;
    return 1;
}

hl_status hl_s3xml_list(const char *xml, size_t len, const char *prefix, hl_store_names *names, bool *truncated,
                        char *token, size_t tokcap)
{
    char key[1100], flag[16];
    size_t pl = strlen(prefix), pos = 0, cap = names->n;
    *truncated = false;
    token[0] = 0;
    if (find(xml, len, 0, "<ListBucketResult", 17) == len)
        return HL_ERR_DECODE;
    size_t p2 = 0;
    int r = hl_s3xml_text(xml, len, &p2, "IsTruncated", flag, sizeof flag);
    if (r < 0)
        return HL_ERR_DECODE;
    *truncated = r == 1 && strcmp(flag, "true") == 0;
    if (*truncated) {
        p2 = 0;
        if (hl_s3xml_text(xml, len, &p2, "NextContinuationToken", token, tokcap) != 1 || !token[0])
            return HL_ERR_DECODE;
    }
    for (;;) {
        size_t c = find(xml, len, pos, "<Contents>", 10);
        if (c == len)
            break;
        size_t ce = find(xml, len, c, "</Contents>", 11);
        if (ce == len)
            return HL_ERR_DECODE;
        size_t kp = c;
        r = hl_s3xml_text(xml, ce, &kp, "Key", key, sizeof key);
        if (r < 0)
            return HL_ERR_DECODE;
        pos = ce + 11;
        if (r == 0 || strncmp(key, prefix, pl) != 0 || !hl_snapshot_name_ok(key + pl))
            continue;
        if (names->n >= HL_STORE_LIST_MAX)
            break;
        if (names->n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nv = realloc(names->v, cap * sizeof *nv);
            if (!nv)
                return HL_ERR_NOMEM;
            names->v = nv;
        }
        if (!(names->v[names->n] = strdup(key + pl)))
            return HL_ERR_NOMEM;
        names->n++;
    }
    return HL_OK;
}

hl_status hl_xml_each(const char *xml, size_t len, const char *local, size_t cap, size_t max_items,
                      hl_status (*fn)(void *ctx, const char *text), void *ctx)
{
    size_t ll = strlen(local), items = 0;
    char *text = malloc(cap ? cap : 1);
    hl_status st = HL_OK;
    if (!text)
        return HL_ERR_NOMEM;
    for (size_t i = 0; i < len && !st;) {
        size_t lt = find(xml, len, i, "<", 1);
        if (lt == len)
            break;
        size_t gt = find(xml, len, lt, ">", 1);
        if (gt == len)
            break; /* the rest is not an element: nothing more to find */
        const char *name = xml + lt + 1;
        size_t nl = gt - lt - 1;
        i = gt + 1;
        if (nl == 0 || name[0] == '/' || name[0] == '?' || name[0] == '!' || name[nl - 1] == '/')
            continue;
        size_t tn = 0; /* the tag name ends at white space */
        while (tn < nl && name[tn] != ' ' && name[tn] != '\t' && name[tn] != '\r' && name[tn] != '\n')
            tn++;
        const char *colon = memchr(name, ':', tn);
        const char *ln = colon ? colon + 1 : name;
        size_t lnl = tn - (size_t)(ln - name);
        if (lnl != ll || memcmp(ln, local, ll) != 0)
            continue;
        /* the closing tag must follow the text: </ + the same name + > */
        size_t end = find(xml, len, i, "<", 1);
        if (end == len || end + 3 + tn > len || xml[end + 1] != '/' || memcmp(xml + end + 2, name, tn) != 0 ||
            xml[end + 2 + tn] != '>') {
            st = HL_ERR_DECODE;
            break;
        }
        if (unescape(xml + i, end - i, text, cap) != 0) {
            st = HL_ERR_DECODE;
            break;
        }
        if (++items > max_items) {
            st = HL_ERR_TOO_LARGE;
            break;
        }
        st = fn(ctx, text);
        i = end + 3 + tn;
    }
    free(text);
    return st;
}
