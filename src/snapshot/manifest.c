/*
 * manifest.c - snapshot manifests to and from JSON (cJSON).
 *
 * Every 64-bit number is written as a decimal string: JSON numbers are
 * doubles to most readers (cJSON included) and lose precision above 2^53,
 * which epochs and clocks pass.
 */
#include "snapshot/manifest.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

int hl_snapshot_name_ok(const char *name)
{
    size_t n = 0;
    if (!name || !name[0] || name[0] == '.')
        return 0;
    for (; name[n]; n++) {
        char ch = name[n];
        if (n >= HL_SNAPSHOT_NAME_MAX)
            return 0;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
              ch == '_' || ch == '-'))
            return 0;
    }
    return 1;
}

static int add_u64(cJSON *o, const char *key, uint64_t v)
{
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, v);
    return cJSON_AddStringToObject(o, key, num) != NULL;
}

char *hl_manifest_to_json(const hl_manifest *m)
{
    char *out = NULL;
    char created[40];
    time_t secs = (time_t)(m->created_ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(created, sizeof created, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(m->created_ms % 1000));
    cJSON *o = cJSON_CreateObject();
    cJSON *streams = o ? cJSON_AddArrayToObject(o, "streams") : NULL;
    int ok = streams != NULL;
    for (size_t i = 0; ok && i < m->nstreams; i++) {
        cJSON *s = cJSON_CreateObject();
        ok = s && cJSON_AddItemToArray(streams, s) && cJSON_AddStringToObject(s, "name", m->streams[i].name) &&
             add_u64(s, "seq", m->streams[i].seq);
    }
    ok = ok && cJSON_AddNumberToObject(o, "format", HL_MANIFEST_FORMAT) && add_u64(o, "node", m->node) &&
         add_u64(o, "epoch", m->epoch) && add_u64(o, "created_ms", m->created_ms) &&
         cJSON_AddStringToObject(o, "created", created) && cJSON_AddStringToObject(o, "version", m->version) &&
         cJSON_AddStringToObject(o, "schema_hash", m->schema_hash) && add_u64(o, "hlc", m->hlc) &&
         cJSON_AddStringToObject(o, "object", m->object) && add_u64(o, "size", m->size) &&
         cJSON_AddStringToObject(o, "sha256", m->sha256) && add_u64(o, "db_size", m->db_size);
    if (ok)
        out = cJSON_Print(o);
    cJSON_Delete(o);
    return out;
}

static hl_status bad(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static hl_status bad(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return HL_ERR_DECODE;
}

/* A decimal string of 1 to 20 digits, no sign, no leading zero, at most max. */
static int parse_u64(const cJSON *v, uint64_t max, uint64_t *out)
{
    if (!cJSON_IsString(v) || !v->valuestring)
        return 0;
    const char *s = v->valuestring;
    size_t n = strlen(s);
    if (n == 0 || n > 20 || (n > 1 && s[0] == '0'))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    errno = 0;
    char *end = NULL;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || *end || x > max)
        return 0;
    *out = (uint64_t)x;
    return 1;
}

/* Copies a string field of at most cap - 1 bytes. */
static int get_str(const cJSON *o, const char *key, char *dst, size_t cap)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsString(v) || !v->valuestring)
        return 0;
    size_t n = strlen(v->valuestring);
    if (n == 0 || n >= cap)
        return 0;
    memcpy(dst, v->valuestring, n + 1);
    return 1;
}

