/*
 * fuzz_s3xml.c - libFuzzer harness for the XML reader of src/snapshot/s3xml.c:
 * S3's ListObjectsV2 pages, error bodies and UploadId, and WebDAV's PROPFIND
 * hrefs.
 *
 * Checked besides memory safety: every listed name is a valid snapshot name,
 * every text found is NUL-terminated inside its buffer.
 *
 *   scripts/fuzz.sh builds and runs it (with every source file it needs).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "snapshot/manifest.h"
#include "snapshot/s3xml.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static hl_status check_href(void *ctx, const char *text)
{
    size_t *n = ctx;
    if (strlen(text) >= 64)
        abort();
    ++*n;
    return HL_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *xml = (const char *)data;
    hl_store_names names = {0};
    bool truncated = false;
    char token[64], text[32];
    if (hl_s3xml_list(xml, size, "p/", &names, &truncated, token, sizeof token) == HL_OK) {
        for (size_t i = 0; i < names.n; i++)
            if (!hl_snapshot_name_ok(names.v[i]))
                abort();
        if (truncated && (!token[0] || strlen(token) >= sizeof token))
            abort();
    }
    for (size_t i = 0; i < names.n; i++) /* as hl_store_names_free, which lives with the stores */
        free(names.v[i]);
    free(names.v);
    size_t pos = 0;
    int r;
    while ((r = hl_s3xml_text(xml, size, &pos, "Code", text, sizeof text)) == 1)
        if (strlen(text) >= sizeof text || pos > size)
            abort();
    size_t hrefs = 0;
    hl_status st = hl_xml_each(xml, size, "href", 64, 1000, check_href, &hrefs);
    if (st == HL_OK && hrefs > 1000)
        abort();
    return 0;
}
