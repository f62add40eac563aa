/*
 * test_queue.c - the engine queue: byte bound, pop batches, unpop, close, acks
 * and the eventfd wake-up.
 *
 * A producer that must wait runs on its own thread; the test observes it
 * through the queue itself, never through how long anything took.
 */
#include <check.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "repl/queue.h"

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* An item carrying id in safe_seq, accounted as bytes, with a changeset of rows rows (none: no changeset). */
static hl_inbound *item(uint64_t id, size_t bytes, size_t rows)
{
    hl_inbound *it = calloc(1, sizeof *it);
    ck_assert_ptr_nonnull(it);
    it->safe_seq = id;
    it->bytes = bytes;
    if (rows) {
        const char *cols[] = {"id"};
        uint32_t t;
        it->cs = hl_changeset_new();
        ck_assert_ptr_nonnull(it->cs);
        ck_assert_int_eq(hl_changeset_add_table(it->cs, "t", cols, 1, cols, 1, &t), HL_OK);
        for (size_t i = 0; i < rows; i++) {
            hl_value v = {.type = HL_VAL_INT, .u.i = (int64_t)i};
            ck_assert_int_eq(hl_changeset_add_row(it->cs, t, HL_OP_UPSERT, 1, &v, 1, &v, 1), HL_OK);
        }
    }
    return it;
}

static size_t list_len(const hl_inbound *l)
{
    size_t n = 0;
    for (; l; l = l->next)
        n++;
    return n;
}

/* Pops everything and checks the ids are first, first + 1, ... */
static void expect_ids(hl_queue *q, uint64_t first, size_t n)
{
    hl_inbound *l = hl_queue_pop(q, SIZE_MAX);
    ck_assert_uint_eq(list_len(l), n);
    uint64_t want = first;
    for (hl_inbound *it = l; it; it = it->next)
        ck_assert_uint_eq(it->safe_seq, want++);
    hl_inbound_free(l);
    ck_assert(!hl_queue_has_items(q));
    ck_assert_uint_eq(q->bytes, 0);
}

static bool readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* Waits (generously) until fd is readable. */
static bool wait_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 60000) == 1 && (p.revents & POLLIN);
}

typedef struct pusher {
    hl_queue *q;
    hl_inbound *it;
    pthread_t th;
    atomic_int done;
} pusher;

static void *push_thread(void *arg)
{
    pusher *p = arg;
    hl_queue_push(p->q, p->it);
    atomic_store(&p->done, 1);
    return NULL;
}

static void pusher_start(pusher *p, hl_queue *q, hl_inbound *it)
{
    memset(p, 0, sizeof *p);
    p->q = q;
    p->it = it;
    ck_assert_int_eq(pthread_create(&p->th, NULL, push_thread, p), 0);
}

/* The pusher is still inside hl_queue_push after giving it ample chance to get
 * through (a pusher that got through wrongly is seen; one merely slow is not
 * mistaken for a blocked one, since only "not done" is asserted). */
static void expect_blocked(pusher *p)
{
    sleep_ms(300);
    ck_assert_int_eq(atomic_load(&p->done), 0);
}

/* ---- tests ---- */

START_TEST(push_pop_order_and_wake)
{
    hl_queue q;
    ck_assert_int_eq(hl_queue_init(&q, 1 << 20), HL_OK);
    ck_assert_ptr_null(hl_queue_pop(&q, 10));
    ck_assert(!hl_queue_has_items(&q));
    ck_assert(!readable(q.wake_fd));
    for (uint64_t i = 1; i <= 5; i++)
        hl_queue_push(&q, item(i, 100, 1));
    ck_assert(hl_queue_has_items(&q));
    ck_assert_uint_eq(q.bytes, 500);
    /* Pushing woke the engine; draining clears the wake-up. */
    ck_assert(readable(q.wake_fd));
    hl_queue_drain_wake(&q);
    ck_assert(!readable(q.wake_fd));
    /* A batch stops once it holds max_rows rows. */
    hl_inbound *l = hl_queue_pop(&q, 2);
    ck_assert_uint_eq(list_len(l), 2);
    ck_assert_uint_eq(l->safe_seq, 1);
    ck_assert_uint_eq(l->next->safe_seq, 2);
    ck_assert_uint_eq(q.bytes, 300);
    hl_inbound_free(l);
    expect_ids(&q, 3, 3);
    hl_queue_free(&q);
}
END_TEST

