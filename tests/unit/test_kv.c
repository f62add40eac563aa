/*
 * test_kv.c - natsio/kv against a real nats-server with JetStream.
 *
 * Every test starts its own server on a free port with a fresh store directory
 * and connects inside the (forked) test.
 */
#include <poll.h>

#include "common/log.h"
#include "kv_fixture.h"

static void get_str(hl_kv *kv, const char *key, const char *want, uint64_t want_rev)
{
    unsigned char *v = NULL;
    size_t len = 0;
    uint64_t rev = 0;
    ck_assert_int_eq(hl_kv_get(kv, key, &v, &len, &rev), HL_OK);
    ck_assert_uint_eq(len, strlen(want));
    ck_assert_str_eq((char *)v, want);
    if (want_rev)
        ck_assert_uint_eq(rev, want_rev);
    free(v);
}

static hl_status put_str(hl_kv *kv, const char *key, const char *v, uint64_t *rev)
{
    return hl_kv_put(kv, key, v, strlen(v), rev);
}

/* Next watch entry, waiting generously; fails the test on anything but HL_OK. */
static hl_kv_entry *next_entry(hl_kv_watcher *w)
{
    hl_kv_entry *e = NULL;
    hl_status st = hl_kv_watch_next(w, WAIT_MS, &e);
    ck_assert_msg(st == HL_OK, "hl_kv_watch_next: %s", hl_status_str(st));
    ck_assert_ptr_nonnull(e);
    return e;
}

static void expect_entry(hl_kv_watcher *w, hl_kv_op op, const char *key, const char *value, uint64_t rev)
{
    hl_kv_entry *e = next_entry(w);
    ck_assert_int_eq(e->op, op);
    ck_assert_str_eq(e->key, key);
    if (value) {
        ck_assert_uint_eq(e->len, strlen(value));
        ck_assert_mem_eq(e->value, value, e->len);
    } else {
        ck_assert_ptr_null(e->value);
    }
    if (rev)
        ck_assert_uint_eq(e->revision, rev);
    hl_kv_entry_free(e);
}

static void expect_caught_up(hl_kv_watcher *w)
{
    hl_kv_entry *e = next_entry(w);
    ck_assert_int_eq(e->op, HL_KV_CAUGHT_UP);
    ck_assert_ptr_null(e->key);
    hl_kv_entry_free(e);
}

static bool fd_readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

/* ---- tests ---- */

START_TEST(key_names)
{
    ck_assert(hl_kv_valid_key("a"));
    ck_assert(hl_kv_valid_key("schema.node-1.v_2=/x\\y"));
    ck_assert(!hl_kv_valid_key(""));
    ck_assert(!hl_kv_valid_key(NULL));
    ck_assert(!hl_kv_valid_key(".a"));
    ck_assert(!hl_kv_valid_key("a."));
    ck_assert(!hl_kv_valid_key("a..b"));
    ck_assert(!hl_kv_valid_key("a b"));
    ck_assert(!hl_kv_valid_key("a*"));
    ck_assert(!hl_kv_valid_key("a.>"));
    ck_assert(!hl_kv_valid_key("caf\xc3\xa9"));
    char longkey[HL_KV_MAX_KEY + 2];
    memset(longkey, 'k', sizeof longkey - 1);
    longkey[HL_KV_MAX_KEY] = 0;
    ck_assert(hl_kv_valid_key(longkey));
    longkey[HL_KV_MAX_KEY] = 'k';
    longkey[HL_KV_MAX_KEY + 1] = 0;
    ck_assert(!hl_kv_valid_key(longkey));
}
END_TEST

