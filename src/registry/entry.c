/*
 * entry.c - schema registry entries and the cluster view: parsing and
 * checking an entry from the network, and the verdicts (registry.h). Pure
 * functions over cJSON: no NATS, so the fuzz harness builds it alone.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

#include "registry/registry.h"

#define KEY_PREFIX HL_REG_KEY_PREFIX

void hl_reg_entry_free(hl_reg_entry *e)
{
    if (!e)
        return;
    for (size_t i = 0; i < e->ntables; i++)
        free(e->tables[i]);
    free(e->tables);
    e->tables = NULL;
    e->ntables = 0;
}

void hl_reg_entries_free(hl_reg_entry *v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        hl_reg_entry_free(&v[i]);
    free(v);
}

static bool is_hash(const char *s)
{
    return strlen(s) == 64 && strspn(s, "0123456789abcdef") == 64;
}

char *hl_reg_entry_encode(const hl_reg_entry *e)
{
    char num[24];
    cJSON *o = cJSON_CreateObject(), *t = NULL;
    bool ok = o != NULL;
    snprintf(num, sizeof num, "%" PRIu64, e->node_id);
    ok = ok && cJSON_AddStringToObject(o, "node_id", num);
    ok = ok && cJSON_AddStringToObject(o, "schema_hash", e->hash);
    ok = ok && (e->prev[0] ? cJSON_AddStringToObject(o, "previous_schema_hash", e->prev)
                           : cJSON_AddNullToObject(o, "previous_schema_hash"));
    ok = ok && (t = cJSON_AddArrayToObject(o, "tables"));
    for (size_t i = 0; ok && i < e->ntables; i++) {
        cJSON *s = cJSON_CreateString(e->tables[i]);
        ok = s && cJSON_AddItemToArray(t, s);
    }
    ok = ok && cJSON_AddStringToObject(o, "version", e->version);
    /* Raw: cJSON prints a double with 15 significant digits, which would round the larger times. */
    snprintf(num, sizeof num, "%" PRIu64, e->started_ms);
    ok = ok && cJSON_AddRawToObject(o, "started_ms", num);
    snprintf(num, sizeof num, "%" PRIu64, e->heartbeat_ms);
    ok = ok && cJSON_AddRawToObject(o, "heartbeat_ms", num);
    char *json = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return json;
}

/* A JSON number that is a whole number of milliseconds from 0 to 2^53. */
static bool get_ms(const cJSON *o, const char *name, uint64_t *out)
{
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(n) || !(n->valuedouble >= 0 && n->valuedouble <= 9007199254740992.0) ||
        n->valuedouble != (double)(uint64_t)n->valuedouble)
        return false;
    *out = (uint64_t)n->valuedouble;
    return true;
}