START_TEST(pop_counts_rows_not_items)
{
    hl_queue q;
    ck_assert_int_eq(hl_queue_init(&q, 1 << 20), HL_OK);
    /* Position-only items (no changeset) carry no rows: they ride along. */
    hl_queue_push(&q, item(1, 10, 0));
    hl_queue_push(&q, item(2, 10, 0));
    hl_queue_push(&q, item(3, 10, 5));
    hl_queue_push(&q, item(4, 10, 0));
    hl_queue_push(&q, item(5, 10, 3));
    hl_inbound *l = hl_queue_pop(&q, 5);
    ck_assert_uint_eq(list_len(l), 3);
    hl_inbound_free(l);
    /* At least one item even when it alone holds more than max_rows. */
    l = hl_queue_pop(&q, 1);
    ck_assert_uint_eq(list_len(l), 2);
    ck_assert_uint_eq(l->next->safe_seq, 5);
    hl_inbound_free(l);
    hl_queue_push(&q, item(6, 10, 100));
    hl_queue_push(&q, item(7, 10, 1));
    l = hl_queue_pop(&q, 0);
    ck_assert_uint_eq(list_len(l), 1);
    hl_inbound_free(l);
    expect_ids(&q, 7, 1);
    hl_queue_free(&q);
}
END_TEST

START_TEST(byte_bound_blocks_producer)
{
    hl_queue q;
    ck_assert_int_eq(hl_queue_init(&q, 1000), HL_OK);
    /* An item larger than the bound still goes into an empty queue (or
     * nothing bigger than the bound could ever pass). */
    hl_queue_push(&q, item(1, 5000, 1));
    expect_ids(&q, 1, 1);

    hl_queue_push(&q, item(1, 600, 1));
    hl_queue_push(&q, item(2, 400, 1)); /* exactly at the bound */
    ck_assert_uint_eq(q.bytes, 1000);
    pusher p;
    pusher_start(&p, &q, item(3, 1, 1));
    expect_blocked(&p);
    ck_assert_uint_eq(q.bytes, 1000);

    /* Popping one item makes room: the producer resumes. */
    hl_queue_drain_wake(&q);
    hl_inbound *l = hl_queue_pop(&q, 1);
    ck_assert_uint_eq(list_len(l), 1);
    ck_assert_uint_eq(l->safe_seq, 1);
    hl_inbound_free(l);
    ck_assert_int_eq(pthread_join(p.th, NULL), 0);
    ck_assert_int_eq(atomic_load(&p.done), 1);
    ck_assert(wait_readable(q.wake_fd));
    ck_assert_uint_eq(q.bytes, 401);

    /* Not enough room for a big one: it waits until enough is popped. */
    pusher_start(&p, &q, item(4, 700, 1));
    expect_blocked(&p);
    l = hl_queue_pop(&q, 1); /* 2 out: 1 byte left, 701 fits */
    hl_inbound_free(l);
    ck_assert_int_eq(pthread_join(p.th, NULL), 0);
    expect_ids(&q, 3, 2);
    hl_queue_free(&q);
}
END_TEST

START_TEST(unpop_restores_order_and_bytes)
{
    hl_queue q;
    ck_assert_int_eq(hl_queue_init(&q, 1000), HL_OK);
    for (uint64_t i = 1; i <= 5; i++)
        hl_queue_push(&q, item(i, 100, 1));
    /* A failed transaction puts its batch back in front of what is left. */
    hl_inbound *l = hl_queue_pop(&q, 2);
    ck_assert_uint_eq(q.bytes, 300);
    hl_queue_push(&q, item(6, 100, 1)); /* pushed while the batch was out */
    hl_queue_unpop(&q, l);
    ck_assert_uint_eq(q.bytes, 600);
    expect_ids(&q, 1, 6);

    /* Into an empty queue: the list becomes the whole queue, and a push goes after it. */
    for (uint64_t i = 1; i <= 3; i++)
        hl_queue_push(&q, item(i, 100, 1));
    l = hl_queue_pop(&q, SIZE_MAX);
    ck_assert(!hl_queue_has_items(&q));
    hl_queue_unpop(&q, l);
    hl_queue_push(&q, item(4, 100, 1));
    expect_ids(&q, 1, 4);

    /* The bytes put back count against the bound again. */
    hl_queue_push(&q, item(1, 500, 1));
    hl_queue_push(&q, item(2, 500, 1));
    l = hl_queue_pop(&q, SIZE_MAX);
    hl_queue_unpop(&q, l);
    pusher p;
    pusher_start(&p, &q, item(3, 100, 1));
    expect_blocked(&p);
    l = hl_queue_pop(&q, 1);
    hl_inbound_free(l);
    ck_assert_int_eq(pthread_join(p.th, NULL), 0);
    expect_ids(&q, 2, 2);

    hl_queue_unpop(&q, NULL); /* nothing to put back */
    ck_assert(!hl_queue_has_items(&q));
    hl_queue_free(&q);
}
END_TEST