START_TEST(bucket_create_bind)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "registry", 0);
    uint64_t rev = 0;
    ck_assert_int_eq(put_str(kv, "k", "v1", &rev), HL_OK);
    ck_assert_uint_eq(rev, 1);

    /* Creating again with the same settings binds to it; so does opts NULL. */
    hl_kv *again = open_bucket(&e, "registry", 0);
    get_str(again, "k", "v1", 1);
    hl_kv *bound = NULL;
    ck_assert_int_eq(hl_kv_open(&bound, e.n, "registry", NULL), HL_OK);
    get_str(bound, "k", "v1", 1);

    /* Other settings are refused instead of silently changed. */
    hl_kv *other = NULL;
    hl_kv_opts o = {.history = 2};
    ck_assert_int_eq(hl_kv_open(&other, e.n, "registry", &o), HL_ERR_CONFIG);
    ck_assert_ptr_null(other);

    /* Binding a missing bucket, bad names and options. */
    ck_assert_int_eq(hl_kv_open(&other, e.n, "nosuch", NULL), HL_ERR_NOT_FOUND);
    ck_assert_int_eq(hl_kv_open(&other, e.n, "bad.name", NULL), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_open(&other, e.n, "", NULL), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_open(&other, e.n, "a b", NULL), HL_ERR_INVALID);
    o.history = 65;
    ck_assert_int_eq(hl_kv_open(&other, e.n, "fresh", &o), HL_ERR_INVALID);
    o.history = 1;
    o.ttl_ms = -1;
    ck_assert_int_eq(hl_kv_open(&other, e.n, "fresh", &o), HL_ERR_INVALID);
    o.ttl_ms = 0;
    o.max_value_bytes = HL_KV_MAX_VALUE_BYTES + 1;
    ck_assert_int_eq(hl_kv_open(&other, e.n, "fresh", &o), HL_ERR_INVALID);
    ck_assert_ptr_null(other);

    /* Deleting the bucket removes it from the server. */
    hl_kv_free(again);
    hl_kv_free(bound);
    ck_assert_int_eq(hl_kv_destroy_bucket(e.n, "registry"), HL_OK);
    ck_assert_int_eq(hl_kv_open(&other, e.n, "registry", NULL), HL_ERR_NOT_FOUND);
    ck_assert_int_eq(hl_kv_destroy_bucket(e.n, "registry"), HL_ERR_NOT_FOUND);

    hl_kv_free(kv);
    hl_kv_free(NULL);
    env_stop(&e);
}
END_TEST

START_TEST(put_get_delete)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "kv1", 0);
    uint64_t r1 = 0, r2 = 0, r3 = 0;
    ck_assert_int_eq(put_str(kv, "a.b", "one", &r1), HL_OK);
    ck_assert_int_eq(put_str(kv, "a.c", "two", &r2), HL_OK);
    ck_assert_int_gt(r2, r1);
    get_str(kv, "a.b", "one", r1);
    ck_assert_int_eq(put_str(kv, "a.b", "three", &r3), HL_OK);
    ck_assert_int_gt(r3, r2);
    get_str(kv, "a.b", "three", r3);

    /* empty and binary values */
    static const unsigned char bin[] = {0, 1, 0xff, 0};
    ck_assert_int_eq(hl_kv_put(kv, "bin", bin, sizeof bin, NULL), HL_OK);
    unsigned char *v = NULL;
    size_t len = 99;
    ck_assert_int_eq(hl_kv_get(kv, "bin", &v, &len, NULL), HL_OK);
    ck_assert_uint_eq(len, sizeof bin);
    ck_assert_mem_eq(v, bin, sizeof bin);
    free(v);
    ck_assert_int_eq(hl_kv_put(kv, "empty", NULL, 0, NULL), HL_OK);
    get_str(kv, "empty", "", 0);

    /* a missing key */
    v = (unsigned char *)"x";
    uint64_t rev = 7;
    ck_assert_int_eq(hl_kv_get(kv, "nope", &v, &len, &rev), HL_ERR_NOT_FOUND);
    ck_assert_ptr_null(v);
    ck_assert_uint_eq(rev, 0);

    /* a deleted key reads as missing; deleting again or a missing key is fine */
    ck_assert_int_eq(hl_kv_delete(kv, "a.b"), HL_OK);
    ck_assert_int_eq(hl_kv_get(kv, "a.b", &v, &len, &rev), HL_ERR_NOT_FOUND);
    ck_assert_int_eq(hl_kv_delete(kv, "a.b"), HL_OK);
    ck_assert_int_eq(hl_kv_delete(kv, "never"), HL_OK);
    get_str(kv, "a.c", "two", r2);
    /* and can be written again */
    ck_assert_int_eq(put_str(kv, "a.b", "back", &rev), HL_OK);
    get_str(kv, "a.b", "back", rev);

    /* bad keys never reach the server */
    ck_assert_int_eq(put_str(kv, "a..b", "x", NULL), HL_ERR_INVALID);
    ck_assert_int_eq(put_str(kv, "a.*", "x", NULL), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_get(kv, "a b", &v, &len, &rev), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_delete(kv, ""), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_put(kv, "k", NULL, 3, NULL), HL_ERR_INVALID);

    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

