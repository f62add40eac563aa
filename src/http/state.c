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

void hl_state_destroy(hl_state *s)
{
    free(s->cur.schema_json);
    s->cur.schema_json = NULL;
    pthread_mutex_destroy(&s->mu);
}

void hl_state_publish(hl_state *s, const hl_state_snapshot *snap)
{
    pthread_mutex_lock(&s->mu);
    char *json = s->cur.schema_json;
    if (snap->schema_json && (!json || strcmp(json, snap->schema_json) != 0)) {
        char *dup = strdup(snap->schema_json);
        if (dup) {
            free(json);
            json = dup;
        }
    }
    s->cur = *snap;
    s->cur.schema_json = json;
    pthread_mutex_unlock(&s->mu);
}

void hl_state_get(hl_state *s, hl_state_snapshot *out)
{
    pthread_mutex_lock(&s->mu);
    *out = s->cur;
    out->schema_json = s->cur.schema_json ? strdup(s->cur.schema_json) : NULL;
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
