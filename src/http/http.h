/*
 * http.h - /healthz /readyz /metrics /schema on one libmicrohttpd listener.
 *
 * Runs in libmicrohttpd's own thread and reads only hl_state snapshots.
 */
#ifndef HL_HTTP_H
#define HL_HTTP_H

#include "common/status.h"
#include "http/state.h"

typedef struct hl_http hl_http;

typedef struct hl_http_opts {
    const char *bind;               /* "host:port", "[v6]:port" or ":port" (required) */
    int max_connections;            /* open at once on the listener (0: 1024) */
    int max_connections_per_client; /* open at once from one client address (0: 16) */
    int request_timeout_s;          /* hard deadline of a request, from the connection's start or the end of
                                       its previous request; trickled bytes do not extend it (0: 10) */
    const char *auth_token_file;    /* bearer token required by /metrics and /schema (NULL or "": none) */
} hl_http_opts;

/* Starts listening with o (copied). state must outlive the server. HL_ERR_INVALID for a bad
 * address, HL_ERR_CONFIG for an unreadable or bad token file, HL_ERR_IO when it cannot listen. */
hl_status hl_http_start_opts(hl_http **out, const hl_http_opts *o, hl_state *state);
/* hl_http_start_opts with bind and the defaults. */
hl_status hl_http_start(hl_http **out, const char *bind, hl_state *state);
/* Port actually bound (useful with port 0). */
int hl_http_port(const hl_http *h);
/* Stops and frees. NULL is a no-op. */
void hl_http_stop(hl_http *h);

/* Renders bodies (exposed for unit tests). Return a new NUL-terminated string; *code gets the HTTP status. */
char *hl_http_render_healthz(const hl_state_snapshot *s, uint64_t now_mono_ms, int *code);
char *hl_http_render_readyz(const hl_state_snapshot *s, int *code);
char *hl_http_render_metrics(const hl_state_snapshot *s);
char *hl_http_render_schema(const hl_state_snapshot *s);

#endif
