/*
 * test_snapshot.c - snapshot manifests (round trip, hostile input) and the
 * dir store (atomic put, bounded get, list, delete), and that a snapshot holds
 * nothing a power loss could take back from its node. The S3 store is tested
 * against a real server in tests/e2e/test_snapshot.py.
 */
#include <check.h>
#include <dirent.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "config/config.h"
#include "db/db.h"
#include "powerloss_vfs.h"
#include "snapshot/snapshot.h"
#include "snapshot/manifest.h"
#include "snapshot/s3xml.h"
#include "snapshot/store.h"

static hl_manifest sample(void)
{
    static hl_manifest_stream streams[2] = {{"harmonylite-changes-0", 42},
                                            {"harmonylite-changes-1", 9007199254740993ull}};
    hl_manifest m;
    memset(&m, 0, sizeof m);
    m.format = HL_MANIFEST_FORMAT;
    m.node = 3;
    m.epoch = 9223372036854775807ull; /* > 2^53: must survive JSON */
    m.created_ms = 1796000000123ull;
    snprintf(m.version, sizeof m.version, "0.1.0");
    memset(m.schema_hash, 'a', 64);
    m.hlc = 117702107545174016ull;
    snprintf(m.object, sizeof m.object, "snap-20261130T100000000Z-n3-0badf00d.db.zst");
    m.size = 1234;
    memset(m.sha256, '0', 64);
    m.db_size = 8192;
    m.streams = streams;
    m.nstreams = 2;
    return m;
}

static hl_status parse_str(hl_manifest *m, const char *json, char *err, size_t errlen)
{
    return hl_manifest_parse(m, json, strlen(json), err, errlen);
}

START_TEST(manifest_round_trip)
{
    hl_manifest m = sample(), back;
    char err[256] = "";
    char *json = hl_manifest_to_json(&m);
    ck_assert_ptr_nonnull(json);
    ck_assert_ptr_nonnull(strstr(json, "\"epoch\":\t\"9223372036854775807\""));
    ck_assert_int_eq(parse_str(&back, json, err, sizeof err), HL_OK);
    ck_assert_uint_eq(back.epoch, m.epoch);
    ck_assert_uint_eq(back.node, 3);
    ck_assert_uint_eq(back.hlc, m.hlc);
    ck_assert_uint_eq(back.created_ms, m.created_ms);
    ck_assert_uint_eq(back.size, 1234);
    ck_assert_uint_eq(back.db_size, 8192);
    ck_assert_str_eq(back.object, m.object);
    ck_assert_str_eq(back.schema_hash, m.schema_hash);
    ck_assert_uint_eq(back.nstreams, 2);
    ck_assert_str_eq(back.streams[1].name, "harmonylite-changes-1");
    ck_assert_uint_eq(back.streams[1].seq, 9007199254740993ull);
    hl_manifest_free(&back);
    hl_manifest_free(NULL);
    free(json);
}
END_TEST

/* Replaces the first `from` in the sample's JSON with `to` and expects the parser to refuse it, saying `says`. */
static void refused(const char *from, const char *to, const char *says)
{
    hl_manifest m = sample(), back;
    char err[256] = "";
    char *json = hl_manifest_to_json(&m);
    hl_buf b;
    hl_buf_init(&b, 1u << 20);
    char *at = strstr(json, from);
    ck_assert_msg(at != NULL, "%s not in %s", from, json);
    hl_buf_add(&b, json, (size_t)(at - json));
    hl_buf_adds(&b, to);
    hl_buf_adds(&b, at + strlen(from));
    hl_status st = hl_manifest_parse(&back, (const char *)b.data, b.len, err, sizeof err);
    ck_assert_msg(st == HL_ERR_DECODE, "accepted %s -> %s", from, to);
    ck_assert_msg(strstr(err, says) != NULL, "error \"%s\" lacks \"%s\"", err, says);
    ck_assert_ptr_null(strchr(err, '\n'));
    hl_manifest_free(&back);
    hl_buf_free(&b);
    free(json);
}

