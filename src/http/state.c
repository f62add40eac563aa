#include "http/state.h"

#include <stdlib.h>
#include <string.h>

const double hl_lag_bounds[HL_LAG_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                              0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 60.0};

void hl_state_init(hl_state *s)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
}

void hl_state_free(hl_state *s)
{
    if (!s)
        return;
    free(s->cur.schema_json);
    free(s->cur.cluster_json);
    s->cur.schema_json = s->cur.cluster_json = NULL;
    pthread_mutex_destroy(&s->mu);
}

/* The state's copy of text: kept when equal, replaced by a copy of text when it changed (and memory allows). */
static char *keep_or_dup(char *mine, const char *text)
{
    if (text && (!mine || strcmp(mine, text) != 0)) {
        char *dup = strdup(text);
        if (dup) {
            free(mine);
            mine = dup;
        }
    }
    return mine;
}

void hl_state_publish(hl_state *s, const hl_state_snapshot *snap)
{
    pthread_mutex_lock(&s->mu);
    char *json = keep_or_dup(s->cur.schema_json, snap->schema_json);
    char *cluster = keep_or_dup(s->cur.cluster_json, snap->cluster_json);
    s->cur = *snap;
    s->cur.schema_json = json;
    s->cur.cluster_json = cluster;
    pthread_mutex_unlock(&s->mu);
}

void hl_state_get(hl_state *s, hl_state_snapshot *out)
{
    pthread_mutex_lock(&s->mu);
    *out = s->cur;
    out->schema_json = s->cur.schema_json ? strdup(s->cur.schema_json) : NULL;
    out->cluster_json = s->cur.cluster_json ? strdup(s->cur.cluster_json) : NULL;
    pthread_mutex_unlock(&s->mu);
}

void hl_state_observe_lag(hl_state_snapshot *snap, double seconds)
{
    int i = 0;
    while (i < HL_LAG_BUCKETS && seconds > hl_lag_bounds[i])
        i++;
    snap->lag_buckets[i]++;
    snap->lag_sum += seconds;
    snap->lag_count++;
}