START_TEST(create_update_conflicts)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "lease", 0);
    uint64_t r1 = 0, r2 = 0, r = 99;
    ck_assert_int_eq(hl_kv_create(kv, "holder", "node-1", 6, &r1), HL_OK);
    ck_assert_uint_gt(r1, 0);
    /* a second create loses, and changes nothing */
    ck_assert_int_eq(hl_kv_create(kv, "holder", "node-2", 6, &r), HL_ERR_CONFLICT);
    ck_assert_uint_eq(r, 0);
    get_str(kv, "holder", "node-1", r1);

    /* update with the current revision wins; with a stale one it loses */
    ck_assert_int_eq(hl_kv_update(kv, "holder", "node-1'", 7, r1, &r2), HL_OK);
    ck_assert_uint_gt(r2, r1);
    ck_assert_int_eq(hl_kv_update(kv, "holder", "node-2", 6, r1, &r), HL_ERR_CONFLICT);
    get_str(kv, "holder", "node-1'", r2);
    /* a revision from the future, and one of another key, lose too */
    ck_assert_int_eq(hl_kv_update(kv, "holder", "node-2", 6, r2 + 1000, &r), HL_ERR_CONFLICT);
    uint64_t other = 0;
    ck_assert_int_eq(put_str(kv, "other", "x", &other), HL_OK);
    ck_assert_int_eq(hl_kv_update(kv, "holder", "node-2", 6, other, &r), HL_ERR_CONFLICT);
    /* updating a key that does not exist is a conflict, 0 means "create" and is refused */
    ck_assert_int_eq(hl_kv_update(kv, "absent", "x", 1, 1, &r), HL_ERR_CONFLICT);
    ck_assert_int_eq(hl_kv_update(kv, "holder", "x", 1, 0, &r), HL_ERR_INVALID);

    /* after a delete the key can be created again (the lease was released) */
    ck_assert_int_eq(hl_kv_delete(kv, "holder"), HL_OK);
    ck_assert_int_eq(hl_kv_update(kv, "holder", "node-2", 6, r2, &r), HL_ERR_CONFLICT);
    ck_assert_int_eq(hl_kv_create(kv, "holder", "node-2", 6, &r), HL_OK);
    get_str(kv, "holder", "node-2", r);

    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