START_TEST(manifest_refuses_hostile_input)
{
    refused("\"format\":\t1", "\"format\":\t2", "format: expected 1");
    refused("\"format\":\t1", "\"format\":\t\"1\"", "format");
    refused("\"node\":\t\"3\"", "\"node\":\t\"0\"", "node: expected a node id");
    refused("\"node\":\t\"3\"", "\"node\":\t3", "node: expected a decimal string");
    refused("\"size\":\t\"1234\"", "\"size\":\t\"-1\"", "size: expected");
    refused("\"size\":\t\"1234\"", "\"size\":\t\"01234\"", "size: expected");
    refused("\"size\":\t\"1234\"", "\"size\":\t\"18446744073709551615\"", "size: expected");
    refused("\"size\":\t\"1234\"", "\"size\":\t\"99999999999999999999999\"", "size: expected");
    refused("\"hlc\":", "\"hlc_\":", "hlc: expected");
    refused("\"object\":\t\"snap-", "\"object\":\t\"../snap-", "object: expected a name");
    refused("\"object\":\t\"snap-", "\"object\":\t\"a/snap-", "object: expected a name");
    refused("\"object\":\t\"snap-", "\"object\":\t\".snap-", "object: expected a name");
    refused("\"sha256\":\t\"0000", "\"sha256\":\t\"000", "sha256: expected 64");
    refused("\"sha256\":\t\"0000", "\"sha256\":\t\"A000", "sha256: expected 64");
    refused("\"schema_hash\":\t\"aaaa", "\"schema_hash\":\t\"zaaa", "schema_hash: expected 64");
    refused("\"name\":\t\"harmonylite-changes-1\"", "\"name\":\t\"harmonylite-changes-0\"", "listed twice");
    refused("\"name\":\t\"harmonylite-changes-1\"", "\"name\":\t\"a.b\"", "streams[1]");
    refused("\"streams\":\t[", "\"streams\":\t{\"x\":[", "not a JSON object");
    refused("\"version\":\t\"0.1.0\"", "\"version\":\t\"\"", "version: expected");
    refused("\"db_size\":\t\"8192\"\n}", "\"db_size\":\t\"8192\"", "not a JSON object");
}
END_TEST

START_TEST(manifest_bounds)
{
    hl_manifest m;
    char err[256];
    /* too many streams: refused before anything is allocated for them */
    hl_buf b;
    hl_buf_init(&b, 4u << 20);
    hl_buf_adds(&b, "{\"format\":1,\"streams\":[");
    for (int i = 0; i <= HL_MANIFEST_MAX_STREAMS; i++)
        hl_buf_addf(&b, "%s{\"name\":\"s%d\",\"seq\":\"1\"}", i ? "," : "", i);
    hl_buf_adds(&b,
                "],\"node\":\"1\",\"epoch\":\"1\",\"created_ms\":\"1\",\"hlc\":\"1\",\"size\":\"1\",\"db_size\":\"1\","
                "\"version\":\"x\",\"schema_hash\":\"");
    for (int i = 0; i < 64; i++)
        hl_buf_addc(&b, 'a');
    hl_buf_adds(&b, "\",\"sha256\":\"");
    for (int i = 0; i < 64; i++)
        hl_buf_addc(&b, 'b');
    hl_buf_adds(&b, "\",\"object\":\"x.db.zst\"}");
    ck_assert_int_eq(hl_buf_status(&b), HL_OK);
    ck_assert_int_eq(hl_manifest_parse(&m, (const char *)b.data, b.len, err, sizeof err), HL_ERR_DECODE);
    ck_assert_ptr_nonnull(strstr(err, "at most 4096"));
    hl_manifest_free(&m);
    /* more than 1 MiB: refused unread */
    char *big = malloc(HL_MANIFEST_MAX_BYTES + 1);
    memset(big, ' ', HL_MANIFEST_MAX_BYTES + 1);
    ck_assert_int_eq(hl_manifest_parse(&m, big, HL_MANIFEST_MAX_BYTES + 1, err, sizeof err), HL_ERR_DECODE);
    ck_assert_ptr_nonnull(strstr(err, "bytes, more than"));
    hl_manifest_free(&m);
    free(big);
    hl_buf_free(&b);
    /* not NUL-terminated input is read only up to len */
    ck_assert_int_eq(hl_manifest_parse(&m, "{}garbage", 2, err, sizeof err), HL_ERR_DECODE);
    ck_assert_ptr_nonnull(strstr(err, "format"));
    hl_manifest_free(&m);
}
END_TEST

