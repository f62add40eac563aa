#ifndef HL_NATSIO_NKEY_H
#define HL_NATSIO_NKEY_H

#include <stddef.h>

#include "common/status.h"

/* The public key ("U...") of an NKey user seed ("SU..."): nats.c needs both. */
hl_status hl_nats_nkey_public_from_seed(const char *seed, char *pub, size_t publen);
/* The same from the first user seed in a seed or .creds file (logged on failure). */
hl_status hl_nats_nkey_public_from_file(const char *path, char *pub, size_t publen);

#endif
