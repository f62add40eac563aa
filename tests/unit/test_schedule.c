/*
 * test_schedule.c - the snapshot lease and the cluster's last-snapshot record
 * (src/snapshot/schedule.c) against a real nats-server with JetStream.
 *
 * Wall clock times are passed in, so expiry is tested without waiting.
 */
#include "common/log.h"
#include "kv_fixture.h"
#include "snapshot/schedule.h"

/* The lease value as stored, for checking who holds it until when. */
static void lease_is(hl_kv *kv, const char *want)
{
    unsigned char *v = NULL;
    size_t len = 0;
    ck_assert_int_eq(hl_kv_get(kv, HL_LEASE_KEY, &v, &len, NULL), HL_OK);
    ck_assert_str_eq((char *)v, want);
    free(v);
}

START_TEST(lease_one_holder)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "lease1", 0);
    const uint64_t t = 1700000000000, ttl = 15000;
    uint64_t r1 = 0, r2 = 0, r3 = 0, holder = 99;

    /* absent: node 1 creates it */
    ck_assert_int_eq(hl_lease_acquire(kv, 1, t, ttl, &r1, &holder), HL_OK);
    ck_assert_uint_eq(holder, 0);
    lease_is(kv, "{\"node\":\"1\",\"expires_ms\":\"1700000015000\"}");
    /* held and not expired: node 2 and node 3 are refused and told who holds it */
    ck_assert_int_eq(hl_lease_acquire(kv, 2, t + 14999, ttl, &r2, &holder), HL_ERR_CONFLICT);
    ck_assert_uint_eq(holder, 1);
    ck_assert_int_eq(hl_lease_acquire(kv, 3, t + 1, ttl, &r3, &holder), HL_ERR_CONFLICT);
    /* the holder renews it: the expiry moves, the revision too */
    uint64_t before = r1;
    ck_assert_int_eq(hl_lease_renew(kv, 1, t + 5000, ttl, &r1), HL_OK);
    ck_assert_uint_gt(r1, before);
    lease_is(kv, "{\"node\":\"1\",\"expires_ms\":\"1700000020000\"}");
    ck_assert_int_eq(hl_lease_acquire(kv, 2, t + 19999, ttl, &r2, &holder), HL_ERR_CONFLICT);
    /* the holder stops renewing (died): once expired, node 2 takes it over */
    ck_assert_int_eq(hl_lease_acquire(kv, 2, t + 20001, ttl, &r2, &holder), HL_OK);
    lease_is(kv, "{\"node\":\"2\",\"expires_ms\":\"1700000035001\"}");
    /* the old holder comes back: its renewal and its release no longer count */
    ck_assert_int_eq(hl_lease_renew(kv, 1, t + 20002, ttl, &r1), HL_ERR_CONFLICT);
    ck_assert_int_eq(hl_lease_release(kv, 1, r1), HL_OK);
    lease_is(kv, "{\"node\":\"2\",\"expires_ms\":\"1700000035001\"}");
    ck_assert_int_eq(hl_lease_acquire(kv, 1, t + 20003, ttl, &r1, &holder), HL_ERR_CONFLICT);
    ck_assert_uint_eq(holder, 2);
    /* released: free at once for the next node */
    ck_assert_int_eq(hl_lease_release(kv, 2, r2), HL_OK);
    ck_assert_int_eq(hl_lease_acquire(kv, 3, t + 20004, ttl, &r3, &holder), HL_OK);
    lease_is(kv, "{\"node\":\"3\",\"expires_ms\":\"1700000035004\"}");
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

/* Two nodes that both read the same expired lease: the compare-and-set lets one win. */
START_TEST(lease_race)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "lease2", 0);
    const uint64_t t = 1700000000000, ttl = 15000;
    uint64_t r1 = 0, r2 = 0, r3 = 0, holder = 0;
    ck_assert_int_eq(hl_lease_acquire(kv, 1, t, ttl, &r1, NULL), HL_OK);
    /* what node 3 would write after reading revision r1: node 2 got there first */
    ck_assert_int_eq(hl_lease_acquire(kv, 2, t + 60000, ttl, &r2, NULL), HL_OK);
    ck_assert_int_eq(hl_kv_update(kv, HL_LEASE_KEY, "{}", 2, r1, NULL), HL_ERR_CONFLICT);
    ck_assert_int_eq(hl_lease_acquire(kv, 3, t + 60000, ttl, &r3, &holder), HL_ERR_CONFLICT);
    ck_assert_uint_eq(holder, 2);
    /* two creates of an absent lease: only one succeeds */
    ck_assert_int_eq(hl_kv_delete(kv, HL_LEASE_KEY), HL_OK);
    ck_assert_int_eq(hl_lease_acquire(kv, 4, t, ttl, &r1, NULL), HL_OK);
    ck_assert_int_eq(hl_kv_create(kv, HL_LEASE_KEY, "{}", 2, NULL), HL_ERR_CONFLICT);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

/* A lease value that is not one (written by anyone with access to the bucket)
 * is taken over, never trusted to block snapshots forever. */