START_TEST(names)
{
    ck_assert(hl_snapshot_name_ok("snap-1.db.zst"));
    ck_assert(!hl_snapshot_name_ok(""));
    ck_assert(!hl_snapshot_name_ok(NULL));
    ck_assert(!hl_snapshot_name_ok(".."));
    ck_assert(!hl_snapshot_name_ok(".hidden"));
    ck_assert(!hl_snapshot_name_ok("a/b"));
    ck_assert(!hl_snapshot_name_ok("a b"));
    ck_assert(!hl_snapshot_name_ok("a\\b"));
    char longname[HL_SNAPSHOT_NAME_MAX + 2];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    ck_assert(!hl_snapshot_name_ok(longname));
    longname[HL_SNAPSHOT_NAME_MAX] = 0;
    ck_assert(hl_snapshot_name_ok(longname));
}
END_TEST

static hl_status collect(void *ctx, const void *data, size_t n)
{
    return hl_buf_add(ctx, data, n);
}

START_TEST(dir_store)
{
    char dir[] = "/tmp/hl_test_snapshot.XXXXXX";
    char err[512];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    hl_store *s = NULL;
    ck_assert_int_eq(hl_store_dir_open(&s, "/nonexistent/x", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_ptr_nonnull(strstr(err, "snapshot.dir: expected an existing directory"));
    ck_assert_int_eq(hl_store_dir_open(&s, dir, err, sizeof err), HL_OK);

    /* from memory and from a file descriptor (pread: the fd's offset does not matter) */
    hl_store_src mem = {.fd = -1, .mem = "hello", .size = 5};
    ck_assert_int_eq(s->ops->put(s, "b.manifest.json", &mem, err, sizeof err), HL_OK);
    char path[256];
    snprintf(path, sizeof path, "%s/.src", dir);
    FILE *f = fopen(path, "w+");
    for (int i = 0; i < 300000; i++)
        fputs("0123456789", f);
    fflush(f);
    hl_store_src fsrc = {.fd = fileno(f), .mem = NULL, .size = 3000000};
    ck_assert_int_eq(s->ops->put(s, "a.db.zst", &fsrc, err, sizeof err), HL_OK);
    fclose(f);
    ck_assert_int_eq(s->ops->put(s, "../escape", &mem, err, sizeof err), HL_ERR_INVALID);

    hl_store_names l;
    ck_assert_int_eq(s->ops->list(s, &l, err, sizeof err), HL_OK);
    ck_assert_uint_eq(l.n, 2); /* sorted; dot files (temp files, .src) never listed */
    ck_assert_str_eq(l.v[0], "a.db.zst");
    ck_assert_str_eq(l.v[1], "b.manifest.json");
    hl_store_names_free(&l);
    /* no temp file is left behind */
    DIR *dp = opendir(dir);
    struct dirent *e;
    int files = 0;
    while ((e = readdir(dp)) != NULL)
        files += e->d_name[0] != '.' || strcmp(e->d_name, ".src") == 0 ? 1 : 0;
    closedir(dp);
    ck_assert_int_eq(files, 3);

    hl_buf b;
    hl_buf_init(&b, 8u << 20);
    ck_assert_int_eq(s->ops->get(s, "a.db.zst", 3000000, collect, &b, err, sizeof err), HL_OK);
    ck_assert_uint_eq(b.len, 3000000);
    ck_assert(memcmp(b.data + 2999990, "0123456789", 10) == 0);
    hl_buf_reset(&b);
    /* more than the caller expects: stopped */
    ck_assert_int_eq(s->ops->get(s, "a.db.zst", 2999999, collect, &b, err, sizeof err), HL_ERR_TOO_LARGE);
    ck_assert_int_eq(s->ops->get(s, "missing.db.zst", 10, collect, &b, err, sizeof err), HL_ERR_NOT_FOUND);
    ck_assert_int_eq(s->ops->del(s, "a.db.zst", err, sizeof err), HL_OK);
    ck_assert_int_eq(s->ops->del(s, "a.db.zst", err, sizeof err), HL_OK); /* gone already: fine */
    ck_assert_int_eq(s->ops->del(s, "b.manifest.json", err, sizeof err), HL_OK);
    ck_assert_int_eq(s->ops->list(s, &l, err, sizeof err), HL_OK);
    ck_assert_uint_eq(l.n, 0);
    hl_store_names_free(&l);
    hl_buf_free(&b);
    hl_store_close(s);
    hl_store_close(NULL);
    unlink(path);
    rmdir(dir);
}
END_TEST

static hl_status list_of(const char *xml, hl_store_names *l, bool *more, char *tok, size_t tokcap)
{
    memset(l, 0, sizeof *l);
    return hl_s3xml_list(xml, strlen(xml), "p/", l, more, tok, tokcap);
}

START_TEST(s3_xml)
{
    hl_store_names l;
    bool more;
    char tok[64], text[16];
    const char *page = "<?xml version=\"1.0\"?><ListBucketResult xmlns=\"x\"><IsTruncated>true</IsTruncated>"
                       "<NextContinuationToken>t&amp;1&#x2F;&#65;</NextContinuationToken>"
                       "<Contents><Key>p/snap-1.db.zst</Key><Size>6</Size></Contents>"
                       "<Contents><Key>p/a&#x2F;b</Key></Contents>"      /* "a/b": not a name */
                       "<Contents><Key>q/snap-2.db.zst</Key></Contents>" /* other prefix */
                       "<Contents><Key>p/..</Key></Contents>"            /* never a name */
                       "<Contents><Key>p/snap-&#49;.manifest.json</Key></Contents></ListBucketResult>";
    ck_assert_int_eq(list_of(page, &l, &more, tok, sizeof tok), HL_OK);
    ck_assert(more);
    ck_assert_str_eq(tok, "t&1/A");
    ck_assert_uint_eq(l.n, 2);
    ck_assert_str_eq(l.v[0], "snap-1.db.zst");
    ck_assert_str_eq(l.v[1], "snap-1.manifest.json");
    hl_store_names_free(&l);

    /* malformed: refused, not guessed at */
    const char *bad[] = {
        "<Error><Code>AccessDenied</Code></Error>",
        "<ListBucketResult><Contents><Key>p/x</Key>",
        "<ListBucketResult><Contents><Key>p/<b>x</b></Key></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>p/&bogus;</Key></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>p/&#0;</Key></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>p/&#xD800;</Key></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>p/&#99999999999;</Key></Contents></ListBucketResult>",
        "<ListBucketResult><Contents><Key>p/&amp</Key></Contents></ListBucketResult>",
        "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", /* no token to go on with */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(list_of(bad[i], &l, &more, tok, sizeof tok) == HL_ERR_DECODE, "accepted %s", bad[i]);
        hl_store_names_free(&l);
    }
    /* a token longer than its buffer is refused, never cut */
    ck_assert_int_eq(list_of("<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>"
                             "0123456789012345678901234567890123456789012345678901234567890123456789"
                             "</NextContinuationToken></ListBucketResult>",
                             &l, &more, tok, sizeof tok),
                     HL_ERR_DECODE);
    hl_store_names_free(&l);

    size_t pos = 0;
    const char *err = "<Error><Code>NoSuchKey</Code><Code>x</Code><Code>0123456789abcdef</Code></Error>";
    ck_assert_int_eq(hl_s3xml_text(err, strlen(err), &pos, "Code", text, sizeof text), 1);
    ck_assert_str_eq(text, "NoSuchKey");
    ck_assert_int_eq(hl_s3xml_text(err, strlen(err), &pos, "Code", text, sizeof text), 1);
    ck_assert_str_eq(text, "x");
    ck_assert_int_eq(hl_s3xml_text(err, strlen(err), &pos, "Code", text, sizeof text), -1); /* 16 bytes + NUL */
    pos = 0;
    ck_assert_int_eq(hl_s3xml_text(err, strlen(err), &pos, "Message", text, sizeof text), 0);
    /* the length bounds the search: an element past it is not found */
    pos = 0;
    ck_assert_int_eq(hl_s3xml_text(err, 20, &pos, "Code", text, sizeof text), -1);
}
END_TEST

static hl_status count_href(void *ctx, const char *text)
{
    hl_buf *b = ctx;
    hl_buf_adds(b, text);
    return hl_buf_addc(b, '|');
}

START_TEST(dav_xml)
{
    hl_buf b;
    hl_buf_init(&b, 1 << 20);
    const char *ok = "<?xml version=\"1.0\"?><D:multistatus xmlns:D=\"DAV:\"><D:response><D:href>/s/</D:href>"
                     "<D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop></D:propstat>"
                     "</D:response><d:response><d:href>/s/a&amp;b</d:href></d:response>"
                     "<response xmlns=\"DAV:\"><href>/s/c</href><hrefx>no</hrefx></response></D:multistatus>";
    ck_assert_int_eq(hl_xml_each(ok, strlen(ok), "href", 64, 10, count_href, &b), HL_OK);
    ck_assert_str_eq(hl_buf_str(&b), "/s/|/s/a&b|/s/c|");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_xml_each(ok, strlen(ok), "href", 64, 2, count_href, &b), HL_ERR_TOO_LARGE);
    const char *bad[] = {"<D:href>/s/a</d:href>", "<href>/s/<b/></href>", "<href>/s/a", "<href>&#0;</href>"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(hl_xml_each(bad[i], strlen(bad[i]), "href", 64, 10, count_href, &b) == HL_ERR_DECODE, "%s",
                      bad[i]);
    const char *longer = "<href>0123456789</href>";
    ck_assert_int_eq(hl_xml_each(longer, strlen(longer), "href", 8, 10, count_href, &b), HL_ERR_DECODE);
    hl_buf_free(&b);
}
END_TEST

static void app_exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    ck_assert_msg(sqlite3_exec(db, sql, NULL, NULL, &msg) == SQLITE_OK, "%s: %s", sql, msg ? msg : "");
}

/*
 * A snapshot copies what is committed, and under synchronous = NORMAL that is
 * not yet on disk: had the node lost its power after the upload, nodes
 * restored from the snapshot would keep rows their origin never had again and
 * never sends. So the node's WAL is synced before the copy leaves it.
 */
START_TEST(a_snapshot_never_holds_what_a_power_loss_takes_back)
{
    plv_install();
    char dir[] = "/tmp/hl_test_snapshot.XXXXXX", path[512], store[512], after[512], lost[600];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/app.db", dir);
    snprintf(store, sizeof store, "%s/store", dir);
    snprintf(after, sizeof after, "%s/after", dir);
    ck_assert_int_eq(mkdir(store, 0700), 0);
    ck_assert_int_eq(mkdir(after, 0700), 0);
    sqlite3 *app = NULL;
    ck_assert_int_eq(sqlite3_open(path, &app), SQLITE_OK);
    app_exec(app, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
                  "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    hl_db_global_init();
    hl_db *d = NULL;
    ck_assert_int_eq(hl_db_open(&d, path, 1, 2000), HL_OK);
    ck_assert_int_eq(hl_db_install(d, true, NULL), HL_OK);
    plv_sync_all(); /* the table and harmonylite's state count as on disk */
    app_exec(app, "INSERT INTO t VALUES (1, 'in the snapshot')");

    hl_config c;
    hl_config_defaults(&c);
    free(c.db_path);
    free(c.snapshot.store);
    free(c.snapshot.dir);
    c.db_path = strdup(path);
    c.snapshot.store = strdup("dir");
    c.snapshot.dir = strdup(store);
    char where[1024], err[1024];
    ck_assert_msg(hl_snapshot_save(&c, where, sizeof where, err, sizeof err) == HL_OK, "%s", err);

    plv_power_loss(path, after, lost, sizeof lost);
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    ck_assert_int_eq(sqlite3_open(lost, &db), SQLITE_OK);
    ck_assert_int_eq(sqlite3_prepare_v2(db, "SELECT count(*) FROM t WHERE id = 1", -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_msg(sqlite3_column_int(st, 0) == 1, "the node lost a row its snapshot holds");
    sqlite3_finalize(st);
    sqlite3_close(db);
    hl_db_close(d);
    sqlite3_close(app);
    hl_config_free(&c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("snapshot");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, manifest_round_trip);
    tcase_add_test(tc, manifest_refuses_hostile_input);
    tcase_add_test(tc, manifest_bounds);
    tcase_add_test(tc, names);
    tcase_add_test(tc, dir_store);
    tcase_add_test(tc, s3_xml);
    tcase_add_test(tc, dav_xml);
    tcase_add_test(tc, a_snapshot_never_holds_what_a_power_loss_takes_back);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
