/*
 * test_timers.c - the engine's table of periodic jobs.
 */
#include <check.h>
#include <limits.h>

#include "common/timers.h"

static int runs[3];

static void count0(void *arg)
{
    (void)arg;
    runs[0]++;
}

static void count1(void *arg)
{
    (void)arg;
    runs[1]++;
}

/* Makes itself due again: must run once per hl_timers_run, never loop. */
static void again(void *arg)
{
    hl_timers *ts = arg;
    runs[2]++;
    hl_timers_due_now(ts, 2);
}

START_TEST(runs_what_is_due_and_reschedules)
{
    hl_timers ts = {0};
    runs[0] = runs[1] = runs[2] = 0;
    ck_assert_int_eq(hl_timers_timeout(&ts, 0), INT_MAX);
    ck_assert_int_eq(hl_timers_add(&ts, "a", 100, count0, NULL, 1000), 0);
    ck_assert_int_eq(hl_timers_add(&ts, "b", 250, count1, NULL, 1000), 1);
    ck_assert_int_eq(hl_timers_timeout(&ts, 1000), 100);
    hl_timers_run(&ts, 1050);
    ck_assert_int_eq(runs[0] + runs[1], 0);
    ck_assert_int_eq(hl_timers_timeout(&ts, 1050), 50);
    hl_timers_run(&ts, 1100);
    ck_assert_int_eq(runs[0], 1);
    ck_assert_int_eq(runs[1], 0);
    ck_assert_int_eq(hl_timers_timeout(&ts, 1100), 100); /* a again at 1200 */
    hl_timers_run(&ts, 1260);                            /* late: each due one runs once */
    ck_assert_int_eq(runs[0], 2);
    ck_assert_int_eq(runs[1], 1);
    ck_assert_int_eq(hl_timers_timeout(&ts, 1260), 100); /* scheduled from when they ran */
    hl_timers_due_now(&ts, 1);
    ck_assert_int_eq(hl_timers_timeout(&ts, 1260), 0);
    hl_timers_run(&ts, 1260);
    ck_assert_int_eq(runs[1], 2);
}
END_TEST

START_TEST(a_job_due_again_waits_for_the_next_turn)
{
    hl_timers ts = {0};
    runs[2] = 0;
    hl_timers_add(&ts, "a", 100, count0, NULL, 0);
    hl_timers_add(&ts, "b", 100, count1, NULL, 0);
    ck_assert_int_eq(hl_timers_add(&ts, "again", 100, again, &ts, 0), 2);
    hl_timers_run(&ts, 100);
    ck_assert_int_eq(runs[2], 1);
    ck_assert_int_eq(hl_timers_timeout(&ts, 100), 0);
    hl_timers_run(&ts, 100);
    ck_assert_int_eq(runs[2], 2);
}
END_TEST

START_TEST(the_table_is_bounded)
{
    hl_timers ts = {0};
    for (int i = 0; i < HL_TIMERS_MAX; i++)
        ck_assert_int_eq(hl_timers_add(&ts, "t", 10, count0, NULL, 0), i);
    ck_assert_int_eq(hl_timers_add(&ts, "one too many", 10, count0, NULL, 0), -1);
    ck_assert_int_eq(hl_timers_add(&(hl_timers){0}, "no period", 0, count0, NULL, 0), -1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("timers");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, runs_what_is_due_and_reschedules);
    tcase_add_test(tc, a_job_due_again_waits_for_the_next_turn);
    tcase_add_test(tc, the_table_is_bounded);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
