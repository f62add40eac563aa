/* sha256.h - SHA-256 (FIPS 180-4), used for the schema hash and snapshot digests. */
#ifndef HL_SHA256_H
#define HL_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct hl_sha256 {
    uint32_t h[8];
    uint64_t len; /* bytes hashed so far */
    unsigned char block[64];
    size_t fill;
} hl_sha256;

void hl_sha256_init(hl_sha256 *s);
void hl_sha256_update(hl_sha256 *s, const void *p, size_t n);
void hl_sha256_final(hl_sha256 *s, unsigned char out[32]);
/* Writes 64 lowercase hex digits and a NUL to hex. */
void hl_hex(const unsigned char *p, size_t n, char *hex);

#endif
