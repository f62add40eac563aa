/*
 * fuzz_discovery.c - libFuzzer harness for what turns DNS answers into the
 * nats-server config: hl_discovery_srv_routes / hl_discovery_addr_routes on
 * arbitrary DNS messages, then hl_nats_server_render with the resulting peer
 * set.
 *
 * The first input byte picks the answer type (SRV, A, AAAA), the rest is the
 * DNS message. Checked besides memory safety: every name that becomes a route
 * passed the strict host name check, and every route line of the rendered
 * config is exactly `    "nats://<host>:<port>"` with <host> made of letters,
 * digits, '-', '.' (or a bracketed IPv6 address) and <port> 1..65535 -- no
 * answer can add config text. The generated config has as many lines as one
 * rendered with no DNS routes plus one per route.
 *
 *   scripts/fuzz.sh builds and runs it (with every source file it needs).
 */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "config/config.h"
#include "natsio/discovery.h"
#include "natsio/server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void check_route_line(const char *line, size_t len)
{
    static const char pre[] = "    \"nats://";
    if (len < sizeof pre || memcmp(line, pre, sizeof pre - 1) != 0 || line[len - 1] != '"')
        abort();
    const char *h = line + sizeof pre - 1, *end = line + len - 1;
    const char *colon = NULL;
    for (const char *p = h; p < end; p++)
        if (*p == ':')
            colon = p;
    if (!colon || colon == h)
        abort();
    bool v6 = h[0] == '[';
    for (const char *p = h; p < colon; p++) {
        unsigned char ch = (unsigned char)*p;
        bool ok = isalnum(ch) || ch == '-' || ch == '.' || (v6 && (ch == ':' || ch == '[' || ch == ']'));
        if (!ok || (!v6 && isupper(ch)))
            abort();
    }
    long port = 0;
    if (colon + 1 == end)
        abort();
    for (const char *p = colon + 1; p < end; p++) {
        if (!isdigit((unsigned char)*p))
            abort();
        port = port * 10 + (*p - '0');
        if (port > 65535)
            abort();
    }
    if (port < 1)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 65536)
        return 0;
    hl_peer_set p, base;
    hl_peer_set_init(&p);
    hl_peer_set_init(&base);
    size_t rejected = 0;
    hl_status st;
    int mode = data[0] % 3;
    if (mode == 0)
        st = hl_discovery_srv_routes(data + 1, (int)(size - 1), &p, &rejected);
    else
        st = hl_discovery_addr_routes(data + 1, (int)(size - 1), mode == 2, 6222, &p);
    if (st != HL_OK && p.routes.n != 0 && st != HL_ERR_NOMEM)
        abort(); /* a failed answer must not leave routes behind */
    if (p.routes.n > HL_DISCOVERY_MAX_ANSWERS * 2)
        abort();
    for (size_t i = 1; i < p.routes.n; i++)
        if (strcmp(p.routes.v[i - 1], p.routes.v[i]) >= 0)
            abort(); /* sorted and unique */

    hl_config c;
    memset(&c, 0, sizeof c);
    c.node_id = 1;
    c.data_dir = (char *)"/tmp/fuzz-discovery";
    c.nats.bind_address = (char *)"127.0.0.1:4222";
    c.nats.cluster_addr = (char *)"127.0.0.1:6222";
    c.nats.max_payload = 1048576;
    /* A fixed route so that an empty answer still renders. */
    hl_peer_set_add_route(&p, "nats://fixed.example:6222");
    hl_peer_set_add_route(&base, "nats://fixed.example:6222");

    hl_buf out, ref;
    hl_buf_init(&out, 1 << 24);
    hl_buf_init(&ref, 1 << 24);
    if (hl_nats_server_render(&c, &p, &out) != HL_OK || hl_nats_server_render(&c, &base, &ref) != HL_OK)
        abort();
    const char *t = hl_buf_str(&out);
    if (count_lines(t) != count_lines(hl_buf_str(&ref)) + p.routes.n - 1)
        abort();
    const char *r = strstr(t, "  routes: [\n");
    if (!r)
        abort();
    r += strlen("  routes: [\n");
    for (size_t i = 0; i < p.routes.n; i++) {
        const char *nl = strchr(r, '\n');
        if (!nl)
            abort();
        check_route_line(r, (size_t)(nl - r));
        r = nl + 1;
    }
    if (strncmp(r, "  ]\n}\n", 6) != 0)
        abort();

    hl_buf_free(&out);
    hl_buf_free(&ref);
    hl_peer_set_free(&p);
    hl_peer_set_free(&base);
    return 0;
}