START_TEST(close_wakes_blocked_producers)
{
    hl_queue q;
    ck_assert_int_eq(hl_queue_init(&q, 100), HL_OK);
    hl_queue_push(&q, item(1, 100, 1));
    pusher p[3];
    for (int i = 0; i < 3; i++)
        pusher_start(&p[i], &q, item(2 + (uint64_t)i, 50, 1));
    for (int i = 0; i < 3; i++)
        expect_blocked(&p[i]);
    hl_queue_close(&q);
    /* Every waiting producer returns; their items are freed, not queued (ASan: no leak). */
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(pthread_join(p[i].th, NULL), 0);
        ck_assert_int_eq(atomic_load(&p[i].done), 1);
    }
    ck_assert_uint_eq(q.bytes, 100);
    /* A push after close returns at once, even with room. */
    hl_inbound_free(hl_queue_pop(&q, SIZE_MAX));
    hl_queue_push(&q, item(9, 1, 1));
    ck_assert(!hl_queue_has_items(&q));
    hl_queue_free(&q); /* frees whatever is still queued */
}
END_TEST

typedef struct acker {
    hl_queue *q;
    uint64_t base;
    int n;
    pthread_t th;
} acker;

static void *ack_thread(void *arg)
{
    acker *a = arg;
    for (int i = 0; i < a->n; i++)
        hl_queue_push_ack(a->q, (hl_ack){.seq = a->base + (uint64_t)i, .part = (uint32_t)i, .ok = i % 7 != 0});
    return NULL;
}

START_TEST(acks_are_delivered)
{
    hl_queue q;
    ck_assert_int_eq(hl_queue_init(&q, 100), HL_OK);
    hl_ack *acks = (hl_ack *)&q; /* must be replaced */
    ck_assert_uint_eq(hl_queue_take_acks(&q, &acks), 0);
    free(acks);
    ck_assert(!readable(q.wake_fd));

    /* Acks are not bounded by the byte limit (a full queue must not hold them
     * up) and come out in the order each producer pushed them. */
    hl_queue_push(&q, item(1, 100, 1));
    enum { THREADS = 4, PER = 1000 };
    acker a[THREADS];
    for (int t = 0; t < THREADS; t++) {
        a[t] = (acker){.q = &q, .base = (uint64_t)(t + 1) * 1000000u, .n = PER};
        ck_assert_int_eq(pthread_create(&a[t].th, NULL, ack_thread, &a[t]), 0);
    }
    for (int t = 0; t < THREADS; t++)
        ck_assert_int_eq(pthread_join(a[t].th, NULL), 0);
    ck_assert(wait_readable(q.wake_fd));
    size_t n = hl_queue_take_acks(&q, &acks);
    ck_assert_uint_eq(n, THREADS * PER);
    uint64_t next[THREADS];
    for (int t = 0; t < THREADS; t++)
        next[t] = a[t].base;
    for (size_t i = 0; i < n; i++) {
        int t = (int)(acks[i].seq / 1000000u) - 1;
        ck_assert_int_ge(t, 0);
        ck_assert_int_lt(t, THREADS);
        ck_assert_uint_eq(acks[i].seq, next[t]);
        uint32_t k = (uint32_t)(acks[i].seq - a[t].base);
        ck_assert_uint_eq(acks[i].part, k);
        ck_assert(acks[i].ok == (k % 7 != 0));
        next[t]++;
    }
    free(acks);
    /* Taken means gone. */
    ck_assert_uint_eq(hl_queue_take_acks(&q, &acks), 0);
    free(acks);
    hl_queue_push_ack(&q, (hl_ack){.seq = 5, .part = 1, .ok = true});
    ck_assert_uint_eq(hl_queue_take_acks(&q, &acks), 1);
    ck_assert_uint_eq(acks[0].seq, 5);
    free(acks);
    expect_ids(&q, 1, 1);
    hl_queue_free(&q);
}
END_TEST

/* Like every other destructor, the queue's accept NULL (issue 9). */
START_TEST(null_queue_is_a_no_op)
{
    hl_queue_close(NULL);
    hl_queue_free(NULL);
    hl_inbound_free(NULL);
}
END_TEST

static Suite *queue_suite(void)
{
    Suite *s = suite_create("queue");
    struct {
        const char *name;
        const TTest *test;
    } cases[] = {
        {"push_pop_order_and_wake", push_pop_order_and_wake},
        {"pop_counts_rows_not_items", pop_counts_rows_not_items},
        {"byte_bound_blocks_producer", byte_bound_blocks_producer},
        {"unpop_restores_order_and_bytes", unpop_restores_order_and_bytes},
        {"close_wakes_blocked_producers", close_wakes_blocked_producers},
        {"acks_are_delivered", acks_are_delivered},
        {"null_queue_is_a_no_op", null_queue_is_a_no_op},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, cases[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void)
{
    hl_log_setup(HL_LOG_INFO, false, 0);
    SRunner *sr = srunner_create(queue_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
