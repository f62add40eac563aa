#include "repl/queue.h"

#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

hl_status hl_queue_init(hl_queue *q, size_t max_bytes)
{
    memset(q, 0, sizeof *q);
    q->max_bytes = max_bytes;
    q->discard_shard = -1;
    q->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->wake_fd < 0)
        return HL_ERR_IO;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->space, NULL);
    return HL_OK;
}

void hl_inbound_free(hl_inbound *it)
{
    while (it) {
        hl_inbound *next = it->next;
        hl_changeset_free(it->cs);
        free(it->raw);
        free(it);
        it = next;
    }
}

void hl_queue_free(hl_queue *q)
{
    if (!q)
        return;
    hl_inbound_free(q->head);
    free(q->acks);
    if (q->wake_fd >= 0)
        close(q->wake_fd);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->space);
}

void hl_queue_wake(hl_queue *q)
{
    uint64_t one = 1;
    ssize_t r = write(q->wake_fd, &one, sizeof one);
    (void)r; /* EAGAIN means the counter is already non-zero: the engine will wake */
}

void hl_queue_drain_wake(hl_queue *q)
{
    uint64_t v;
    ssize_t r = read(q->wake_fd, &v, sizeof v);
    (void)r;
}

void hl_queue_push(hl_queue *q, hl_inbound *it)
{
    it->next = NULL;
    pthread_mutex_lock(&q->mu);
    while (!q->closed && it->shard != q->discard_shard && q->head && q->bytes + it->bytes > q->max_bytes)
        pthread_cond_wait(&q->space, &q->mu);
    if (q->closed || it->shard == q->discard_shard) {
        pthread_mutex_unlock(&q->mu);
        hl_inbound_free(it);
        return;
    }
    if (q->tail)
        q->tail->next = it;
    else
        q->head = it;
    q->tail = it;
    q->bytes += it->bytes;
    pthread_mutex_unlock(&q->mu);
    hl_queue_wake(q);
}

hl_inbound *hl_queue_pop(hl_queue *q, size_t max_rows)
{
    pthread_mutex_lock(&q->mu);
    hl_inbound *head = q->head, *last = NULL, *it = head;
    size_t rows = 0;
    while (it && (last == NULL || rows < max_rows)) {
        rows += it->cs ? it->cs->nrows : 0;
        q->bytes -= it->bytes;
        last = it;
        it = it->next;
    }
    if (last) {
        last->next = NULL;
        q->head = it;
        if (!it)
            q->tail = NULL;
        pthread_cond_broadcast(&q->space);
    }
    pthread_mutex_unlock(&q->mu);
    return last ? head : NULL;
}

bool hl_queue_has_items(hl_queue *q)
{
    pthread_mutex_lock(&q->mu);
    bool any = q->head != NULL;
    pthread_mutex_unlock(&q->mu);
    return any;
}

void hl_queue_unpop(hl_queue *q, hl_inbound *list)
{
    if (!list)
        return;
    hl_inbound *last = list;
    size_t bytes = last->bytes;
    while (last->next) {
        last = last->next;
        bytes += last->bytes;
    }
    pthread_mutex_lock(&q->mu);
    last->next = q->head;
    q->head = list;
    if (!q->tail)
        q->tail = last;
    q->bytes += bytes;
    pthread_mutex_unlock(&q->mu);
}

void hl_queue_discard_shard(hl_queue *q, int shard, bool on)
{
    hl_inbound *drop = NULL;
    pthread_mutex_lock(&q->mu);
    q->discard_shard = on ? shard : -1;
    if (on) {
        hl_inbound **pp = &q->head, *last = NULL;
        while (*pp) {
            hl_inbound *it = *pp;
            if (it->shard == shard) {
                *pp = it->next;
                q->bytes -= it->bytes;
                it->next = drop;
                drop = it;
            } else {
                last = it;
                pp = &it->next;
            }
        }
        q->tail = last;
        pthread_cond_broadcast(&q->space);
    }
    pthread_mutex_unlock(&q->mu);
    hl_inbound_free(drop);
}

void hl_queue_push_ack(hl_queue *q, hl_ack a)
{
    pthread_mutex_lock(&q->mu);
    if (q->nacks == q->acks_cap) {
        size_t ncap = q->acks_cap ? q->acks_cap * 2 : 256;
        hl_ack *na = realloc(q->acks, ncap * sizeof *na);
        if (!na) {
            /* Dropping an ack only delays the outbox delete: the changeset is
             * re-published later and deduplicated by its Msg-Id. */
            pthread_mutex_unlock(&q->mu);
            return;
        }
        q->acks = na;
        q->acks_cap = ncap;
    }
    q->acks[q->nacks++] = a;
    pthread_mutex_unlock(&q->mu);
    hl_queue_wake(q);
}

size_t hl_queue_take_acks(hl_queue *q, hl_ack **out)
{
    pthread_mutex_lock(&q->mu);
    size_t n = q->nacks;
    *out = q->acks;
    q->acks = NULL;
    q->nacks = q->acks_cap = 0;
    pthread_mutex_unlock(&q->mu);
    return n;
}

void hl_queue_close(hl_queue *q)
{
    if (!q)
        return;
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->space);
    pthread_mutex_unlock(&q->mu);
}
