/*
 * test_registry.c - the schema registry's entries and the cluster verdicts
 * (consistent / upgrading / incompatible, and who is the odd one out).
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "registry/registry.h"

/* Hash number k as 64 hex digits. */
static void hash_of(int k, char out[65])
{
    for (int i = 0; i < 64; i++)
        out[i] = "0123456789abcdef"[(k + i) % 16];
    out[0] = (char)('a' + k % 6);
    out[64] = 0;
}

/* Node id with schema cur (previous prev, -1: none). */
static hl_reg_entry node(uint64_t id, int cur, int prev)
{
    hl_reg_entry e;
    memset(&e, 0, sizeof e);
    e.node_id = id;
    hash_of(cur, e.hash);
    if (prev >= 0)
        hash_of(prev, e.prev);
    snprintf(e.version, sizeof e.version, "test");
    return e;
}

START_TEST(status_consistent_upgrading_incompatible)
{
    hl_reg_entry v[3] = {node(1, 0, -1), node(2, 0, -1), node(3, 0, -1)};
    ck_assert_int_eq(hl_cluster_status_of(v, 3), HL_CLUSTER_CONSISTENT);
    ck_assert_int_eq(hl_cluster_status_of(v, 0), HL_CLUSTER_CONSISTENT);
    v[0] = node(1, 1, 0); /* one step ahead */
    ck_assert_int_eq(hl_cluster_status_of(v, 3), HL_CLUSTER_UPGRADING);
    v[1] = node(2, 1, 0);
    ck_assert_int_eq(hl_cluster_status_of(v, 3), HL_CLUSTER_UPGRADING);
    v[0] = node(1, 2, 1); /* two steps ahead of node 3 */
    ck_assert_int_eq(hl_cluster_status_of(v, 3), HL_CLUSTER_INCOMPATIBLE);
    v[0] = node(1, 3, -1); /* unrelated */
    v[1] = node(2, 0, -1);
    ck_assert_int_eq(hl_cluster_status_of(v, 3), HL_CLUSTER_INCOMPATIBLE);
    ck_assert_str_eq(hl_cluster_status_name(HL_CLUSTER_UPGRADING), "upgrading");
}
END_TEST

START_TEST(odd_one_out_rule)
{
    char why[400];
    /* three nodes, node 1 two steps ahead: node 1 alone is at fault */
    hl_reg_entry v[4] = {node(1, 2, 1), node(2, 0, -1), node(3, 0, -1), node(4, 0, -1)};
    ck_assert(hl_cluster_odd_one_out(v, 3, 1, why, sizeof why));
    ck_assert_ptr_nonnull(strstr(why, "2 of 3 live nodes"));
    ck_assert(!hl_cluster_odd_one_out(v, 3, 2, why, sizeof why));
    ck_assert(!hl_cluster_odd_one_out(v, 3, 3, why, sizeof why));
    /* one step ahead: compatible, nobody at fault */
    v[0] = node(1, 1, 0);
    for (uint64_t id = 1; id <= 3; id++)
        ck_assert(!hl_cluster_odd_one_out(v, 3, id, why, sizeof why));
    /* two nodes that disagree: a tie, nobody is held */
    v[0] = node(1, 2, 1);
    ck_assert(!hl_cluster_odd_one_out(v, 2, 1, why, sizeof why));
    ck_assert(!hl_cluster_odd_one_out(v, 2, 2, why, sizeof why));
    /* a node alone */
    ck_assert(!hl_cluster_odd_one_out(v, 1, 1, why, sizeof why));
    /* 2 against 2: a tie */
    v[1] = node(2, 2, 1);
    ck_assert(!hl_cluster_odd_one_out(v, 4, 1, why, sizeof why));
    ck_assert(!hl_cluster_odd_one_out(v, 4, 4, why, sizeof why));
    /* the majority moved one step on; node 4 is compatible with it (its previous) */
    v[2] = node(3, 5, 0);
    v[3] = node(4, 0, -1);
    v[0] = node(1, 5, 0);
    v[1] = node(2, 5, 0);
    ck_assert(!hl_cluster_odd_one_out(v, 4, 4, why, sizeof why));
    /* a node not in the view is not judged */
    ck_assert(!hl_cluster_odd_one_out(v, 4, 99, why, sizeof why));
}
END_TEST

