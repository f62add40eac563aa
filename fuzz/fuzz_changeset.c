/*
 * fuzz_changeset.c - libFuzzer harness for the changeset wire format.
 *
 * Each input is tried as a NATS message (hl_part_parse, then reassembly of
 * that one part and decoding of its payload), as a run of length-prefixed
 * messages fed to one reassembly (parts in any order, several changesets,
 * its books checked after every part), and as a bare payload, both plain
 * CBOR and zstd-framed. A successful decode must survive the oracle: its
 * re-encoding decodes again and re-encodes to the same bytes, every row key
 * encodes, and the decoded form cost what the decoder charged, within the
 * limit (docs/protocol.md §4). Anything else (crash, leak, sanitizer report, abort) is a bug.
 *
 *   clang -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Isrc \
 *       fuzz/fuzz_changeset.c src/repl/changeset.c src/common/buf.c src/common/status.c \
 *       $(pkg-config --cflags --libs libcbor libzstd) -lm -o fuzz_changeset
 *   ./fuzz_changeset -max_total_time=60 fuzz/corpus/changeset
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "repl/changeset.h"

/* Small enough that bombs are cheap to reject, big enough for the corpus. */
#define FUZZ_MAX_BYTES ((size_t)4 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void oracle(const hl_changeset *cs)
{
    hl_buf a, b;
    hl_changeset *again = NULL;

    hl_buf_init(&a, SIZE_MAX - 1);
    hl_buf_init(&b, SIZE_MAX - 1);
    if (cs->approx_bytes != hl_changeset_mem_cost(cs) || cs->approx_bytes > FUZZ_MAX_BYTES)
        abort();
    if (hl_changeset_encode(cs, false, &a) != HL_OK)
        abort();
    if (hl_changeset_decode(a.data, a.len, false, SIZE_MAX, &again, NULL, 0) != HL_OK)
        abort();
    if (hl_changeset_encode(again, false, &b) != HL_OK)
        abort();
    if (a.len != b.len || memcmp(a.data, b.data, a.len) != 0)
        abort();
    for (size_t i = 0; i < cs->nrows; i++) {
        const hl_cs_row *r = &cs->rows[i];
        if (r->table >= cs->ntables)
            abort();
        hl_buf_reset(&b);
        if (hl_key_encode(r->key, r->nkey, &b) != HL_OK)
            abort();
    }
    hl_changeset_free(again);
    hl_buf_free(&a);
    hl_buf_free(&b);
}

static void try_decode(const void *p, size_t n, bool compressed)
{
    hl_changeset *cs = NULL;
    char err[128];
    hl_status st = hl_changeset_decode(p, n, compressed, FUZZ_MAX_BYTES, &cs, err, sizeof(err));

    if (st == HL_OK) {
        oracle(cs);
    } else if (cs != NULL || (st != HL_ERR_DECODE && st != HL_ERR_TOO_LARGE && st != HL_ERR_NOMEM)) {
        abort();
    }
    hl_changeset_free(cs);
}

/* Feeds one part; a changeset it completes is decoded. Checks the
 * reassembly's books: what it says it holds is what its changesets hold. */
static void feed(hl_reasm *r, const hl_part *p, uint64_t sseq)
{
    hl_reasm_entry *e = NULL;
    hl_status st = hl_reasm_feed(r, p, sseq, &e);
    if (st == HL_ERR_BUSY) {
        hl_reasm_drop(r, &r->pending[0]);
        st = hl_reasm_feed(r, p, sseq, &e);
    }
    if (st != HL_OK && st != HL_ERR_DECODE && st != HL_ERR_TOO_LARGE && st != HL_ERR_NOMEM)
        abort();
    uint64_t held = 0;
    for (size_t i = 0; i < r->npending; i++) {
        const hl_reasm_entry *x = &r->pending[i];
        if (x->have > x->count || x->bytes > x->total_len || x->total_len > FUZZ_MAX_BYTES)
            abort();
        held += x->bytes;
    }
    if (held != r->held || r->npending > HL_REASM_MAX_PENDING)
        abort();
    if (st == HL_OK && e && e->have == e->count) {
        if (e->bytes != e->total_len)
            abort();
        size_t len = 0;
        uint8_t flags = 0;
        uint64_t epoch = e->epoch, seq = e->seq;
        unsigned char *whole = hl_reasm_take(r, e, &len, &flags);
        try_decode(whole, len, (flags & HL_PART_FLAG_ZSTD) != 0);
        hl_reasm_mark_done(r, epoch, seq);
        free(whole);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    hl_part p;
    hl_reasm r;

    /* The input as one message. */
    hl_reasm_init(&r, FUZZ_MAX_BYTES);
    if (hl_part_parse(data, size, &p) == HL_OK)
        feed(&r, &p, 1);
    hl_reasm_free(&r);
    /* The input as a run of messages of one origin, each preceded by a
     * two-byte length: parts in any order, of several changesets. */
    hl_reasm_init(&r, FUZZ_MAX_BYTES);
    for (size_t at = 0, sseq = 1; at + 2 <= size; sseq++) {
        size_t n = (size_t)data[at] << 8 | data[at + 1];
        at += 2;
        if (n > size - at)
            n = size - at;
        if (hl_part_parse(data + at, n, &p) == HL_OK)
            feed(&r, &p, sseq);
        at += n;
    }
    hl_reasm_free(&r);
    try_decode(data, size, false);
    try_decode(data, size, true);
    return 0;
}
