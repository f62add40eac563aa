/*
 * test_buf.c - the capped byte buffer: limits, quoting, sticky errors.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"

START_TEST(appends_within_the_limit)
{
    hl_buf b;
    hl_buf_init(&b, 16);
    ck_assert_str_eq(hl_buf_str(&b), "");
    ck_assert_int_eq(hl_buf_adds(&b, "abc"), HL_OK);
    ck_assert_int_eq(hl_buf_addc(&b, 'd'), HL_OK);
    ck_assert_int_eq(hl_buf_addf(&b, "%d-%s", 42, "x"), HL_OK);
    ck_assert_str_eq(hl_buf_str(&b), "abcd42-x");
    ck_assert_uint_eq(b.len, 8);
    ck_assert_int_eq(hl_buf_status(&b), HL_OK);
    hl_buf_free(&b);
    hl_buf_free(NULL);
}
END_TEST

START_TEST(errors_are_sticky_until_reset)
{
    hl_buf b;
    hl_buf_init(&b, 8);
    ck_assert_int_eq(hl_buf_adds(&b, "12345"), HL_OK);
    /* Over the limit: refused, the content unchanged, and every later append too. */
    ck_assert_int_eq(hl_buf_adds(&b, "6789"), HL_ERR_TOO_LARGE);
    ck_assert_str_eq(hl_buf_str(&b), "12345");
    ck_assert_int_eq(hl_buf_addc(&b, '6'), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(hl_buf_addf(&b, "%d", 7), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(hl_buf_add_ident(&b, "t"), HL_ERR_TOO_LARGE);
    ck_assert_str_eq(hl_buf_str(&b), "12345");
    ck_assert_int_eq(hl_buf_status(&b), HL_ERR_TOO_LARGE);
    /* Checking once at the end is enough: the text is never half-built silently. */
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_buf_status(&b), HL_OK);
    ck_assert_int_eq(hl_buf_adds(&b, "ok"), HL_OK);
    ck_assert_str_eq(hl_buf_str(&b), "ok");
    hl_buf_free(&b);
}
END_TEST

START_TEST(a_writer_records_its_own_error)
{
    hl_buf b;
    hl_buf_init(&b, 16);
    ck_assert_int_eq(hl_buf_adds(&b, "ab"), HL_OK);
    ck_assert_int_eq(hl_buf_fail(&b, HL_OK), HL_OK);
    ck_assert_int_eq(hl_buf_fail(&b, HL_ERR_INVALID), HL_ERR_INVALID);
    /* The first error stays; later appends do nothing and report it. */
    ck_assert_int_eq(hl_buf_fail(&b, HL_ERR_IO), HL_ERR_INVALID);
    ck_assert_int_eq(hl_buf_adds(&b, "cd"), HL_ERR_INVALID);
    ck_assert_str_eq(hl_buf_str(&b), "ab");
    ck_assert_int_eq(hl_buf_status(&b), HL_ERR_INVALID);
    hl_buf_free(&b);
}
END_TEST

START_TEST(quoting_is_all_or_nothing)
{
    hl_buf b;
    hl_buf_init(&b, 64);
    ck_assert_int_eq(hl_buf_add_ident(&b, "my \"odd\" t"), HL_OK);
    ck_assert_int_eq(hl_buf_addc(&b, ' '), HL_OK);
    ck_assert_int_eq(hl_buf_add_sqlstr(&b, "it's"), HL_OK);
    ck_assert_str_eq(hl_buf_str(&b), "\"my \"\"odd\"\" t\" 'it''s'");
    hl_buf_free(&b);
    hl_buf_init(&b, 6);
    ck_assert_int_eq(hl_buf_adds(&b, "a"), HL_OK);
    ck_assert_int_eq(hl_buf_add_ident(&b, "abcdef"), HL_ERR_TOO_LARGE);
    ck_assert_str_eq(hl_buf_str(&b), "a"); /* no half-quoted identifier */
    hl_buf_free(&b);
}
END_TEST

START_TEST(steal_hands_over_and_clears)
{
    hl_buf b;
    hl_buf_init(&b, 64);
    hl_buf_adds(&b, "text");
    size_t n = 0;
    unsigned char *p = hl_buf_steal(&b, &n);
    ck_assert_uint_eq(n, 4);
    ck_assert_str_eq((char *)p, "text");
    free(p);
    ck_assert_uint_eq(b.len, 0);
    ck_assert_str_eq(hl_buf_str(&b), "");
    ck_assert_int_eq(hl_buf_adds(&b, "again"), HL_OK);
    hl_buf_free(&b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("buf");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, appends_within_the_limit);
    tcase_add_test(tc, errors_are_sticky_until_reset);
    tcase_add_test(tc, a_writer_records_its_own_error);
    tcase_add_test(tc, quoting_is_all_or_nothing);
    tcase_add_test(tc, steal_hands_over_and_clears);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
