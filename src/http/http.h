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

/* Starts listening on bind ("host:port", "[v6]:port" or ":port"). state must outlive the server. */
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