static int is_hex64(const char *s)
{
    for (int i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return s[64] == 0;
}

/* Stream names as JetStream allows them: printable ASCII without space, '.', '*', '>', '/', '\\'. */
static int stream_name_ok(const char *s)
{
    for (; *s; s++)
        if (*s <= ' ' || *s > '~' || *s == '.' || *s == '*' || *s == '>' || *s == '/' || *s == '\\')
            return 0;
    return 1;
}

/* The manifest's numbers and strings, each checked against its form. */
static hl_status parse_fields(hl_manifest *m, const cJSON *o, char *err, size_t errlen)
{
    static const struct {
        const char *key;
        size_t off;
        uint64_t max;
    } nums[] = {
        {"node", offsetof(hl_manifest, node), INT64_MAX},
        {"epoch", offsetof(hl_manifest, epoch), INT64_MAX},
        {"created_ms", offsetof(hl_manifest, created_ms), INT64_MAX},
        {"hlc", offsetof(hl_manifest, hlc), INT64_MAX},
        {"size", offsetof(hl_manifest, size), INT64_MAX},
        {"db_size", offsetof(hl_manifest, db_size), INT64_MAX},
    };
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        uint64_t *dst = (uint64_t *)(void *)((char *)m + nums[i].off);
        if (!parse_u64(cJSON_GetObjectItemCaseSensitive(o, nums[i].key), nums[i].max, dst))
            return bad(err, errlen, "manifest: %s: expected a decimal string from 0 to %" PRIu64, nums[i].key,
                       nums[i].max);
    }
    if (m->node == 0)
        return bad(err, errlen, "manifest: node: expected a node id >= 1");
    if (!get_str(o, "version", m->version, sizeof m->version))
        return bad(err, errlen, "manifest: version: expected a string of 1 to %zu bytes", sizeof m->version - 1);
    if (!get_str(o, "schema_hash", m->schema_hash, sizeof m->schema_hash) || !is_hex64(m->schema_hash))
        return bad(err, errlen, "manifest: schema_hash: expected 64 lower-case hex digits");
    if (!get_str(o, "sha256", m->sha256, sizeof m->sha256) || !is_hex64(m->sha256))
        return bad(err, errlen, "manifest: sha256: expected 64 lower-case hex digits");
    if (!get_str(o, "object", m->object, sizeof m->object) || !hl_snapshot_name_ok(m->object))
        return bad(err, errlen, "manifest: object: expected a name of 1 to %d bytes of [A-Za-z0-9._-]",
                   HL_SNAPSHOT_NAME_MAX);
    return HL_OK;
}

/* The streams array: at most HL_MANIFEST_MAX_STREAMS, each named once. */
static hl_status parse_streams(hl_manifest *m, const cJSON *o, char *err, size_t errlen)
{
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(o, "streams");
    if (!cJSON_IsArray(arr))
        return bad(err, errlen, "manifest: streams: expected an array");
    int n = cJSON_GetArraySize(arr);
    if (n < 0 || n > HL_MANIFEST_MAX_STREAMS)
        return bad(err, errlen, "manifest: streams: expected at most %d entries", HL_MANIFEST_MAX_STREAMS);
    if (n > 0) {
        m->streams = calloc((size_t)n, sizeof *m->streams);
        if (!m->streams) {
            snprintf(err, errlen, "manifest: out of memory");
            return HL_ERR_NOMEM;
        }
    }
    const cJSON *s;
    cJSON_ArrayForEach(s, arr)
    {
        hl_manifest_stream *ms = &m->streams[m->nstreams];
        if (!cJSON_IsObject(s) || !get_str(s, "name", ms->name, sizeof ms->name) || !stream_name_ok(ms->name) ||
            !parse_u64(cJSON_GetObjectItemCaseSensitive(s, "seq"), INT64_MAX, &ms->seq))
            return bad(err, errlen,
                       "manifest: streams[%zu]: expected {\"name\": a stream name, \"seq\": a decimal string}",
                       m->nstreams);
        for (size_t k = 0; k < m->nstreams; k++)
            if (strcmp(m->streams[k].name, ms->name) == 0)
                return bad(err, errlen, "manifest: streams[%zu]: stream \"%s\" listed twice", m->nstreams, ms->name);
        m->nstreams++;
    }
    return HL_OK;
}

hl_status hl_manifest_parse(hl_manifest *m, const char *json, size_t len, char *err, size_t errlen)
{
    hl_status st = HL_OK;
    cJSON *o = NULL;
    memset(m, 0, sizeof *m);
    if (len > HL_MANIFEST_MAX_BYTES)
        return bad(err, errlen, "manifest: %zu bytes, more than the %u allowed", len, HL_MANIFEST_MAX_BYTES);
    o = cJSON_ParseWithLength(json, len);
    if (!o || !cJSON_IsObject(o)) {
        st = bad(err, errlen, "manifest: not a JSON object");
        goto out;
    }
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "format");
    if (!cJSON_IsNumber(fmt) || fmt->valuedouble != HL_MANIFEST_FORMAT) {
        st = bad(err, errlen, "manifest: format: expected %d (a newer harmonylite may have written it)",
                 HL_MANIFEST_FORMAT);
        goto out;
    }
    m->format = HL_MANIFEST_FORMAT;
    st = parse_fields(m, o, err, errlen);
    if (!st)
        st = parse_streams(m, o, err, errlen);
out:
    cJSON_Delete(o);
    return st;
}

void hl_manifest_free(hl_manifest *m)
{
    if (!m)
        return;
    free(m->streams);
    memset(m, 0, sizeof *m);
}