START_TEST(value_limits)
{
    env e;
    env_start(&e);
    hl_kv *small = open_bucket(&e, "small", 16);
    ck_assert_int_eq(hl_kv_put(small, "k", "0123456789abcdef", 16, NULL), HL_OK);
    ck_assert_int_eq(hl_kv_put(small, "k2", "0123456789abcdefX", 17, NULL), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(hl_kv_create(small, "k2", "0123456789abcdefX", 17, NULL), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(hl_kv_update(small, "k", "0123456789abcdefX", 17, 1, NULL), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(hl_kv_get(small, "k2", NULL, NULL, NULL), HL_ERR_NOT_FOUND);
    get_str(small, "k", "0123456789abcdef", 1);

    /* A value another writer stored, over what this reader accepts (a bound
     * handle takes HL_KV_DEFAULT_VALUE_BYTES), is refused by get and watch. */
    size_t big = HL_KV_DEFAULT_VALUE_BYTES + 1;
    unsigned char *buf = calloc(1, big);
    ck_assert_ptr_nonnull(buf);
    hl_kv *writer = open_bucket(&e, "big", 2 * 1024 * 1024);
    ck_assert_int_eq(hl_kv_put(writer, "huge", buf, big, NULL), HL_OK);
    ck_assert_int_eq(hl_kv_put(writer, "fine", "ok", 2, NULL), HL_OK);
    unsigned char *v = NULL;
    ck_assert_int_eq(hl_kv_get(writer, "huge", &v, NULL, NULL), HL_OK);
    free(v);

    /* A writer bound with a larger bound than the bucket's is stopped by the server. */
    hl_kv *loose = NULL;
    hl_kv_opts bind = {.bind_only = true, .max_value_bytes = 1024};
    ck_assert_int_eq(hl_kv_open(&loose, e.n, "small", &bind), HL_OK);
    ck_assert_int_eq(hl_kv_put(loose, "k2", "0123456789abcdefX", 17, NULL), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(hl_kv_get(loose, "k2", NULL, NULL, NULL), HL_ERR_NOT_FOUND);
    hl_kv_free(loose);
    /* bind_only never creates */
    ck_assert_int_eq(hl_kv_open(&loose, e.n, "nosuch", &bind), HL_ERR_NOT_FOUND);

    /* A reader bound with a larger bound accepts the big value. */
    bind.max_value_bytes = 2 * 1024 * 1024;
    ck_assert_int_eq(hl_kv_open(&loose, e.n, "big", &bind), HL_OK);
    size_t len = 0;
    ck_assert_int_eq(hl_kv_get(loose, "huge", NULL, &len, NULL), HL_OK);
    ck_assert_uint_eq(len, big);
    hl_kv_free(loose);

    hl_kv *reader = NULL;
    ck_assert_int_eq(hl_kv_open(&reader, e.n, "big", NULL), HL_OK);
    len = 5;
    v = NULL;
    ck_assert_int_eq(hl_kv_get(reader, "huge", &v, &len, NULL), HL_ERR_TOO_LARGE);
    ck_assert_ptr_null(v);
    ck_assert_uint_eq(len, 0);
    get_str(reader, "fine", "ok", 0);

    hl_kv_watcher *w = NULL;
    ck_assert_int_eq(hl_kv_watch(reader, ">", &w), HL_OK);
    hl_kv_entry *en = NULL;
    ck_assert_int_eq(hl_kv_watch_next(w, WAIT_MS, &en), HL_ERR_TOO_LARGE);
    ck_assert_ptr_nonnull(en); /* which key was refused */
    ck_assert_int_eq(en->op, HL_KV_PUT);
    ck_assert_str_eq(en->key, "huge");
    ck_assert_uint_eq(en->revision, 1);
    ck_assert_ptr_null(en->value);
    ck_assert_uint_eq(en->len, 0);
    hl_kv_entry_free(en);
    expect_entry(w, HL_KV_PUT, "fine", "ok", 0); /* later entries still follow */
    expect_caught_up(w);
    hl_kv_watch_free(w);

    free(buf);
    hl_kv_free(reader);
    hl_kv_free(writer);
    hl_kv_free(small);
    env_stop(&e);
}
END_TEST

START_TEST(watch_order_and_wakeup)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "watched", 0);
    uint64_t r0 = 0;
    ck_assert_int_eq(put_str(kv, "node.1", "old", NULL), HL_OK);
    ck_assert_int_eq(put_str(kv, "node.1", "current", &r0), HL_OK);
    ck_assert_int_eq(put_str(kv, "gone", "x", NULL), HL_OK);
    ck_assert_int_eq(hl_kv_delete(kv, "gone"), HL_OK);

    hl_kv_watcher *w = NULL, *bad = NULL;
    ck_assert_int_eq(hl_kv_watch(kv, "a..b", &bad), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_watch(kv, ">.a", &bad), HL_ERR_INVALID);
    ck_assert_int_eq(hl_kv_watch(kv, "node.>", &w), HL_OK);
    int fd = hl_kv_watch_fd(w);
    ck_assert_int_ge(fd, 0);

    /* current values first (the latest revision only), then caught up */
    ck_assert(fd_readable(fd, WAIT_MS));
    expect_entry(w, HL_KV_PUT, "node.1", "current", r0);
    expect_caught_up(w);
    hl_kv_entry *en = NULL;
    ck_assert_int_eq(hl_kv_watch_next(w, 0, &en), HL_ERR_TIMEOUT);
    ck_assert_ptr_null(en);
    ck_assert(!fd_readable(fd, 0)); /* drained: nothing to wake for */

    /* later changes arrive in order and wake a poller */
    uint64_t r1, r2, r3;
    ck_assert_int_eq(put_str(kv, "node.2", "hello", &r1), HL_OK);
    ck_assert_int_eq(put_str(kv, "other", "not watched", NULL), HL_OK);
    ck_assert_int_eq(put_str(kv, "node.2", "again", &r2), HL_OK);
    ck_assert_int_eq(hl_kv_delete(kv, "node.1"), HL_OK);
    ck_assert_int_eq(put_str(kv, "node.3.deep", "z", &r3), HL_OK);
    ck_assert(fd_readable(fd, WAIT_MS));
    expect_entry(w, HL_KV_PUT, "node.2", "hello", r1);
    expect_entry(w, HL_KV_PUT, "node.2", "again", r2);
    hl_kv_entry *d = next_entry(w);
    ck_assert_int_eq(d->op, HL_KV_DELETE);
    ck_assert_str_eq(d->key, "node.1");
    ck_assert_ptr_null(d->value);
    ck_assert_uint_gt(d->revision, r2);
    ck_assert_uint_lt(d->revision, r3);
    hl_kv_entry_free(d);
    expect_entry(w, HL_KV_PUT, "node.3.deep", "z", r3);
    ck_assert_int_eq(hl_kv_watch_next(w, 0, &en), HL_ERR_TIMEOUT);

    /* A hostile writer publishing straight into the bucket's subjects: keys
     * NATS carries but we do not accept are refused, and said so. */
    char longkey[HL_KV_MAX_KEY + 16] = "$KV.watched.node.";
    size_t l = strlen(longkey);
    memset(longkey + l, 'k', sizeof longkey - l - 1);
    longkey[sizeof longkey - 1] = 0;
    const char *hostile[] = {"$KV.watched.node.caf\xc3\xa9", "$KV.watched.node.a:b", longkey};
    for (size_t i = 0; i < sizeof hostile / sizeof hostile[0]; i++)
        ck_assert_int_eq(js_Publish(NULL, hl_nats_js(e.n), hostile[i], "evil", 4, NULL, NULL), NATS_OK);
    ck_assert_int_eq(put_str(kv, "node.6", "after", NULL), HL_OK);
    for (size_t i = 0; i < sizeof hostile / sizeof hostile[0]; i++) {
        ck_assert_int_eq(hl_kv_watch_next(w, WAIT_MS, &en), HL_ERR_DECODE);
        ck_assert_ptr_null(en);
    }
    expect_entry(w, HL_KV_PUT, "node.6", "after", 0);

    /* a second watch on one key sees its delete marker as its current state */
    hl_kv_watcher *w1 = NULL;
    ck_assert_int_eq(hl_kv_watch(kv, "node.1", &w1), HL_OK);
    d = next_entry(w1);
    ck_assert_int_eq(d->op, HL_KV_DELETE);
    ck_assert_str_eq(d->key, "node.1");
    hl_kv_entry_free(d);
    expect_caught_up(w1);
    hl_kv_watch_free(w1);
    /* a watch that matches nothing in a bucket full of other keys is caught up at once */
    ck_assert_int_eq(hl_kv_watch(kv, "nomatch.>", &w1), HL_OK);
    expect_caught_up(w1);
    ck_assert_int_eq(hl_kv_watch_next(w1, 0, &en), HL_ERR_TIMEOUT);
    hl_kv_watch_free(w1);

    /* a blocked hl_kv_watch_next is woken by a put (no fd) */
    ck_assert_int_eq(put_str(kv, "node.4", "late", NULL), HL_OK);
    expect_entry(w, HL_KV_PUT, "node.4", "late", 0);

    /* freeing with entries still queued loses nothing of ours and leaks nothing */
    ck_assert_int_eq(put_str(kv, "node.5", "queued", NULL), HL_OK);
    ck_assert(fd_readable(fd, WAIT_MS));
    hl_kv_watch_free(w);
    hl_kv_watch_free(NULL);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

START_TEST(ttl_expiry)
{
    env e;
    env_start(&e);
    hl_kv_opts o = {.ttl_ms = 1000};
    hl_kv *kv = NULL;
    int64_t end = now_ms() + WAIT_MS;
    hl_status st;
    while ((st = hl_kv_open(&kv, e.n, "shortlived", &o)) != HL_OK && now_ms() < end)
        sleep_ms(100);
    ck_assert_int_eq(st, HL_OK);
    ck_assert_int_eq(put_str(kv, "lease", "node-1", NULL), HL_OK);
    /* It expires: wait (generously) until get says so. */
    end = now_ms() + WAIT_MS;
    while ((st = hl_kv_get(kv, "lease", NULL, NULL, NULL)) == HL_OK && now_ms() < end)
        sleep_ms(100);
    ck_assert_int_eq(st, HL_ERR_NOT_FOUND);
    /* and an expired key can be created again */
    ck_assert_int_eq(hl_kv_create(kv, "lease", "node-2", 6, NULL), HL_OK);
    get_str(kv, "lease", "node-2", 0);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

START_TEST(server_gone)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "fragile", 0);
    ck_assert_int_eq(put_str(kv, "k", "v", NULL), HL_OK);
    hl_kv_watcher *w = NULL;
    ck_assert_int_eq(hl_kv_watch(kv, ">", &w), HL_OK);
    expect_entry(w, HL_KV_PUT, "k", "v", 0);
    expect_caught_up(w);

    env_kill_server(&e);
    /* Every call comes back with an error (no crash, no hang). */
    hl_status st = hl_kv_get(kv, "k", NULL, NULL, NULL);
    ck_assert_msg(st == HL_ERR_TIMEOUT || st == HL_ERR_NATS, "get: %s", hl_status_str(st));
    st = put_str(kv, "k", "v2", NULL);
    ck_assert_msg(st == HL_ERR_TIMEOUT || st == HL_ERR_NATS, "put: %s", hl_status_str(st));
    st = hl_kv_create(kv, "k2", "v", 1, NULL);
    ck_assert_msg(st == HL_ERR_TIMEOUT || st == HL_ERR_NATS, "create: %s", hl_status_str(st));
    st = hl_kv_update(kv, "k", "v", 1, 1, NULL);
    ck_assert_msg(st == HL_ERR_TIMEOUT || st == HL_ERR_NATS, "update: %s", hl_status_str(st));
    st = hl_kv_delete(kv, "k");
    ck_assert_msg(st == HL_ERR_TIMEOUT || st == HL_ERR_NATS, "delete: %s", hl_status_str(st));
    hl_kv *kv2 = NULL;
    st = hl_kv_open(&kv2, e.n, "fragile", NULL);
    ck_assert_msg(st == HL_ERR_TIMEOUT || st == HL_ERR_NATS, "open: %s", hl_status_str(st));
    ck_assert_ptr_null(kv2);
    /* The watch waits for the connection to come back; nothing arrives meanwhile. */
    hl_kv_entry *en = NULL;
    ck_assert_int_eq(hl_kv_watch_next(w, 200, &en), HL_ERR_TIMEOUT);
    ck_assert_ptr_null(en);

    hl_kv_watch_free(w);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

/* The connection closes under a watch: the watch ends, visibly. */
START_TEST(connection_closed)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "closing", 0);
    hl_kv_watcher *w = NULL;
    ck_assert_int_eq(hl_kv_watch(kv, ">", &w), HL_OK);
    expect_caught_up(w);
    ck_assert(!fd_readable(hl_kv_watch_fd(w), 0));

    natsConnection_Close(hl_nats_conn(e.n));
    /* The poller is woken, and the end is reported (and stays reported). */
    ck_assert(fd_readable(hl_kv_watch_fd(w), WAIT_MS));
    hl_kv_entry *en = NULL;
    ck_assert_int_eq(hl_kv_watch_next(w, WAIT_MS, &en), HL_ERR_NATS);
    ck_assert_ptr_null(en);
    ck_assert_int_eq(hl_kv_watch_next(w, 0, &en), HL_ERR_NATS);
    ck_assert(fd_readable(hl_kv_watch_fd(w), 0));
    /* Calls on a closed connection fail at once with an error. */
    hl_status st = put_str(kv, "k", "v", NULL);
    ck_assert_msg(st == HL_ERR_NATS || st == HL_ERR_TIMEOUT, "put: %s", hl_status_str(st));

    hl_kv_watch_free(w);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

/* The server comes back (same store): the connection reconnects, the bucket
 * is still there and the watch carries on where it stopped. */
START_TEST(server_restart)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "durable", 0);
    uint64_t r1 = 0;
    ck_assert_int_eq(put_str(kv, "k", "before", &r1), HL_OK);
    hl_kv_watcher *w = NULL;
    ck_assert_int_eq(hl_kv_watch(kv, ">", &w), HL_OK);
    expect_entry(w, HL_KV_PUT, "k", "before", r1);
    expect_caught_up(w);
    /* More watches, freed while their consumers are being re-created after the
     * restart: stopping nats.c's kvWatcher at that moment read freed memory. */
    hl_kv_watcher *extra[8];
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++) {
        ck_assert_int_eq(hl_kv_watch(kv, "k", &extra[i]), HL_OK);
        expect_entry(extra[i], HL_KV_PUT, "k", "before", r1);
        expect_caught_up(extra[i]);
    }

    env_kill_server(&e);
    env_spawn(&e);
    /* Writes fail until the connection and JetStream are back; retry generously. */
    uint64_t r2 = 0;
    hl_status st;
    int64_t end = now_ms() + 60000;
    while ((st = put_str(kv, "k", "after", &r2)) != HL_OK && now_ms() < end)
        sleep_ms(200);
    ck_assert_msg(st == HL_OK, "put after restart: %s", hl_status_str(st));
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++)
        hl_kv_watch_free(extra[i]);
    ck_assert_uint_gt(r2, r1);
    get_str(kv, "k", "after", r2);
    /* A retried put may have been stored before its answer was lost: the
     * watch shows each stored revision once, in order, ending with r2. */
    uint64_t last = r1;
    for (;;) {
        hl_kv_entry *en = next_entry(w);
        ck_assert_int_eq(en->op, HL_KV_PUT);
        ck_assert_str_eq(en->key, "k");
        ck_assert_uint_gt(en->revision, last);
        last = en->revision;
        hl_kv_entry_free(en);
        if (last == r2)
            break;
    }
    hl_kv_watch_free(w);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

