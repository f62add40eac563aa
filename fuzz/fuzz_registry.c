/*
 * fuzz_registry.c - libFuzzer harness for schema registry entries read from
 * the network (src/registry/entry.c): hl_reg_entry_decode on an arbitrary key
 * and value, then the cluster verdicts over the result.
 *
 * The input is "<key>\n<value>". Checked besides memory safety: an accepted
 * entry has a node id from 1 to 2^63-1 that its key names, hashes of 64
 * lowercase hex digits (the previous one possibly empty), at most
 * HL_REG_MAX_TABLES non-empty table names, and survives an encode/decode round
 * trip unchanged; the verdicts and renderings never fail on it.
 *
 *   scripts/fuzz.sh builds and runs it (with every source file it needs).
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "registry/registry.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_hash(const char *h, bool may_be_empty)
{
    size_t n = strlen(h);
    if (n == 0 && may_be_empty)
        return;
    if (n != 64 || strspn(h, "0123456789abcdef") != 64)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl || nl - data > 300)
        return 0;
    char key[301];
    memcpy(key, data, (size_t)(nl - data));
    key[nl - data] = 0;
    const uint8_t *v = nl + 1;
    size_t vlen = size - (size_t)(v - data);
    char why[200];
    hl_reg_entry e;
    if (hl_reg_entry_decode(key, v, vlen, &e, why, sizeof why) != HL_OK)
        return 0;
    char want[40];
    snprintf(want, sizeof want, HL_REG_KEY_PREFIX "%" PRIu64, e.node_id);
    if (e.node_id == 0 || e.node_id > INT64_MAX || strcmp(want, key) != 0)
        abort();
    check_hash(e.hash, false);
    check_hash(e.prev, true);
    if (e.ntables > HL_REG_MAX_TABLES)
        abort();
    for (size_t i = 0; i < e.ntables; i++)
        if (!e.tables[i][0])
            abort();
    char *json = hl_reg_entry_encode(&e);
    if (json) {
        hl_reg_entry back;
        if (hl_reg_entry_decode(key, (const unsigned char *)json, strlen(json), &back, why, sizeof why) != HL_OK ||
            strcmp(back.hash, e.hash) || strcmp(back.prev, e.prev) || back.ntables != e.ntables ||
            back.started_ms != e.started_ms || back.heartbeat_ms != e.heartbeat_ms || strcmp(back.version, e.version))
            abort();
        for (size_t i = 0; i < e.ntables; i++)
            if (strcmp(back.tables[i], e.tables[i]) != 0)
                abort();
        hl_reg_entry_free(&back);
        free(json);
    }
    hl_reg_entry v2[2] = {e, e};
    v2[1].node_id = e.node_id == 1 ? 2 : 1;
    (void)hl_cluster_status_of(v2, 2);
    (void)hl_cluster_odd_one_out(v2, 2, e.node_id, why, sizeof why);
    free(hl_cluster_json(v2, 2));
    FILE *devnull = fopen("/dev/null", "w");
    if (devnull) {
        hl_cluster_print(devnull, v2, 2);
        fclose(devnull);
    }
    hl_reg_entry_free(&e);
    return 0;
}