hl_status hl_reg_entry_decode(const char *key, const unsigned char *v, size_t len, hl_reg_entry *out, char *why,
                              size_t whylen)
{
    memset(out, 0, sizeof *out);
    const char *bad = NULL;
    cJSON *o = NULL;
    char *end = NULL;
    if (strncmp(key, KEY_PREFIX, strlen(KEY_PREFIX)) != 0) {
        snprintf(why, whylen, "key is not node.<id>");
        return HL_ERR_DECODE;
    }
    const char *idtxt = key + strlen(KEY_PREFIX);
    errno = 0;
    unsigned long long id = strtoull(idtxt, &end, 10);
    if (!idtxt[0] || idtxt[0] == '0' || *end || errno || id > INT64_MAX) {
        snprintf(why, whylen, "key is not node.<id> with an id from 1 to 2^63-1");
        return HL_ERR_DECODE;
    }
    if (!v || len == 0 || len > HL_REG_MAX_ENTRY_BYTES || !(o = cJSON_ParseWithLength((const char *)v, len))) {
        snprintf(why, whylen, "value is not JSON of at most %d bytes", HL_REG_MAX_ENTRY_BYTES);
        return HL_ERR_DECODE;
    }
    out->node_id = (uint64_t)id;
    const cJSON *nid = cJSON_GetObjectItemCaseSensitive(o, "node_id");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(o, "schema_hash");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "previous_schema_hash");
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(o, "version");
    const cJSON *tabs = cJSON_GetObjectItemCaseSensitive(o, "tables");
    if (!cJSON_IsObject(o))
        bad = "value is not a JSON object";
    else if (!cJSON_IsString(nid) || strcmp(nid->valuestring, idtxt) != 0)
        bad = "node_id does not match the key";
    else if (!cJSON_IsString(h) || !is_hash(h->valuestring))
        bad = "schema_hash is not 64 lowercase hex digits";
    else if (!cJSON_IsNull(p) && !(cJSON_IsString(p) && is_hash(p->valuestring)))
        bad = "previous_schema_hash is neither null nor 64 lowercase hex digits";
    else if (!cJSON_IsString(ver) || strlen(ver->valuestring) >= sizeof out->version)
        bad = "version is not a string of at most 63 bytes";
    else if (!get_ms(o, "started_ms", &out->started_ms) || !get_ms(o, "heartbeat_ms", &out->heartbeat_ms))
        bad = "started_ms or heartbeat_ms is not a time in milliseconds";
    else if (!cJSON_IsArray(tabs) || cJSON_GetArraySize(tabs) > HL_REG_MAX_TABLES)
        bad = "tables is not an array of at most 10000 names";
    if (!bad) {
        snprintf(out->hash, sizeof out->hash, "%s", h->valuestring);
        if (cJSON_IsString(p))
            snprintf(out->prev, sizeof out->prev, "%s", p->valuestring);
        snprintf(out->version, sizeof out->version, "%s", ver->valuestring);
        size_t n = (size_t)cJSON_GetArraySize(tabs);
        out->tables = calloc(n ? n : 1, sizeof *out->tables);
        const cJSON *t;
        if (!out->tables)
            bad = "out of memory";
        cJSON_ArrayForEach(t, tabs)
        {
            if (bad)
                break;
            if (!cJSON_IsString(t) || !t->valuestring[0])
                bad = "tables holds something other than a name";
            else if (!(out->tables[out->ntables++] = strdup(t->valuestring)))
                bad = "out of memory";
        }
    }
    cJSON_Delete(o);
    if (bad) {
        hl_reg_entry_free(out);
        snprintf(why, whylen, "%s", bad);
        return strcmp(bad, "out of memory") == 0 ? HL_ERR_NOMEM : HL_ERR_DECODE;
    }
    return HL_OK;
}

/* ---- the cluster view ---- */

const char *hl_cluster_status_name(hl_cluster_status s)
{
    switch (s) {
    case HL_CLUSTER_CONSISTENT:
        return "consistent";
    case HL_CLUSTER_UPGRADING:
        return "upgrading";
    default:
        return "incompatible";
    }
}

bool hl_reg_compatible(const hl_reg_entry *a, const hl_reg_entry *b)
{
    return strcmp(a->hash, b->hash) == 0 || (a->prev[0] && strcmp(a->prev, b->hash) == 0) ||
           (b->prev[0] && strcmp(b->prev, a->hash) == 0);
}

hl_cluster_status hl_cluster_status_of(const hl_reg_entry *v, size_t n)
{
    hl_cluster_status s = HL_CLUSTER_CONSISTENT;
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++) {
            if (strcmp(v[i].hash, v[j].hash) == 0)
                continue;
            if (!hl_reg_compatible(&v[i], &v[j]))
                return HL_CLUSTER_INCOMPATIBLE;
            s = HL_CLUSTER_UPGRADING;
        }
    return s;
}

/* Live nodes running hash. */
static size_t count_hash(const hl_reg_entry *v, size_t n, const char *hash)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += strcmp(v[i].hash, hash) == 0;
    return k;
}

bool hl_cluster_odd_one_out(const hl_reg_entry *v, size_t n, uint64_t self, char *reason, size_t reasonlen)
{
    const hl_reg_entry *me = NULL;
    size_t most = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i].node_id == self)
            me = &v[i];
        size_t k = count_hash(v, n, v[i].hash);
        if (k > most)
            most = k;
    }
    if (!me)
        return false;
    /* Compatible with a node of one of the most-run schemas: not at fault
     * (this covers running one of them, ties, and a node alone). */
    for (size_t i = 0; i < n; i++)
        if (count_hash(v, n, v[i].hash) == most && hl_reg_compatible(me, &v[i]))
            return false;
    if (reason) {
        const char *major = NULL;
        for (size_t i = 0; i < n && !major; i++)
            if (count_hash(v, n, v[i].hash) == most)
                major = v[i].hash;
        snprintf(reason, reasonlen,
                 "this node's schema %.12s is incompatible with schema %.12s that %zu of %zu live nodes run "
                 "(neither is the other's previous schema): migrate this node's schema to match theirs "
                 "(harmonylite -schema-status-cluster)",
                 me->hash, major ? major : "?", most, n);
    }
    return true;
}

