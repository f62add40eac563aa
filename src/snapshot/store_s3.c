/* store_s3.c - placeholder until the S3 store lands (next commit). */
#include <stdio.h>

#include "snapshot/store.h"

hl_status hl_store_s3_open(hl_store **out, const hl_config *c, char *err, size_t errlen)
{
    (void)c;
    *out = NULL;
    snprintf(err, errlen, "snapshot.store: s3 is not built yet; use dir");
    return HL_ERR_CONFIG;
}