/* Somebody deletes the watch's consumer on the server: the watch notices
 * (heartbeats stop, the consumer is not found) and carries on from where it
 * was, without losing or repeating a revision. */
START_TEST(consumer_deleted)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "orphan", 0);
    uint64_t r1 = 0;
    ck_assert_int_eq(put_str(kv, "k", "one", &r1), HL_OK);
    hl_kv_watcher *w = NULL;
    ck_assert_int_eq(hl_kv_watch(kv, ">", &w), HL_OK);
    expect_entry(w, HL_KV_PUT, "k", "one", r1);
    expect_caught_up(w);

    jsConsumerNamesList *names = NULL;
    jsErrCode jerr = 0;
    ck_assert_int_eq(js_ConsumerNames(&names, hl_nats_js(e.n), "KV_orphan", NULL, &jerr), NATS_OK);
    ck_assert_int_ge(names->Count, 1);
    for (int i = 0; i < names->Count; i++)
        ck_assert_int_eq(js_DeleteConsumer(hl_nats_js(e.n), "KV_orphan", names->List[i], NULL, &jerr), NATS_OK);
    jsConsumerNamesList_Destroy(names);

    uint64_t r2 = 0, r3 = 0;
    ck_assert_int_eq(put_str(kv, "k", "two", &r2), HL_OK);
    ck_assert_int_eq(put_str(kv, "j", "three", &r3), HL_OK);
    expect_entry(w, HL_KV_PUT, "k", "two", r2);
    expect_entry(w, HL_KV_PUT, "j", "three", r3);
    hl_kv_entry *en = NULL;
    ck_assert_int_eq(hl_kv_watch_next(w, 0, &en), HL_ERR_TIMEOUT);
    hl_kv_watch_free(w);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

static Suite *kv_suite(void)
{
    Suite *s = suite_create("kv");
    struct {
        const char *name;
        const TTest *test;
        int timeout;
    } cases[] = {
        {"key_names", key_names, 5},
        {"bucket_create_bind", bucket_create_bind, 60},
        {"put_get_delete", put_get_delete, 60},
        {"create_update_conflicts", create_update_conflicts, 60},
        {"value_limits", value_limits, 90},
        {"watch_order_and_wakeup", watch_order_and_wakeup, 90},
        {"ttl_expiry", ttl_expiry, 90},
        {"server_gone", server_gone, 120},
        {"server_restart", server_restart, 150},
        {"connection_closed", connection_closed, 60},
        {"consumer_deleted", consumer_deleted, 120},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_set_timeout(tc, cases[i].timeout);
        tcase_add_test(tc, cases[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void)
{
    hl_log_setup(HL_LOG_INFO, false, 0);
    SRunner *sr = srunner_create(kv_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