static int cmp_group(const void *a, const void *b)
{
    const hl_reg_entry *x = a, *y = b;
    int c = strcmp(x->hash, y->hash);
    return c ? c : (x->node_id > y->node_id) - (x->node_id < y->node_id);
}

char *hl_cluster_json(const hl_reg_entry *v, size_t n)
{
    hl_reg_entry *s = calloc(n ? n : 1, sizeof *s);
    cJSON *root = cJSON_CreateObject(), *groups = NULL;
    char num[24];
    bool ok = s && root;
    if (s) {
        memcpy(s, v, n * sizeof *s); /* shallow: sorted by hash, then node */
        qsort(s, n, sizeof *s, cmp_group);
    }
    ok = ok && cJSON_AddStringToObject(root, "status", hl_cluster_status_name(hl_cluster_status_of(v, n)));
    snprintf(num, sizeof num, "%zu", n);
    ok = ok && cJSON_AddRawToObject(root, "live_nodes", num);
    ok = ok && (groups = cJSON_AddArrayToObject(root, "groups"));
    cJSON *nodes = NULL;
    for (size_t i = 0; ok && i < n; i++) {
        if (i == 0 || strcmp(s[i].hash, s[i - 1].hash) != 0) {
            cJSON *g = cJSON_CreateObject();
            ok = g && cJSON_AddItemToArray(groups, g) && cJSON_AddStringToObject(g, "schema_hash", s[i].hash) &&
                 (nodes = cJSON_AddArrayToObject(g, "nodes"));
            if (!ok)
                break;
        }
        cJSON *o = cJSON_CreateObject(), *t = NULL;
        ok = o && cJSON_AddItemToArray(nodes, o);
        snprintf(num, sizeof num, "%" PRIu64, s[i].node_id);
        ok = ok && cJSON_AddRawToObject(o, "node_id", num);
        ok = ok && (s[i].prev[0] ? cJSON_AddStringToObject(o, "previous_schema_hash", s[i].prev)
                                 : cJSON_AddNullToObject(o, "previous_schema_hash"));
        ok = ok && cJSON_AddStringToObject(o, "version", s[i].version);
        snprintf(num, sizeof num, "%" PRIu64, s[i].started_ms);
        ok = ok && cJSON_AddRawToObject(o, "started_ms", num);
        snprintf(num, sizeof num, "%" PRIu64, s[i].heartbeat_ms);
        ok = ok && cJSON_AddRawToObject(o, "heartbeat_ms", num);
        ok = ok && (t = cJSON_AddArrayToObject(o, "tables"));
        for (size_t k = 0; ok && k < s[i].ntables; k++) {
            cJSON *str = cJSON_CreateString(s[i].tables[k]);
            ok = str && cJSON_AddItemToArray(t, str);
        }
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    free(s);
    return json;
}

void hl_cluster_print(FILE *f, const hl_reg_entry *v, size_t n)
{
    hl_reg_entry *s = calloc(n ? n : 1, sizeof *s);
    if (!s)
        return;
    memcpy(s, v, n * sizeof *s);
    qsort(s, n, sizeof *s, cmp_group);
    fprintf(f, "cluster schema: %s (%zu live node%s)\n", hl_cluster_status_name(hl_cluster_status_of(v, n)), n,
            n == 1 ? "" : "s");
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || strcmp(s[i].hash, s[i - 1].hash) != 0) {
            size_t k = count_hash(s, n, s[i].hash);
            fprintf(f, "schema %s: %zu node%s\n", s[i].hash, k, k == 1 ? "" : "s");
        }
        fprintf(f, "  node %" PRIu64 ": harmonylite %s, previous schema %s, %zu table%s", s[i].node_id, s[i].version,
                s[i].prev[0] ? s[i].prev : "none", s[i].ntables, s[i].ntables == 1 ? "" : "s");
        for (size_t k = 0; k < s[i].ntables; k++)
            fprintf(f, "%s%s", k ? ", " : ": ", s[i].tables[k]);
        fputc('\n', f);
    }
    free(s);
}