START_TEST(lease_garbage)
{
    env e;
    env_start(&e);
    hl_kv *kv = open_bucket(&e, "lease3", 0);
    static const char *const junk[] = {"garbage",
                                       "{\"node\":\"2\"}",
                                       "{\"node\":2,\"expires_ms\":\"99999999999999\"}",
                                       "{\"node\":\"0\",\"expires_ms\":\"99999999999999\"}",
                                       "{\"node\":\"02\",\"expires_ms\":\"99999999999999\"}",
                                       "{\"node\":\"2\",\"expires_ms\":\"-5\"}",
                                       "{\"node\":\"2\",\"expires_ms\":\"99999999999999999999\"}",
                                       ""};
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++) {
        uint64_t r = 0;
        ck_assert_int_eq(hl_kv_put(kv, HL_LEASE_KEY, junk[i], strlen(junk[i]), NULL), HL_OK);
        ck_assert_msg(hl_lease_acquire(kv, 1, 1000, 15000, &r, NULL) == HL_OK, "%s", junk[i]);
        lease_is(kv, "{\"node\":\"1\",\"expires_ms\":\"16000\"}");
    }
    /* a far-future expiry by another node is honoured (it is a valid lease) */
    const char *v = "{\"node\":\"2\",\"expires_ms\":\"99999999999999\"}";
    uint64_t r = 0, holder = 0;
    ck_assert_int_eq(hl_kv_put(kv, HL_LEASE_KEY, v, strlen(v), NULL), HL_OK);
    ck_assert_int_eq(hl_lease_acquire(kv, 1, 1000, 15000, &r, &holder), HL_ERR_CONFLICT);
    ck_assert_uint_eq(holder, 2);
    hl_kv_free(kv);
    env_stop(&e);
}
END_TEST

START_TEST(last_record)
{
    hl_manifest_stream st[2] = {{"hl-changes-1", 42}, {"hl-changes-2", 7}};
    hl_manifest m = {.node = 3, .created_ms = 1700000000123, .size = 4096, .streams = st, .nstreams = 2};
    char *json = hl_last_snapshot_json(&m, "snap-20231114T221320123Z-n3-0badc0de.manifest.json");
    ck_assert_ptr_nonnull(json);
    hl_last_snapshot l;
    ck_assert_int_eq(hl_last_snapshot_parse(&l, json, strlen(json)), HL_OK);
    ck_assert_uint_eq(l.node, 3);
    ck_assert_uint_eq(l.created_ms, 1700000000123);
    ck_assert_uint_eq(l.size, 4096);
    ck_assert_str_eq(l.manifest, "snap-20231114T221320123Z-n3-0badc0de.manifest.json");
    ck_assert_uint_eq(l.nstreams, 2);
    ck_assert_str_eq(l.streams[1].name, "hl-changes-2");
    ck_assert_uint_eq(l.streams[1].seq, 7);
    hl_last_snapshot_free(&l);
    free(json);

    static const char *const bad[] = {
        "",
        "[]",
        "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"../etc/passwd\",\"streams\":[]}",
        "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\".hidden\",\"streams\":[]}",
        "{\"node\":\"0\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"a\",\"streams\":[]}",
        "{\"node\":\"3\",\"created_ms\":1,\"size\":\"1\",\"manifest\":\"a\",\"streams\":[]}",
        "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"a\"}",
        "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"a\",\"streams\":[{\"name\":\"\",\"seq\":"
        "\"1\"}]}",
        "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"a\",\"streams\":[{\"name\":\"s\",\"seq\":"
        "\"-1\"}]}",
        "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"a\",\"streams\":[{\"name\":\"s\"}]}",
        "{\"node\":\"3\",\"created_ms\":\"9223372036854775808\",\"size\":\"1\",\"manifest\":\"a\",\"streams\":[]}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(hl_last_snapshot_parse(&l, bad[i], strlen(bad[i])) == HL_ERR_DECODE, "%s", bad[i]);
        ck_assert_ptr_null(l.streams);
    }
    /* more streams than any manifest may have */
    size_t cap = 64 + 4097 * 24;
    char *big = malloc(cap), *p = big;
    p += sprintf(p, "{\"node\":\"3\",\"created_ms\":\"1\",\"size\":\"1\",\"manifest\":\"a\",\"streams\":[");
    for (int i = 0; i < 4097; i++)
        p += sprintf(p, "%s{\"name\":\"s\",\"seq\":\"1\"}", i ? "," : "");
    strcpy(p, "]}");
    ck_assert_uint_lt(strlen(big), cap);
    ck_assert_int_eq(hl_last_snapshot_parse(&l, big, strlen(big)), HL_ERR_DECODE);
    free(big);
}
END_TEST

static Suite *schedule_suite(void)
{
    Suite *s = suite_create("schedule");
    struct {
        const char *name;
        const TTest *test;
        int timeout;
    } cases[] = {
        {"lease_one_holder", lease_one_holder, 60},
        {"lease_race", lease_race, 60},
        {"lease_garbage", lease_garbage, 60},
        {"last_record", last_record, 10},
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
    hl_log_setup(HL_LOG_WARN, false, 0);
    SRunner *sr = srunner_create(schedule_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
