/*
 * nkey.c - NKey public keys from seeds (Ed25519 through OpenSSL): harmonylite's
 * client login (conn.c) and the embedded server's authorization (server.c).
 */
#include "natsio/nkey.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "common/log.h"

static const char b32_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

static uint16_t crc16_xmodem(const unsigned char *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (uint16_t)((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

/* Decodes unpadded RFC 4648 base32; returns the byte count or -1. */
static int b32_decode(const char *s, size_t slen, unsigned char *out, size_t outlen)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < slen; i++) {
        const char *q = memchr(b32_alphabet, s[i], 32);
        if (!q)
            return -1;
        acc = (acc << 5) | (uint32_t)(q - b32_alphabet);
        bits += 5;
        if (bits >= 8) {
            bits -= 8;
            if (o == outlen)
                return -1;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    return (int)o;
}

static void b32_encode(const unsigned char *p, size_t n, char *out, size_t outlen)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n && o + 1 < outlen; i++) {
        acc = (acc << 8) | p[i];
        bits += 8;
        while (bits >= 5 && o + 1 < outlen) {
            bits -= 5;
            out[o++] = b32_alphabet[(acc >> bits) & 31];
        }
    }
    if (bits > 0 && o + 1 < outlen)
        out[o++] = b32_alphabet[(acc << (5 - bits)) & 31];
    out[o] = 0;
}

hl_status hl_nats_nkey_public_from_seed(const char *seed, char *pub, size_t publen)
{
    /* An encoded seed is 2 prefix bytes, 32 key bytes, 2 CRC bytes; the public
     * key is 1 prefix byte, 32 key bytes, 2 CRC bytes (both little-endian CRC16). */
    enum { PREFIX_SEED = 18 << 3, PREFIX_USER = 20 << 3 };
    unsigned char raw[40], pk[35];
    size_t pklen = 32;
    hl_status st = HL_ERR_INVALID;
    EVP_PKEY *key = NULL;
    int n = b32_decode(seed, strlen(seed), raw, sizeof raw);
    if (n != 36 || publen < 57)
        goto out;
    uint16_t want = (uint16_t)(raw[34] | raw[35] << 8);
    if (crc16_xmodem(raw, 34) != want)
        goto out;
    if ((raw[0] & 0xf8) != PREFIX_SEED || (((raw[0] & 7) << 5) | ((raw[1] & 0xf8) >> 3)) != PREFIX_USER)
        goto out;
    key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, raw + 2, 32);
    if (!key || EVP_PKEY_get_raw_public_key(key, pk + 1, &pklen) != 1 || pklen != 32)
        goto out;
    pk[0] = PREFIX_USER;
    uint16_t crc = crc16_xmodem(pk, 33);
    pk[33] = (unsigned char)(crc & 0xff);
    pk[34] = (unsigned char)(crc >> 8);
    b32_encode(pk, sizeof pk, pub, publen);
    st = HL_OK;
out:
    EVP_PKEY_free(key);
    OPENSSL_cleanse(raw, sizeof raw);
    return st;
}

/* Reads the first user seed ("SU" + 56 base32 characters) from a seed file,
 * either a bare `nk -gen user` file or a .creds-style file, and derives its
 * public key: nats.c needs both (natsOptions_SetNKeyFromSeed). */
hl_status hl_nats_nkey_public_from_file(const char *path, char *pub, size_t publen)
{
    char buf[16384];
    size_t len = 0;
    hl_status st = HL_ERR_CONFIG;
    FILE *f = fopen(path, "re");
    if (!f) {
        hl_log(HL_LOG_ERROR, "cannot read nats.seed_file", "component", "nats", "path", path, "error", strerror(errno),
               NULL);
        return HL_ERR_CONFIG;
    }
    len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = 0;
    for (size_t i = 0; i < len;) {
        size_t run = 0;
        while (i + run < len && memchr(b32_alphabet, buf[i + run], 32))
            run++;
        if (run == 58 && buf[i] == 'S' && buf[i + 1] == 'U') {
            char seed[59];
            memcpy(seed, buf + i, 58);
            seed[58] = 0;
            st = hl_nats_nkey_public_from_seed(seed, pub, publen);
            OPENSSL_cleanse(seed, sizeof seed);
            break;
        }
        i += run ? run : 1;
    }
    OPENSSL_cleanse(buf, sizeof buf);
    if (st)
        hl_log(HL_LOG_ERROR, "nats.seed_file holds no valid user NKey seed (SU...)", "component", "nats", "path", path,
               NULL);
    return st;
}