START_TEST(entries_round_trip_and_bad_ones_are_refused)
{
    hl_reg_entry e = node(42, 1, 0), d;
    char t0[] = "books", t1[] = "a \"quoted\" table";
    char *tabs[] = {t0, t1};
    e.tables = tabs;
    e.ntables = 2;
    e.started_ms = 1700000000000;
    e.heartbeat_ms = 1700000005000;
    char *json = hl_reg_entry_encode(&e), why[200];
    ck_assert_ptr_nonnull(json);
    ck_assert_int_eq(hl_reg_entry_decode("node.42", (unsigned char *)json, strlen(json), &d, why, sizeof why), HL_OK);
    ck_assert_uint_eq(d.node_id, 42);
    ck_assert_str_eq(d.hash, e.hash);
    ck_assert_str_eq(d.prev, e.prev);
    ck_assert_uint_eq(d.ntables, 2);
    ck_assert_str_eq(d.tables[1], t1);
    ck_assert_uint_eq(d.heartbeat_ms, 1700000005000);
    hl_reg_entry_free(&d);
    /* Times up to 2^53 travel exactly (cJSON prints doubles with 15 digits: found by fuzz_registry). */
    char *big = NULL;
    e.heartbeat_ms = UINT64_C(9007199254740992);
    e.started_ms = UINT64_C(9007199254740991);
    ck_assert_ptr_nonnull(big = hl_reg_entry_encode(&e));
    ck_assert_int_eq(hl_reg_entry_decode("node.42", (unsigned char *)big, strlen(big), &d, why, sizeof why), HL_OK);
    ck_assert_uint_eq(d.heartbeat_ms, UINT64_C(9007199254740992));
    ck_assert_uint_eq(d.started_ms, UINT64_C(9007199254740991));
    hl_reg_entry_free(&d);
    free(big);
    /* the key names another node: refused */
    ck_assert_int_eq(hl_reg_entry_decode("node.43", (unsigned char *)json, strlen(json), &d, why, sizeof why),
                     HL_ERR_DECODE);
    ck_assert_int_eq(hl_reg_entry_decode("node.042", (unsigned char *)json, strlen(json), &d, why, sizeof why),
                     HL_ERR_DECODE);
    free(json);
    const char *bad[] = {
        "",
        "[]",
        "{\"node_id\":\"42\"}",
        "{\"node_id\":\"42\",\"schema_hash\":\"XYZ\",\"previous_schema_hash\":null,\"tables\":[],\"version\":\"v\","
        "\"started_ms\":1,\"heartbeat_ms\":1}",
        "{\"node_id\":\"42\",\"schema_hash\":\"" /* upper-case hex */
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\",\"previous_schema_hash\":null,"
        "\"tables\":[],\"version\":\"v\",\"started_ms\":1,\"heartbeat_ms\":1}",
        "{\"node_id\":\"42\",\"schema_hash\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
        "\"previous_schema_hash\":null,\"tables\":[1],\"version\":\"v\",\"started_ms\":1,\"heartbeat_ms\":1}",
        "{\"node_id\":\"42\",\"schema_hash\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
        "\"previous_schema_hash\":null,\"tables\":[],\"version\":\"v\",\"started_ms\":-1,\"heartbeat_ms\":1}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(hl_reg_entry_decode("node.42", (const unsigned char *)bad[i], strlen(bad[i]), &d, why,
                                          sizeof why) == HL_ERR_DECODE,
                      "accepted %s", bad[i]);
    const char *good = "{\"node_id\":\"42\",\"schema_hash\":"
                       "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
                       "\"previous_schema_hash\":null,\"tables\":[],\"version\":\"v\",\"started_ms\":1,"
                       "\"heartbeat_ms\":1}";
    ck_assert_int_eq(hl_reg_entry_decode("node.42", (const unsigned char *)good, strlen(good), &d, why, sizeof why),
                     HL_OK);
    ck_assert_str_eq(d.prev, "");
    hl_reg_entry_free(&d);
}
END_TEST

START_TEST(cluster_json_groups_by_hash)
{
    hl_reg_entry v[3] = {node(3, 1, 0), node(1, 0, -1), node(2, 1, 0)};
    char *j = hl_cluster_json(v, 3);
    ck_assert_ptr_nonnull(j);
    ck_assert_ptr_nonnull(strstr(j, "\"status\":\"upgrading\""));
    ck_assert_ptr_nonnull(strstr(j, "\"live_nodes\":3"));
    free(j);
}
END_TEST

int main(void)
{
    hl_log_setup(HL_LOG_ERROR, false, 0);
    Suite *s = suite_create("registry");
    TCase *tc = tcase_create("registry");
    tcase_add_test(tc, status_consistent_upgrading_incompatible);
    tcase_add_test(tc, odd_one_out_rule);
    tcase_add_test(tc, entries_round_trip_and_bad_ones_are_refused);
    tcase_add_test(tc, cluster_json_groups_by_hash);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
