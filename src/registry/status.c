/*
 * status.c - harmonylite -schema-status and -schema-status-cluster
 * (registry.h; docs/operations.md).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

#include "common/buf.h"
#include "db/db.h"
#include "registry/registry.h"

/* "held": one object per origin, as /schema lists them. */
static cJSON *held_json(const hl_held_origin *v, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    char num[24], epoch[17];
    for (size_t i = 0; a && i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(a, o))
            break;
        snprintf(num, sizeof num, "%" PRIu64, v[i].node);
        cJSON_AddRawToObject(o, "origin", num);
        snprintf(epoch, sizeof epoch, "%016" PRIx64, v[i].epoch);
        cJSON_AddStringToObject(o, "epoch", epoch);
        snprintf(num, sizeof num, "%" PRIu64, v[i].count);
        cJSON_AddRawToObject(o, "changesets", num);
        snprintf(num, sizeof num, "%" PRIu64, v[i].for_schema);
        cJSON_AddRawToObject(o, "waiting_for_schema", num);
        snprintf(num, sizeof num, "%" PRIu64, v[i].first_seq);
        cJSON_AddRawToObject(o, "first_seq", num);
        snprintf(num, sizeof num, "%" PRIu64, v[i].bytes);
        cJSON_AddRawToObject(o, "bytes", num);
        cJSON_AddStringToObject(o, "reason", v[i].reason);
    }
    return a;
}

int hl_schema_status_local(const hl_config *c, bool json)
{
    hl_db *d = NULL;
    hl_held_origin *held = NULL;
    size_t nheld = 0;
    char *tables = NULL;
    hl_status st = hl_db_open(&d, c->db_path, c->node_id, 0);
    if (!st)
        st = hl_db_schema_read(d);
    if (!st)
        st = hl_db_held_list(d, &held, &nheld);
    if (!st && !(tables = hl_db_schema_json(d)))
        st = HL_ERR_NOMEM;
    if (st) {
        fprintf(stderr, "harmonylite: -schema-status: %s: %s\n", c->db_path, hl_status_str(st));
        hl_db_close(d);
        return 1;
    }
    char hash[65], prev[65] = "";
    hl_hex(hl_db_schema_hash(d), 32, hash);
    if (hl_db_prev_schema_hash(d))
        hl_hex(hl_db_prev_schema_hash(d), 32, prev);
    cJSON *t = cJSON_Parse(tables);
    if (json) {
        cJSON *o = cJSON_CreateObject();
        char num[24];
        snprintf(num, sizeof num, "%" PRIu64, c->node_id);
        cJSON_AddRawToObject(o, "node_id", num);
        cJSON_AddStringToObject(o, "schema_hash", hash);
        if (prev[0])
            cJSON_AddStringToObject(o, "previous_schema_hash", prev);
        else
            cJSON_AddNullToObject(o, "previous_schema_hash");
        cJSON_AddItemToObject(o, "tables", t ? t : cJSON_CreateArray());
        t = NULL;
        cJSON_AddItemToObject(o, "held", held_json(held, nheld));
        char *out = cJSON_Print(o);
        if (out)
            printf("%s\n", out);
        free(out);
        cJSON_Delete(o);
    } else {
        printf("node %" PRIu64 "\nschema hash: %s\nprevious schema hash: %s\n", c->node_id, hash,
               prev[0] ? prev : "none");
        printf("replicated tables (%d)", t ? cJSON_GetArraySize(t) : 0);
        const cJSON *e;
        int i = 0;
        cJSON_ArrayForEach(e, t)
        {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
            printf("%s%s", i++ ? ", " : ": ", cJSON_IsString(name) ? name->valuestring : "?");
        }
        printf("\n");
        if (!nheld)
            printf("held changesets: none\n");
        for (size_t k = 0; k < nheld; k++)
            printf("held from origin %" PRIu64 ": %" PRIu64 " changesets (%" PRIu64 " waiting for the schema, %" PRIu64
                   " bytes), first seq %" PRIu64 ": %s\n",
                   held[k].node, held[k].count, held[k].for_schema, held[k].bytes, held[k].first_seq, held[k].reason);
    }
    cJSON_Delete(t);
    free(tables);
    hl_held_list_free(held);
    hl_db_close(d);
    return 0;
}

int hl_schema_status_cluster(const hl_config *c, bool json)
{
    hl_nats *n = NULL;
    hl_kv *kv = NULL;
    hl_reg_entry *v = NULL;
    size_t nv = 0;
    hl_status st = hl_nats_connect_node(&n, c, NULL, 0);
    if (st) {
        fprintf(stderr, "harmonylite: -schema-status-cluster: cannot reach NATS: %s\n", hl_status_str(st));
        return 1;
    }
    st = hl_registry_open_bucket(&kv, n, c, false);
    if (!st)
        st = hl_registry_read(kv, &v, &nv);
    hl_kv_free(kv);
    hl_nats_close(n, 2000);
    hl_nats_shutdown(2000);
    if (st == HL_ERR_NOT_FOUND) {
        fprintf(stderr,
                "harmonylite: -schema-status-cluster: registry bucket %s does not exist: no node has registered\n",
                c->schema.registry_bucket);
        return 1;
    }
    if (st) {
        fprintf(stderr, "harmonylite: -schema-status-cluster: cannot read registry bucket %s: %s\n",
                c->schema.registry_bucket, hl_status_str(st));
        return 1;
    }
    hl_cluster_status cs = hl_cluster_status_of(v, nv);
    if (json) {
        char *j = hl_cluster_json(v, nv);
        cJSON *o = j ? cJSON_Parse(j) : NULL;
        char *out = o ? cJSON_Print(o) : NULL;
        if (out)
            printf("%s\n", out);
        free(out);
        cJSON_Delete(o);
        free(j);
    } else {
        hl_cluster_print(stdout, v, nv);
    }
    hl_reg_entries_free(v, nv);
    return cs == HL_CLUSTER_INCOMPATIBLE ? 1 : 0;
}
