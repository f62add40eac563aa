/*
 * fuzz_manifest.c - libFuzzer harness for the snapshot manifest parser.
 *
 * Manifests come from a store others can write to. Checked besides memory
 * safety: an error is exactly one line, and an accepted manifest serialises
 * to JSON that parses back to the same manifest.
 *
 *   scripts/fuzz.sh builds and runs it (with every source file it needs).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "snapshot/manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    hl_manifest m, back;
    char err[512] = "";
    hl_status st = hl_manifest_parse(&m, (const char *)data, size, err, sizeof err);
    if (st) {
        if (!err[0] || strchr(err, '\n'))
            abort();
        hl_manifest_free(&m);
        return 0;
    }
    char *json = hl_manifest_to_json(&m);
    if (!json)
        abort();
    if (hl_manifest_parse(&back, json, strlen(json), err, sizeof err) != HL_OK)
        abort();
    if (back.node != m.node || back.epoch != m.epoch || back.hlc != m.hlc || back.size != m.size ||
        back.db_size != m.db_size || back.created_ms != m.created_ms || back.nstreams != m.nstreams ||
        strcmp(back.object, m.object) || strcmp(back.sha256, m.sha256) || strcmp(back.schema_hash, m.schema_hash) ||
        strcmp(back.version, m.version))
        abort();
    for (size_t i = 0; i < m.nstreams; i++)
        if (back.streams[i].seq != m.streams[i].seq || strcmp(back.streams[i].name, m.streams[i].name))
            abort();
    free(json);
    hl_manifest_free(&back);
    hl_manifest_free(&m);
    return 0;
}
