/*
 * test_config.c - the configuration module: defaults, YAML loading and every
 * error message, environment and flag precedence, derived values, dump.
 */
#include <check.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"

/* environment strings: the API takes char *const * like environ */
#define E(s) ((char *)(s))

#ifndef HL_SOURCE_DIR
#define HL_SOURCE_DIR "."
#endif

static char tmpdir[256];
static char err[1024];

static void setup(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/hl_test_config.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    err[0] = 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void teardown(void)
{
    nftw(tmpdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

/* Writes text to <tmpdir>/<name> and returns the path (static storage). */
static const char *write_file(const char *name, const char *text, size_t len)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(text, 1, len, f), len);
    fclose(f);
    return path;
}

/* Loads yaml written to <tmpdir>/node.yaml into c (which gets defaults first). */
static hl_status load(hl_config *c, const char *yaml)
{
    hl_config_defaults(c);
    const char *p = write_file("node.yaml", yaml, strlen(yaml));
    return hl_config_load_file(c, p, err, sizeof err);
}

/* Asserts that loading yaml fails with exactly "<tmpdir>/node.yaml:<rest>". */
static void expect_load_error(const char *yaml, const char *rest)
{
    hl_config c;
    char want[1200];
    hl_status st = load(&c, yaml);
    snprintf(want, sizeof want, "%s/node.yaml:%s", tmpdir, rest);
    ck_assert_int_eq(st, HL_ERR_CONFIG);
    ck_assert_str_eq(err, want);
    ck_assert_ptr_null(strchr(err, '\n'));
    hl_config_free(&c);
}

/* Returns c dumped as text (caller frees). */
static char *dump(const hl_config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    ck_assert_ptr_nonnull(f);
    hl_config_dump(c, f);
    fclose(f);
    return text;
}

/* Returns the dump without its first (comment) line, which names the file. */
static char *dump_body(const hl_config *c)
{
    char *text = dump(c);
    size_t off = strcspn(text, "\n");
    ck_assert_int_eq(text[off], '\n');
    off++;
    memmove(text, text + off, strlen(text + off) + 1);
    return text;
}

static char *read_source(const char *rel)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", HL_SOURCE_DIR, rel);
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        fwrite(chunk, 1, n, m);
    fclose(f);
    fclose(m);
    return text;
}

/* ---- defaults --------------------------------------------------------- */

START_TEST(test_defaults)
{
    hl_config c;
    hl_config_defaults(&c);
    ck_assert_ptr_null(c.config_path);
    ck_assert_ptr_null(c.db_path);
    ck_assert_uint_eq(c.node_id, 0);
    ck_assert_ptr_null(c.data_dir);
    ck_assert(c.publish);
    ck_assert(c.replicate);
    ck_assert_int_eq(c.scan_max_changes, 10000);
    ck_assert_int_eq(c.polling_interval_ms, 1000);
    ck_assert_int_eq(c.cleanup_interval_ms, 5000);
    ck_assert_int_eq(c.tombstone_retention_s, 7 * 24 * 3600);
    ck_assert_int_eq(c.max_clock_drift_s, 60);
    ck_assert_int_eq(c.shutdown_grace_s, 10);
    ck_assert_int_eq(c.order_hold_timeout_s, 60);
    ck_assert_int_eq(c.stall_timeout_s, 30);
    ck_assert_int_eq(c.apply_batch_rows, 10000);
    ck_assert_int_eq(c.cache_size_kib, 32768);
    ck_assert_int_eq(c.wal_size_limit, 67108864);

    ck_assert_int_eq(c.replication_log.shards, 1);
    ck_assert_int_eq(c.replication_log.max_entries, 1048576);
    ck_assert_int_eq(c.replication_log.replicas, 1);
    ck_assert(c.replication_log.compress);
    ck_assert_int_eq(c.replication_log.max_bytes, -1);
    ck_assert_int_eq(c.replication_log.max_age_s, 0);
    ck_assert_int_eq(c.replication_log.chunk_bytes, 524288);
    ck_assert_int_eq(c.replication_log.max_changeset_bytes, 268435456);
    ck_assert_int_eq(c.replication_log.duplicate_window_s, 120);
    ck_assert(!c.replication_log.update_existing);

    ck_assert_uint_eq(c.nats.urls.n, 0);
    ck_assert_str_eq(c.nats.bind_address, "127.0.0.1:4222");
    ck_assert_str_eq(c.nats.subject_prefix, "harmonylite-change-log");
    ck_assert_str_eq(c.nats.stream_prefix, "harmonylite-changes");
    ck_assert_ptr_null(c.nats.server_config);
    ck_assert_str_eq(c.nats.server_bin, "nats-server");
    ck_assert_str_eq(c.nats.cluster_name, "harmonylite");
    ck_assert_ptr_null(c.nats.cluster_addr);
    ck_assert_uint_eq(c.nats.cluster_peers.n, 0);
    ck_assert_ptr_null(c.nats.user_name);
    ck_assert_ptr_null(c.nats.user_password);
    ck_assert_ptr_null(c.nats.seed_file);
    ck_assert_ptr_null(c.nats.creds_file);
    ck_assert_ptr_null(c.nats.ca_file);
    ck_assert_ptr_null(c.nats.cert_file);
    ck_assert_ptr_null(c.nats.key_file);
    ck_assert_int_eq(c.nats.connect_retries, 5);
    ck_assert_int_eq(c.nats.reconnect_wait_seconds, 2);
    ck_assert_int_eq(c.nats.max_payload, 1048576);

    ck_assert(!c.logging.verbose);
    ck_assert_str_eq(c.logging.format, "console");
    ck_assert_str_eq(c.logging.level, "info");
    ck_assert_str_eq(c.http.bind, "0.0.0.0:8080");
    hl_config_free(&c);
    hl_config_free(&c); /* fields were reset: a second free is harmless */
    hl_config_free(NULL);
}
END_TEST

/* Keys in config/harmonylite.yaml: "name: value" lines (section headers end
 * with the colon). test_example_file checks the file names every key. */
static size_t example_key_lines(void)
{
    char path[512], line[1024];
    size_t n = 0;
    snprintf(path, sizeof path, "%s/config/harmonylite.yaml", HL_SOURCE_DIR);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof line, f)) {
        const char *p = line + strspn(line, " ");
        const char *colon = strchr(p, ':');
        if (*p >= 'a' && *p <= 'z' && colon && colon[1] == ' ')
            n++;
    }
    fclose(f);
    return n;
}

START_TEST(test_key_table)
{
    size_t n = hl_config_key_count();
    hl_config_key_info a, b;
    ck_assert_uint_eq(n, example_key_lines());
    ck_assert(!hl_config_key_at(n, &a));
    for (size_t i = 0; i < n; i++) {
        ck_assert(hl_config_key_at(i, &a));
        ck_assert_ptr_nonnull(a.doc);
        ck_assert_ptr_nonnull(strstr(a.env, "HARMONYLITE_"));
        ck_assert_str_eq(hl_config_flag_path(a.flag), a.path);
        /* every default is itself a valid value */
        if (a.def) {
            hl_config c;
            hl_config_defaults(&c);
            ck_assert_msg(hl_config_set(&c, a.path, a.def, "default", err, sizeof err) == HL_OK, "%s", err);
            hl_config_free(&c);
        }
        for (size_t j = i + 1; j < n; j++) {
            ck_assert(hl_config_key_at(j, &b));
            ck_assert_str_ne(a.path, b.path);
            ck_assert_str_ne(a.env, b.env);
            ck_assert_str_ne(a.flag, b.flag);
        }
    }
    ck_assert(hl_config_key_at(0, &a));
    ck_assert_str_eq(a.path, "db_path");
    ck_assert_str_eq(a.env, "HARMONYLITE_DB_PATH");
    ck_assert_str_eq(a.flag, "db-path");

    ck_assert_str_eq(hl_config_flag_path("-node-id"), "node_id");
    ck_assert_str_eq(hl_config_flag_path("--replication-log-shards"), "replication_log.shards");
    ck_assert_str_eq(hl_config_flag_path("-cluster-addr"), "nats.cluster_addr");
    ck_assert_str_eq(hl_config_flag_path("-cluster-peers"), "nats.cluster_peers");
    ck_assert_str_eq(hl_config_flag_path("-nats-cluster-peers"), "nats.cluster_peers");
    ck_assert_ptr_null(hl_config_flag_path("-node_id"));
    ck_assert_ptr_null(hl_config_flag_path("-config"));
    ck_assert_ptr_null(hl_config_flag_path("-nats"));
    ck_assert_ptr_null(hl_config_flag_path(NULL));

    int found = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert(hl_config_key_at(i, &a));
        /* A key is secret exactly when its name says it holds one. */
        size_t plen = strlen(a.path);
        bool is_file = plen > 5 && strcmp(a.path + plen - 5, "_file") == 0; /* a path to one, not one */
        bool named_secret = !is_file && (strstr(a.path, "password") || strstr(a.path, "secret") ||
                                         strstr(a.path, "token") || strstr(a.path, "passphrase"));
        ck_assert_msg(a.secret == named_secret, "%s: secret %d", a.path, a.secret);
        if (strcmp(a.path, "nats.user_password") == 0)
            found++;
        if (strcmp(a.path, "replication_log.shards") == 0) {
            ck_assert_str_eq(a.type, "integer");
            ck_assert_int_eq(a.min, 1);
            ck_assert_int_eq(a.max, 1024);
            ck_assert_str_eq(a.env, "HARMONYLITE_REPLICATION_LOG_SHARDS");
            found++;
        }
    }
    ck_assert_int_eq(found, 2);
}
END_TEST

/* ---- loading ---------------------------------------------------------- */

START_TEST(test_empty_files)
{
    static const char *empties[] = {"", "\n\n", "# only a comment\n", "---\n", "---\n...\n", "~\n", "null\n"};
    for (size_t i = 0; i < sizeof empties / sizeof empties[0]; i++) {
        hl_config c, d;
        ck_assert_msg(load(&c, empties[i]) == HL_OK, "%s", err);
        ck_assert_str_eq(err, "");
        ck_assert_ptr_nonnull(c.config_path);
        hl_config_defaults(&d);
        char *x = dump_body(&c), *y = dump_body(&d);
        ck_assert_str_eq(x, y);
        free(x);
        free(y);
        hl_config_free(&c);
        hl_config_free(&d);
    }
}
END_TEST

START_TEST(test_full_file)
{
    hl_config c;
    const char *yaml = "db_path: /data/app.db\n"
                       "node_id: 7\n"
                       "data_dir: /data/hl\n"
                       "publish: no\n"
                       "replicate: Off\n"
                       "scan_max_changes: 512\n"
                       "polling_interval: 0\n"
                       "cleanup_interval: 60000\n"
                       "tombstone_retention: 86400\n"
                       "shutdown_grace: 30\n"
                       "apply_batch_rows: 500\n"
                       "cache_size: \"2048\"\n"
                       "replication_log:\n"
                       "  shards: 4\n"
                       "  max_entries: 2048\n"
                       "  replicas: 3\n"
                       "  compress: FALSE\n"
                       "  max_bytes: 1073741824\n"
                       "  max_age: 86400\n"
                       "  chunk_bytes: 65536\n"
                       "  max_changeset_bytes: 1048576\n"
                       "  duplicate_window: 60\n"
                       "  update_existing: yes\n"
                       "nats:\n"
                       "  urls:\n"
                       "    - nats://nats-0:4222\n"
                       "    - tls://nats-1:4222\n"
                       "  bind_address: 127.0.0.1:4333\n"
                       "  subject_prefix: app.changes\n"
                       "  stream_prefix: app-changes\n"
                       "  server_config: /etc/nats/extra.conf\n"
                       "  server_bin: /usr/sbin/nats-server\n"
                       "  cluster_name: prod\n"
                       "  cluster_addr: 0.0.0.0:6222\n"
                       "  cluster_peers: [nats://hl-0.hl:6222, 'nats-route://hl-1.hl:6222']\n"
                       "  user_name: app\n"
                       "  user_password: \"s3cret\"\n"
                       "  seed_file: /run/secrets/seed\n"
                       "  creds_file: /run/secrets/creds\n"
                       "  ca_file: /etc/ssl/ca.pem\n"
                       "  cert_file: /etc/ssl/cert.pem\n"
                       "  key_file: /etc/ssl/key.pem\n"
                       "  connect_retries: -1\n"
                       "  reconnect_wait_seconds: 5\n"
                       "  max_payload: 8388608\n"
                       "logging:\n"
                       "  verbose: true\n"
                       "  format: JSON\n"
                       "  level: warn\n"
                       "http:\n"
                       "  bind: \"\"\n";
    ck_assert_msg(load(&c, yaml) == HL_OK, "%s", err);
    ck_assert_str_eq(c.db_path, "/data/app.db");
    ck_assert_uint_eq(c.node_id, 7);
    ck_assert_str_eq(c.data_dir, "/data/hl");
    ck_assert(!c.publish);
    ck_assert(!c.replicate);
    ck_assert_int_eq(c.scan_max_changes, 512);
    ck_assert_int_eq(c.polling_interval_ms, 0);
    ck_assert_int_eq(c.cleanup_interval_ms, 60000);
    ck_assert_int_eq(c.tombstone_retention_s, 86400);
    ck_assert_int_eq(c.shutdown_grace_s, 30);
    ck_assert_int_eq(c.apply_batch_rows, 500);
    ck_assert_int_eq(c.cache_size_kib, 2048);
    ck_assert_int_eq(c.replication_log.shards, 4);
    ck_assert_int_eq(c.replication_log.max_entries, 2048);
    ck_assert_int_eq(c.replication_log.replicas, 3);
    ck_assert(!c.replication_log.compress);
    ck_assert_int_eq(c.replication_log.max_bytes, 1073741824);
    ck_assert_int_eq(c.replication_log.max_age_s, 86400);
    ck_assert_int_eq(c.replication_log.chunk_bytes, 65536);
    ck_assert_int_eq(c.replication_log.max_changeset_bytes, 1048576);
    ck_assert_int_eq(c.replication_log.duplicate_window_s, 60);
    ck_assert(c.replication_log.update_existing);
    ck_assert_uint_eq(c.nats.urls.n, 2);
    ck_assert_str_eq(c.nats.urls.v[0], "nats://nats-0:4222");
    ck_assert_str_eq(c.nats.urls.v[1], "tls://nats-1:4222");
    ck_assert_str_eq(c.nats.bind_address, "127.0.0.1:4333");
    ck_assert_str_eq(c.nats.subject_prefix, "app.changes");
    ck_assert_str_eq(c.nats.stream_prefix, "app-changes");
    ck_assert_str_eq(c.nats.server_config, "/etc/nats/extra.conf");
    ck_assert_str_eq(c.nats.server_bin, "/usr/sbin/nats-server");
    ck_assert_str_eq(c.nats.cluster_name, "prod");
    ck_assert_str_eq(c.nats.cluster_addr, "0.0.0.0:6222");
    ck_assert_uint_eq(c.nats.cluster_peers.n, 2);
    ck_assert_str_eq(c.nats.cluster_peers.v[0], "nats://hl-0.hl:6222");
    ck_assert_str_eq(c.nats.cluster_peers.v[1], "nats-route://hl-1.hl:6222");
    ck_assert_str_eq(c.nats.user_name, "app");
    ck_assert_str_eq(c.nats.user_password, "s3cret");
    ck_assert_str_eq(c.nats.seed_file, "/run/secrets/seed");
    ck_assert_str_eq(c.nats.creds_file, "/run/secrets/creds");
    ck_assert_str_eq(c.nats.ca_file, "/etc/ssl/ca.pem");
    ck_assert_str_eq(c.nats.cert_file, "/etc/ssl/cert.pem");
    ck_assert_str_eq(c.nats.key_file, "/etc/ssl/key.pem");
    ck_assert_int_eq(c.nats.connect_retries, -1);
    ck_assert_int_eq(c.nats.reconnect_wait_seconds, 5);
    ck_assert_int_eq(c.nats.max_payload, 8388608);
    ck_assert(c.logging.verbose);
    ck_assert_str_eq(c.logging.format, "json"); /* stored lower-case */
    ck_assert_str_eq(c.logging.level, "warn");
    ck_assert_str_eq(c.http.bind, ""); /* "" disables the listener; it is not reset to the default */

    /* every key is set above, but creds_file and seed_file exclude each other */
    ck_assert_int_eq(hl_config_finish_host(&c, "whatever", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_ptr_nonnull(strstr(err, "nats.seed_file: cannot be used together with nats.creds_file"));
    free(c.nats.seed_file);
    c.nats.seed_file = NULL;
    ck_assert_int_eq(hl_config_finish_host(&c, "whatever", err, sizeof err), HL_OK);
    ck_assert_str_eq(c.logging.level, "debug"); /* verbose wins */
    ck_assert_uint_eq(c.node_id, 7);
    ck_assert_str_eq(c.data_dir, "/data/hl");
    hl_config_free(&c);
}
END_TEST

START_TEST(test_yaml_forms)
{
    hl_config c;
    /* flow mappings, null sections and lists, empty optional strings, a later file overriding */
    ck_assert_msg(load(&c, "{db_path: a.db, nats: {urls: ['nats://x:1'], seed_file: ''}, logging: ~, http: }\n") ==
                      HL_OK,
                  "%s", err);
    ck_assert_str_eq(c.db_path, "a.db");
    ck_assert_uint_eq(c.nats.urls.n, 1);
    ck_assert_ptr_null(c.nats.seed_file);
    ck_assert_str_eq(c.logging.format, "console");
    hl_config_free(&c);

    ck_assert_msg(load(&c, "nats:\n  urls:\n  cluster_addr: ~\n  user_name:\ndb_path: \"\"\n") == HL_OK, "%s", err);
    ck_assert_uint_eq(c.nats.urls.n, 0);
    ck_assert_ptr_null(c.nats.cluster_addr);
    ck_assert_ptr_null(c.nats.user_name);
    ck_assert_ptr_null(c.db_path);
    hl_config_free(&c);

    /* a dotted key at the top level is the same key */
    ck_assert_msg(load(&c, "replication_log.shards: 3\n") == HL_OK, "%s", err);
    ck_assert_int_eq(c.replication_log.shards, 3);
    hl_config_free(&c);

    /* booleans in any case, integers with a sign, anchors without aliases */
    ck_assert_msg(load(&c, "publish: YES\nreplicate: On\nnode_id: +12\nnats:\n  connect_retries: &r -1\n") == HL_OK,
                  "%s", err);
    ck_assert(c.publish);
    ck_assert(c.replicate);
    ck_assert_uint_eq(c.node_id, 12);
    ck_assert_int_eq(c.nats.connect_retries, -1);
    hl_config_free(&c);

    /* int64 extremes */
    ck_assert_msg(load(&c, "replication_log:\n  max_entries: 9223372036854775807\nnode_id: 9223372036854775807\n") ==
                      HL_OK,
                  "%s", err);
    ck_assert_int_eq(c.replication_log.max_entries, INT64_MAX);
    ck_assert_uint_eq(c.node_id, (uint64_t)INT64_MAX);
    hl_config_free(&c);

    /* a second file overrides only what it names */
    hl_config_defaults(&c);
    const char *p1 = write_file("a.yaml", "db_path: a.db\nnode_id: 2\n", 25);
    ck_assert_int_eq(hl_config_load_file(&c, p1, err, sizeof err), HL_OK);
    const char *p2 = write_file("b.yaml", "node_id: 3\n", 11);
    ck_assert_int_eq(hl_config_load_file(&c, p2, err, sizeof err), HL_OK);
    ck_assert_str_eq(c.db_path, "a.db");
    ck_assert_uint_eq(c.node_id, 3);
    ck_assert_str_eq(c.config_path, p2);
    hl_config_free(&c);
}
END_TEST

START_TEST(test_error_types)
{
    expect_load_error("db_path: a.db\n"
                      "node_id: 1\n"
                      "publish: true\n"
                      "\n"
                      "# comment\n"
                      "replication_log:\n"
                      "  shards: abc\n",
                      "7: replication_log.shards: expected an integer from 1 to 1024, got \"abc\"");
    expect_load_error("db_path: a.db\n\n\n\npublish: maybe\n", "5: publish: expected true or false, got \"maybe\"");
    expect_load_error("publish: 1\n", "1: publish: expected true or false, got \"1\"");
    expect_load_error("replication_log:\n  shards: 0\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"0\"");
    expect_load_error("replication_log:\n  shards: 1025\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"1025\"");
    expect_load_error("replication_log:\n  shards: 1.5\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"1.5\"");
    expect_load_error("replication_log:\n  shards: 12abc\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"12abc\"");
    expect_load_error("replication_log:\n  shards: \" 12\"\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \" 12\"");
    expect_load_error("replication_log:\n  shards: 0x10\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"0x10\"");
    expect_load_error("db_path: a.db\nwal_size_limit: 4096\n",
                      "2: wal_size_limit: expected an integer from 1048576 to 1099511627776, got \"4096\"");
    expect_load_error("replication_log:\n  shards: 1e3\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"1e3\"");
    expect_load_error("replication_log:\n  shards:\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"\"");
    expect_load_error("replication_log:\n  shards: '-'\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"-\"");
    expect_load_error("replication_log:\n  shards: '+'\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got \"+\"");
    expect_load_error("scan_max_changes: 99999999999999999999\n",
                      "1: scan_max_changes: expected an integer from 1 to 1000000, got \"99999999999999999999\"");
    expect_load_error("replication_log:\n  max_entries: 9223372036854775808\n",
                      "2: replication_log.max_entries: expected an integer from 1 to 9223372036854775807, got "
                      "\"9223372036854775808\"");
    expect_load_error("node_id: -1\n", "1: node_id: expected an integer from 0 to 9223372036854775807, got \"-1\"");
    expect_load_error("shutdown_grace: 3601\n", "1: shutdown_grace: expected an integer from 0 to 3600, got \"3601\"");
    expect_load_error("logging:\n  format: xml\n", "2: logging.format: expected one of console, json, got \"xml\"");
    expect_load_error("logging:\n  level: verbose\n",
                      "2: logging.level: expected one of debug, info, warn, error, got \"verbose\"");
    expect_load_error("logging:\n  format: \"\"\n", "2: logging.format: expected one of console, json, got \"\"");
    expect_load_error("nats:\n  urls:\n    - nats://ok:4222\n    - http://bad:4222\n",
                      "4: nats.urls: expected a URL starting with nats://, tls://, ws:// or wss://, got "
                      "\"http://bad:4222\"");
    expect_load_error("nats:\n  cluster_peers: [nats://a:6222, tls://b:6222]\n",
                      "2: nats.cluster_peers: expected a URL starting with nats:// or nats-route://, or a DNS "
                      "entry dns+srv://_<port-name>._tcp.<service> or dns://<name>:<port>, got \"tls://b:6222\"");
    expect_load_error("nats:\n  urls: ['']\n", "2: nats.urls: expected a non-empty string in the list");
    expect_load_error("nats:\n  subject_prefix: \"a b\"\n",
                      "2: nats.subject_prefix: expected a NATS subject (tokens separated by '.', no spaces, '*' or "
                      "'>'), got \"a b\"");
    expect_load_error("nats:\n  stream_prefix: a.b\n",
                      "2: nats.stream_prefix: expected a stream name (no spaces, '.', '*', '>', '/' or '\\'), got "
                      "\"a.b\"");
    expect_load_error("db_path: \"a\\0b\"\n", "1: db_path: expected text without NUL bytes");
    expect_load_error("db_path: \"line\\nbreak\"\nnode_id: \"x\\ny\"\n",
                      "2: node_id: expected an integer from 0 to 9223372036854775807, got \"x\\x0ay\"");
}
END_TEST

START_TEST(test_error_unknown_keys)
{
    expect_load_error("db_path: a.db\nnats:\n  urlz: [nats://a:4222]\n",
                      "3: nats.urlz: unknown key (did you mean nats.urls?)");
    expect_load_error("urls: [nats://a:4222]\n", "1: urls: unknown key (did you mean nats.urls?)");
    expect_load_error("natz:\n  urls: []\n", "1: natz: unknown key (did you mean nats?)");
    expect_load_error("replicaton_log:\n  shards: 2\n",
                      "1: replicaton_log: unknown key (did you mean replication_log?)");
    expect_load_error("db_paht: x\n", "1: db_paht: unknown key (did you mean db_path?)");
    expect_load_error("DB_PATH: x\n", "1: DB_PATH: unknown key (did you mean db_path?)");
    expect_load_error("nats:\n  shards: 2\n", "2: nats.shards: unknown key (did you mean replication_log.shards?)");
    expect_load_error("snapshot:\n  enabled: true\n", "2: snapshot.enabled: unknown key");
    expect_load_error("seq_map_path: /tmp/x\n", "1: seq_map_path: unknown key");
    expect_load_error("nats:\n  nats:\n    urls: []\n", "2: nats.nats: unknown key");
    expect_load_error("\"a\\nb\": 1\n", "1: a\\x0ab: unknown key");
    expect_load_error("? [a, b]\n: 1\n", "1: expected a key name, got a sequence");
    expect_load_error("nats:\n  ? {a: 1}\n  : 1\n", "2: nats: expected a key name, got a mapping");
}
END_TEST

START_TEST(test_error_structure)
{
    expect_load_error("db_path: a.db\nnats: 5\n",
                      "2: nats: expected a section (a mapping of keys such as nats.urls), got \"5\"");
    expect_load_error("logging:\n  - a\n",
                      "2: logging: expected a section (a mapping of keys such as logging.verbose), got a sequence");
    expect_load_error("db_path:\n  a: 1\n", "2: db_path: expected a string, got a mapping");
    expect_load_error("publish: [true]\n", "1: publish: expected true or false, got a sequence");
    expect_load_error("replication_log:\n  shards: {a: 1}\n",
                      "2: replication_log.shards: expected an integer from 1 to 1024, got a mapping");
    expect_load_error("nats:\n  urls: nats://a:4222\n",
                      "2: nats.urls: expected a list of strings (a YAML sequence such as [\"a\", \"b\"]), got "
                      "\"nats://a:4222\"");
    expect_load_error("nats:\n  urls:\n    - nats://a:4222\n    - {b: 1}\n",
                      "4: nats.urls: expected a list of strings, got a mapping in the list");
    expect_load_error("nats:\n  urls: [[nats://a:4222]]\n",
                      "2: nats.urls: expected a list of strings, got a sequence in the list");
    expect_load_error("- db_path\n- node_id\n", "1: expected a mapping of keys at the top level, got a sequence");
    expect_load_error("just text\n", "1: expected a mapping of keys at the top level, got \"just text\"");
    expect_load_error("db_path: a.db\n---\nnode_id: 2\n", "2: expected a single YAML document, found another");
    expect_load_error("x: &a foo\ndb_path: *a\n", "1: x: unknown key");
    expect_load_error("db_path: &a foo\ndata_dir: *a\n",
                      "2: data_dir: expected a string, got an alias (YAML aliases are not supported)");
}
END_TEST

START_TEST(test_error_duplicates)
{
    expect_load_error("db_path: a\nnode_id: 1\ndb_path: b\n", "3: db_path: duplicate key (first set on line 1)");
    expect_load_error("nats:\n  urls: []\n  bind_address: \":4222\"\n  urls: []\n",
                      "4: nats.urls: duplicate key (first set on line 2)");
    expect_load_error("nats:\n  urls: []\nlogging: {}\nnats:\n  seed_file: x\n",
                      "4: nats: duplicate key (first set on line 1)");
    expect_load_error("replication_log.shards: 2\nreplication_log:\n  shards: 3\n",
                      "3: replication_log.shards: duplicate key (first set on line 1)");
}
END_TEST

START_TEST(test_error_syntax)
{
    expect_load_error("db_path: a.db\nnats:\n  urls: [nats://a:4222\nlogging:\n",
                      "4: YAML syntax error: did not find expected ',' or ']'");
    expect_load_error("db_path: a.db\n\tnode_id: 1\n",
                      "2: YAML syntax error: found a tab character that violates indentation");
    expect_load_error("db_path: \"unterminated\n", "2: YAML syntax error: found unexpected end of stream");
    expect_load_error("db_path: b: c\n", "1: YAML syntax error: mapping values are not allowed in this context");
    expect_load_error("db_path: x\n  node_id: 2\n",
                      "2: YAML syntax error: mapping values are not allowed in this context");

    /* invalid UTF-8 and NUL bytes are reader errors, reported at their line */
    hl_config c;
    hl_config_defaults(&c);
    const char *p = write_file("node.yaml", "db_path: a\nnode_id: 1\ndata_dir: \xff\xfe\n", 33);
    ck_assert_int_eq(hl_config_load_file(&c, p, err, sizeof err), HL_ERR_CONFIG);
    char want[600];
    snprintf(want, sizeof want, "%s:3: YAML syntax error: invalid leading UTF-8 octet", p);
    ck_assert_str_eq(err, want);
    p = write_file("node.yaml", "db_path: a\nnode_id: 1\0\n", 23);
    ck_assert_int_eq(hl_config_load_file(&c, p, err, sizeof err), HL_ERR_CONFIG);
    snprintf(want, sizeof want, "%s:2: YAML syntax error: control characters are not allowed", p);
    ck_assert_str_eq(err, want);
    hl_config_free(&c);
}
END_TEST

START_TEST(test_error_io)
{
    hl_config c;
    char path[512], want[700];
    hl_config_defaults(&c);
    snprintf(path, sizeof path, "%s/missing.yaml", tmpdir);
    ck_assert_int_eq(hl_config_load_file(&c, path, err, sizeof err), HL_ERR_IO);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path);
    ck_assert_str_eq(err, want);

    ck_assert_int_eq(hl_config_load_file(&c, tmpdir, err, sizeof err), HL_ERR_IO);
    snprintf(want, sizeof want, "%s: cannot read: Is a directory", tmpdir);
    ck_assert_str_eq(err, want);

    /* a file above the 1 MiB cap */
    size_t big = 1024 * 1024 + 10;
    char *text = malloc(big);
    ck_assert_ptr_nonnull(text);
    memset(text, '#', big);
    char p[512];
    snprintf(p, sizeof p, "%s", write_file("big.yaml", text, big));
    free(text);
    ck_assert_int_eq(hl_config_load_file(&c, p, err, sizeof err), HL_ERR_TOO_LARGE);
    snprintf(want, sizeof want, "%s: file is larger than 1048576 bytes", p);
    ck_assert_str_eq(err, want);

    /* errors are truncated to errlen, and a tiny or missing buffer is fine */
    char small[12];
    ck_assert_int_eq(hl_config_load_file(&c, p, small, sizeof small), HL_ERR_TOO_LARGE);
    ck_assert_uint_eq(strlen(small), sizeof small - 1);
    ck_assert_int_eq(hl_config_load_file(&c, p, NULL, 0), HL_ERR_TOO_LARGE);
    hl_config_free(&c);
}
END_TEST

/* ---- environment and flags -------------------------------------------- */

START_TEST(test_env)
{
    hl_config c;
    char *env[] = {
        E("PATH=/usr/bin"),
        E("HARMONYLITE_DB_PATH=/env/app.db"),
        E("HARMONYLITE_NODE_ID=4"),
        E("HARMONYLITE_REPLICATION_LOG_SHARDS=8"),
        E("HARMONYLITE_NATS_URLS=nats://a:4222, nats://b:4222,,"),
        E("HARMONYLITE_PUBLISH=off"),
        E("HARMONYLITE_LOGGING_FORMAT=Json"),
        E("HARMONYLITE_NATS_USER_PASSWORD=pw"),
        /* Kubernetes service links and other strangers are ignored */
        E("HARMONYLITE_SERVICE_HOST=10.0.0.1"),
        E("HARMONYLITE_PORT_4222_TCP=tcp://10.0.0.1:4222"),
        E("HARMONYLITE_=x"),
        E("HARMONYLITE_db_path=/lower/case/ignored"),
        E("HARMONYLITE_NATS=x"),
        E("HARMONYLITE_CONFIG=/etc/harmonylite.yaml"),
        E("NOEQUALSIGN"),
        NULL,
    };
    hl_config_defaults(&c);
    ck_assert_msg(hl_config_load_env(&c, env, err, sizeof err) == HL_OK, "%s", err);
    ck_assert_str_eq(c.db_path, "/env/app.db");
    ck_assert_uint_eq(c.node_id, 4);
    ck_assert_int_eq(c.replication_log.shards, 8);
    ck_assert_uint_eq(c.nats.urls.n, 2);
    ck_assert_str_eq(c.nats.urls.v[0], "nats://a:4222");
    ck_assert_str_eq(c.nats.urls.v[1], "nats://b:4222");
    ck_assert(!c.publish);
    ck_assert_str_eq(c.logging.format, "json");
    ck_assert_str_eq(c.nats.user_password, "pw");

    /* an empty value empties a list, unsets an optional string, and is "" for a string with a default */
    char *env2[] = {E("HARMONYLITE_NATS_URLS="), E("HARMONYLITE_DB_PATH="), E("HARMONYLITE_HTTP_BIND="), NULL};
    ck_assert_int_eq(hl_config_load_env(&c, env2, err, sizeof err), HL_OK);
    ck_assert_uint_eq(c.nats.urls.n, 0);
    ck_assert_ptr_null(c.db_path);
    ck_assert_str_eq(c.http.bind, "");
    ck_assert_int_eq(hl_config_load_env(&c, NULL, err, sizeof err), HL_OK);
    hl_config_free(&c);
}
END_TEST

START_TEST(test_env_errors)
{
    static const struct {
        const char *env;
        const char *want;
    } cases[] = {
        {"HARMONYLITE_REPLICATION_LOG_SHARDS=abc",
         "env HARMONYLITE_REPLICATION_LOG_SHARDS: replication_log.shards: expected an integer from 1 to 1024, got "
         "\"abc\""},
        {"HARMONYLITE_PUBLISH=maybe", "env HARMONYLITE_PUBLISH: publish: expected true or false, got \"maybe\""},
        {"HARMONYLITE_NODE_ID=", "env HARMONYLITE_NODE_ID: node_id: expected an integer from 0 to 9223372036854775807, "
                                 "got \"\""},
        {"HARMONYLITE_NATS_URLS=nats://a:4222,http://b",
         "env HARMONYLITE_NATS_URLS: nats.urls: expected a URL starting with nats://, tls://, ws:// or wss://, got "
         "\"http://b\""},
        {"HARMONYLITE_NATS_CLUSTER_PEERS=a:6222",
         "env HARMONYLITE_NATS_CLUSTER_PEERS: nats.cluster_peers: expected a URL starting with nats:// or "
         "nats-route://, or a DNS entry dns+srv://_<port-name>._tcp.<service> or dns://<name>:<port>, got "
         "\"a:6222\""},
        {"HARMONYLITE_LOGGING_LEVEL=trace",
         "env HARMONYLITE_LOGGING_LEVEL: logging.level: expected one of debug, info, warn, error, got \"trace\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        hl_config c;
        char *env[] = {(char *)cases[i].env, NULL};
        hl_config_defaults(&c);
        ck_assert_int_eq(hl_config_load_env(&c, env, err, sizeof err), HL_ERR_CONFIG);
        ck_assert_str_eq(err, cases[i].want);
        hl_config_free(&c);
    }

    /* a list longer than 256 entries */
    hl_config c;
    size_t cap = 20 + 300 * 12;
    char *big = malloc(cap), *env[] = {big, NULL};
    ck_assert_ptr_nonnull(big);
    size_t o = (size_t)snprintf(big, cap, "HARMONYLITE_NATS_URLS=");
    for (int i = 0; i < 300; i++)
        o += (size_t)snprintf(big + o, cap - o, "nats://h:%d,", i % 10);
    hl_config_defaults(&c);
    ck_assert_int_eq(hl_config_load_env(&c, env, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "env HARMONYLITE_NATS_URLS: nats.urls: expected at most 256 entries");
    hl_config_free(&c);
    free(big);
}
END_TEST

START_TEST(test_set)
{
    hl_config c;
    hl_config_defaults(&c);
    ck_assert_int_eq(hl_config_set(&c, "node_id", "9", "flag -node-id", err, sizeof err), HL_OK);
    ck_assert_uint_eq(c.node_id, 9);
    ck_assert_int_eq(hl_config_set(&c, "nats.cluster_peers", "nats://a:6222,nats-route://b:6222", "flag -cluster-peers",
                                   err, sizeof err),
                     HL_OK);
    ck_assert_uint_eq(c.nats.cluster_peers.n, 2);
    ck_assert_str_eq(c.nats.cluster_peers.v[1], "nats-route://b:6222");
    ck_assert_int_eq(hl_config_set(&c, "nats.cluster_addr", "0.0.0.0:6222", "flag -cluster-addr", err, sizeof err),
                     HL_OK);
    ck_assert_str_eq(c.nats.cluster_addr, "0.0.0.0:6222");

    ck_assert_int_eq(hl_config_set(&c, "node_id", "x", "flag -node-id", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "flag -node-id: node_id: expected an integer from 0 to 9223372036854775807, got \"x\"");
    ck_assert_uint_eq(c.node_id, 9); /* unchanged by the failed set */
    ck_assert_int_eq(
        hl_config_set(&c, "nats.cluster_peers", "nats://a:6222,bad", "flag -cluster-peers", err, sizeof err),
        HL_ERR_CONFIG);
    ck_assert_uint_eq(c.nats.cluster_peers.n, 2); /* a bad list leaves the old one */
    ck_assert_int_eq(hl_config_set(&c, "nats.urlz", "x", "flag -nats-urlz", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "flag -nats-urlz: nats.urlz: unknown key (did you mean nats.urls?)");
    ck_assert_int_eq(hl_config_set(&c, "nats", "x", NULL, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "nats: unknown key (nats is a section: name one of its keys, such as nats.urls)");
    ck_assert_int_eq(hl_config_set(&c, "publish", "nope", NULL, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "publish: expected true or false, got \"nope\"");
    ck_assert_int_eq(hl_config_set(&c, "publish", NULL, "flag -publish", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "flag -publish: publish: expected a value");
    ck_assert_int_eq(hl_config_set(&c, NULL, "x", NULL, err, sizeof err), HL_ERR_CONFIG);
    hl_config_free(&c);
}
END_TEST

START_TEST(test_precedence)
{
    hl_config c;
    ck_assert_int_eq(load(&c, "db_path: file.db\nnode_id: 1\nreplication_log:\n  shards: 2\n"
                              "nats:\n  urls: [nats://file:4222]\n"),
                     HL_OK);
    char *env[] = {E("HARMONYLITE_NODE_ID=2"), E("HARMONYLITE_REPLICATION_LOG_SHARDS=3"),
                   E("HARMONYLITE_NATS_URLS=nats://env:4222"), NULL};
    ck_assert_int_eq(hl_config_load_env(&c, env, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_set(&c, "replication_log.shards", "4", "flag -replication-log-shards", err, sizeof err),
                     HL_OK);
    ck_assert_str_eq(c.db_path, "file.db");        /* file only */
    ck_assert_uint_eq(c.node_id, 2);               /* env over file */
    ck_assert_int_eq(c.replication_log.shards, 4); /* flag over env over file */
    ck_assert_str_eq(c.nats.urls.v[0], "nats://env:4222");
    ck_assert_uint_eq(c.nats.urls.n, 1);
    hl_config_free(&c);
}
END_TEST

/* ---- finish ----------------------------------------------------------- */

START_TEST(test_node_id_from_hostname)
{
    static const struct {
        const char *host;
        uint64_t id;
    } cases[] = {
        {"harmonylite-0", 1},
        {"harmonylite-2", 3},
        {"db-12", 13},
        {"my-app-db-7", 8},
        {"harmonylite-3.harmonylite.default.svc.cluster.local", 4},
        {"a-999999999999999999", 1000000000000000000ULL},
        {"a-9999999999999999999", 0}, /* too many digits */
        {"harmonylite", 0},
        {"harmonylite-", 0},
        {"harmonylite-01", 0},
        {"harmonylite-0a", 0},
        {"host7", 0},
        {"-3", 0},
        {"3", 0},
        {"", 0},
        {"x.y-3", 0}, /* the ordinal must be in the first label */
        {NULL, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(hl_config_node_id_from_hostname(cases[i].host) == cases[i].id, "%s",
                      cases[i].host ? cases[i].host : "(null)");
}
END_TEST

START_TEST(test_finish)
{
    hl_config c;
    hl_config_defaults(&c);
    ck_assert_int_eq(hl_config_finish_host(&c, "harmonylite-0", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "db_path: required: set db_path, HARMONYLITE_DB_PATH or -db-path");

    ck_assert_int_eq(hl_config_set(&c, "db_path", "/data/app.db", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish_host(&c, "myhost", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "node_id: required: set node_id, HARMONYLITE_NODE_ID or -node-id (host name \"myhost\" "
                          "has no StatefulSet ordinal)");
    ck_assert_int_eq(hl_config_finish_host(&c, NULL, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "node_id: required: set node_id, HARMONYLITE_NODE_ID or -node-id (host name \"\" "
                          "has no StatefulSet ordinal)");

    ck_assert_int_eq(hl_config_finish_host(&c, "harmonylite-2", err, sizeof err), HL_OK);
    ck_assert_str_eq(err, "");
    ck_assert_uint_eq(c.node_id, 3);
    ck_assert_str_eq(c.data_dir, "/data/app.db-harmonylite");
    ck_assert_str_eq(c.logging.level, "info");
    /* finishing twice changes nothing */
    ck_assert_int_eq(hl_config_finish_host(&c, "other-9", err, sizeof err), HL_OK);
    ck_assert_uint_eq(c.node_id, 3);
    ck_assert_str_eq(c.data_dir, "/data/app.db-harmonylite");
    hl_config_free(&c);

    /* an explicit node id is kept whatever the host name; hl_config_finish uses gethostname */
    hl_config_defaults(&c);
    ck_assert_int_eq(hl_config_set(&c, "db_path", "a.db", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_set(&c, "node_id", "5", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_set(&c, "data_dir", "/x", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_OK);
    ck_assert_uint_eq(c.node_id, 5);
    ck_assert_str_eq(c.data_dir, "/x");

    /* cross-field rules name the key and have no file:line */
    ck_assert_int_eq(hl_config_set(&c, "replication_log.chunk_bytes", "1048512", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err,
                     "replication_log.chunk_bytes: must be less than nats.max_payload - 64 (1048512), got 1048512");
    ck_assert_int_eq(hl_config_set(&c, "replication_log.chunk_bytes", "1048511", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_OK);

    ck_assert_int_eq(hl_config_set(&c, "replication_log.max_age", "60", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "replication_log.duplicate_window: must not exceed replication_log.max_age (60) when it is "
                          "set, got 120");
    ck_assert_int_eq(hl_config_set(&c, "replication_log.duplicate_window", "60", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_OK);

    /* incomplete changesets must outlive the duplicate window (0: derived from it) */
    ck_assert_int_eq(hl_config_incomplete_expiry_s(&c), 2 * 60 + 60);
    ck_assert_int_eq(hl_config_set(&c, "replication_log.incomplete_expiry", "60", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "replication_log.incomplete_expiry: must be longer than the duplicate window (60 seconds), "
                          "got 60");
    ck_assert_int_eq(hl_config_set(&c, "replication_log.incomplete_expiry", "61", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_incomplete_expiry_s(&c), 61);
    ck_assert_int_eq(hl_config_set(&c, "replication_log.incomplete_expiry", "0", NULL, err, sizeof err), HL_OK);

    /* values edited directly in the struct are checked too */
    free(c.logging.format);
    c.logging.format = strdup("xml");
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "logging.format: expected one of console, json, got \"xml\"");
    free(c.logging.format);
    c.logging.format = strdup("json");
    free(c.logging.level);
    c.logging.level = strdup("loud");
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, "logging.level: expected one of debug, info, warn, error, got \"loud\"");
    free(c.logging.level);
    c.logging.level = strdup("error");
    ck_assert_int_eq(hl_config_set(&c, "logging.verbose", "true", NULL, err, sizeof err), HL_OK);
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_OK);
    ck_assert_str_eq(c.logging.level, "debug");
    ck_assert_int_eq(hl_config_set(&c, "nats.urls", "nats://a:1", NULL, err, sizeof err), HL_OK);
    free(c.nats.urls.v[0]);
    c.nats.urls.v[0] = strdup("http://a:1");
    ck_assert_int_eq(hl_config_finish(&c, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err,
                     "nats.urls: expected a URL starting with nats://, tls://, ws:// or wss://, got \"http://a:1\"");
    hl_config_free(&c);
}
END_TEST

/* Loads yaml, applies env and one flag (either may be NULL), finishes, and
 * asserts the error is exactly want; "@" in want stands for "<tmpdir>/node.yaml". */
static void expect_finish_error(const char *yaml, const char *envvar, const char *flag_key, const char *flag_val,
                                const char *want)
{
    hl_config c;
    char full[1200], file[512];
    snprintf(file, sizeof file, "%s/node.yaml", tmpdir);
    const char *at = strchr(want, '@');
    if (at)
        snprintf(full, sizeof full, "%.*s%s%s", (int)(at - want), want, file, at + 1);
    else
        snprintf(full, sizeof full, "%s", want);
    ck_assert_msg(load(&c, yaml) == HL_OK, "%s", err);
    char *env[] = {(char *)envvar, NULL};
    ck_assert_msg(hl_config_load_env(&c, env, err, sizeof err) == HL_OK, "%s", err);
    if (flag_key) {
        char origin[96];
        snprintf(origin, sizeof origin, "flag -%s", flag_key);
        ck_assert_msg(hl_config_set(&c, hl_config_flag_path(flag_key), flag_val, origin, err, sizeof err) == HL_OK,
                      "%s", err);
    }
    ck_assert_int_eq(hl_config_finish_host(&c, "harmonylite-0", err, sizeof err), HL_ERR_CONFIG);
    ck_assert_str_eq(err, full);
    hl_config_free(&c);
}

/* Loads yaml and finishes it; asserts both succeed. */
static void expect_workable(const char *yaml)
{
    hl_config c;
    ck_assert_msg(load(&c, yaml) == HL_OK, "%s", err);
    ck_assert_msg(hl_config_finish_host(&c, "harmonylite-0", err, sizeof err) == HL_OK, "%s", err);
    hl_config_free(&c);
}

/* Configurations that parse but cannot work are refused before anything starts. */
START_TEST(test_unworkable)
{
    static const char *hp1 = "expected host:port, [IPv6 address]:port or :port with a port from 1 to 65535, got ";
    static const char *hp0 = "expected host:port, [IPv6 address]:port or :port with a port from 0 to 65535 (\"\" "
                             "disables the listener), got ";
    static const struct {
        const char *yaml, *key, *got;
        int line;
        bool port0;
    } bad[] = {
        {"http:\n  bind: 0.0.0.0:99999\n", "http.bind", "\"0.0.0.0:99999\"", 2, true},
        {"http:\n  bind: 0.0.0.0:http\n", "http.bind", "\"0.0.0.0:http\"", 2, true},
        {"http:\n  bind: \"8080\"\n", "http.bind", "\"8080\"", 2, true},
        {"http:\n  bind: \"0.0.0.0:\"\n", "http.bind", "\"0.0.0.0:\"", 2, true},
        {"http:\n  bind: ::1:8080\n", "http.bind", "\"::1:8080\"", 2, true},
        {"http:\n  bind: \"[::1]8080\"\n", "http.bind", "\"[::1]8080\"", 2, true},
        {"http:\n  bind: \"0.0.0.0:-1\"\n", "http.bind", "\"0.0.0.0:-1\"", 2, true},
        {"nats:\n  bind_address: 0.0.0.0\n", "nats.bind_address", "\"0.0.0.0\"", 2, false},
        {"nats:\n  bind_address: \"\"\n", "nats.bind_address", "\"\"", 2, false},
        {"nats:\n  bind_address: 127.0.0.1:0\n", "nats.bind_address", "\"127.0.0.1:0\"", 2, false},
        {"nats:\n  bind_address: \"host name:4222\"\n", "nats.bind_address", "\"host name:4222\"", 2, false},
        {"nats:\n  cluster_addr: 0.0.0.0\n", "nats.cluster_addr", "\"0.0.0.0\"", 2, false},
        {"nats:\n  cluster_addr: 0.0.0.0:65536\n", "nats.cluster_addr", "\"0.0.0.0:65536\"", 2, false},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char want[512];
        snprintf(want, sizeof want, "%d: %s: %s%s", bad[i].line, bad[i].key, bad[i].port0 ? hp0 : hp1, bad[i].got);
        expect_load_error(bad[i].yaml, want);
    }

    /* the same checks for the environment and flags */
    hl_config c;
    char *env[] = {E("HARMONYLITE_HTTP_BIND=:70000"), NULL};
    hl_config_defaults(&c);
    ck_assert_int_eq(hl_config_load_env(&c, env, err, sizeof err), HL_ERR_CONFIG);
    ck_assert_ptr_nonnull(strstr(err, "env HARMONYLITE_HTTP_BIND: http.bind: expected host:port"));
    ck_assert_int_eq(hl_config_set(&c, "nats.cluster_addr", "6222", "flag -cluster-addr", err, sizeof err),
                     HL_ERR_CONFIG);
    ck_assert_ptr_nonnull(strstr(err, "flag -cluster-addr: nats.cluster_addr: expected host:port"));
    hl_config_free(&c);

    /* forms that work */
    expect_workable("db_path: a.db\nhttp:\n  bind: \"\"\n");
    expect_workable("db_path: a.db\nhttp:\n  bind: 127.0.0.1:0\n");
    expect_workable("db_path: a.db\nhttp:\n  bind: \":8080\"\n");
    expect_workable("db_path: a.db\nhttp:\n  bind: \"[::1]:8080\"\n");
    expect_workable("db_path: a.db\nhttp:\n  bind: localhost:65535\n");
    expect_workable("db_path: a.db\nnats:\n  bind_address: \"[::]:4222\"\n");
    expect_workable("db_path: a.db\nnats:\n  cluster_addr: \"\"\n  cluster_peers: []\n");
    expect_workable("db_path: a.db\nreplication_log:\n  replicas: 3\nnats:\n  cluster_addr: 0.0.0.0:6222\n"
                    "  cluster_peers: [nats://b:6222, nats://c:6222]\n");
    expect_workable("db_path: a.db\nreplication_log:\n  replicas: 2\nnats:\n  cluster_addr: 0.0.0.0:6222\n"
                    "  cluster_peers: [nats://b:6222]\n");
    /* external mode: the number of servers is not known here, and the embedded keys are unused */
    expect_workable("db_path: a.db\nreplication_log:\n  replicas: 5\nnats:\n  urls: [nats://a:4222]\n"
                    "  cluster_addr: 0.0.0.0:6222\n");

    /* more replicas than embedded servers: named where replicas was set */
    static const char *r1 = "replication_log.replicas: must not exceed the number of embedded nats-servers, 1 "
                            "(this node's; a stream cannot have more replicas than servers: add "
                            "nats.cluster_addr and nats.cluster_peers), got 3";
    char want[1024];
    snprintf(want, sizeof want, "@:4: %s", r1);
    expect_finish_error("db_path: a.db\nnode_id: 1\nreplication_log:\n  replicas: 3\n", NULL, NULL, NULL, want);
    snprintf(want, sizeof want, "env HARMONYLITE_REPLICATION_LOG_REPLICAS: %s", r1);
    expect_finish_error("db_path: a.db\n", "HARMONYLITE_REPLICATION_LOG_REPLICAS=3", NULL, NULL, want);
    snprintf(want, sizeof want, "flag -replication-log-replicas: %s", r1);
    expect_finish_error("db_path: a.db\nreplication_log:\n  replicas: 2\n", NULL, "replication-log-replicas", "3",
                        want);
    expect_finish_error("db_path: a.db\nreplication_log:\n  replicas: 3\nnats:\n  cluster_addr: 0.0.0.0:6222\n"
                        "  cluster_peers: [nats://b:6222]\n",
                        NULL, NULL, NULL,
                        "@:3: replication_log.replicas: must not exceed the number of embedded nats-servers, 2 "
                        "(this node's and 1 in nats.cluster_peers; a stream cannot have more replicas than "
                        "servers), got 3");

    /* a cluster listener without routes, routes without a listener */
    expect_finish_error("db_path: a.db\nnats:\n  cluster_addr: 0.0.0.0:6222\n", NULL, NULL, NULL,
                        "@:3: nats.cluster_addr: needs nats.cluster_peers (JetStream clustering needs routes to "
                        "the other servers); leave it unset for a single node");
    expect_finish_error("db_path: a.db\n", NULL, "cluster-addr", "0.0.0.0:6222",
                        "flag -cluster-addr: nats.cluster_addr: needs nats.cluster_peers (JetStream clustering "
                        "needs routes to the other servers); leave it unset for a single node");
    expect_finish_error("db_path: a.db\nnats:\n  cluster_peers:\n    - nats://b:6222\n", NULL, NULL, NULL,
                        "@:4: nats.cluster_peers: needs nats.cluster_addr (routes to the peers are made only from "
                        "a cluster listener)");

    /* NATS credentials that cannot be used as given */
    expect_finish_error("db_path: a.db\nnats:\n  urls: [tls://a:4222]\n  cert_file: /c.pem\n", NULL, NULL, NULL,
                        "@:4: nats.cert_file: needs nats.key_file (the client certificate's private key)");
    expect_finish_error("db_path: a.db\nnats:\n  urls: [tls://a:4222]\n", "HARMONYLITE_NATS_KEY_FILE=/k.pem", NULL,
                        NULL,
                        "env HARMONYLITE_NATS_KEY_FILE: nats.key_file: needs nats.cert_file (the client "
                        "certificate it belongs to)");
    expect_finish_error("db_path: a.db\nnats:\n  urls: [nats://a:4222]\n  creds_file: /u.creds\n", NULL,
                        "nats-seed-file", "/u.seed",
                        "flag -nats-seed-file: nats.seed_file: cannot be used together with nats.creds_file (set "
                        "one of them)");
    expect_workable("db_path: a.db\nnats:\n  urls: [tls://a:4222]\n  cert_file: /c.pem\n  key_file: /k.pem\n"
                    "  creds_file: /u.creds\n");
}
END_TEST

/* ---- dump ------------------------------------------------------------- */

START_TEST(test_snapshot_keys)
{
    hl_config c;
    ck_assert_msg(load(&c, "db_path: a.db\nsnapshot:\n  store: DIR\n  s3_secret_key: wJalrXUtnFEMI\n"
                           "  s3_session_token: tok3n\n  s3_access_key: AKIAEXAMPLE\n") == HL_OK,
                  "%s", err);
    ck_assert_str_eq(c.snapshot.store, "dir");
    ck_assert_int_eq(c.snapshot.keep, 3);
    ck_assert_str_eq(c.snapshot.s3_prefix, "harmonylite/");
    ck_assert_int_eq(c.snapshot.s3_part_size, 64 << 20);
    ck_assert(!c.snapshot.s3_path_style);
    char *text = dump(&c);
    ck_assert_ptr_null(strstr(text, "wJalrXUtnFEMI"));
    ck_assert_ptr_null(strstr(text, "tok3n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  s3_secret_key: \"<redacted>\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  s3_session_token: \"<redacted>\"\n"));
    free(text);
    hl_config_free(&c);
    expect_load_error("snapshot:\n  store: ftp\n",
                      "2: snapshot.store: expected one of s3, dir, sftp, webdav, nats, got \"ftp\"");
    expect_load_error("snapshot:\n  keep: 0\n", "2: snapshot.keep: expected an integer from 1 to 1000, got \"0\"");
}
END_TEST

/* snapshot.interval, snapshot.retention_percent and sleep_timeout (src/snapshot/schedule.c). */
START_TEST(test_schedule_keys)
{
    hl_config c;
    /* defaults: nothing configured, nothing scheduled: no failure every hour */
    ck_assert_msg(load(&c, "db_path: a.db\n") == HL_OK, "%s", err);
    ck_assert_int_eq(c.snapshot.interval_ms, -1);
    ck_assert_int_eq(c.snapshot.retention_percent, 50);
    ck_assert_int_eq(c.sleep_timeout_ms, 0);
    ck_assert_str_eq(c.snapshot.lease_bucket, "harmonylite-snapshot");
    ck_assert(!hl_config_snapshot_store_set(&c));
    ck_assert_int_eq(hl_config_snapshot_interval_ms(&c), 0);
    hl_config_free(&c);
    /* a store with its location: on by default, every hour */
    ck_assert_msg(load(&c, "db_path: a.db\nsnapshot:\n  store: dir\n  dir: /x\n") == HL_OK, "%s", err);
    ck_assert(hl_config_snapshot_store_set(&c));
    ck_assert_int_eq(hl_config_snapshot_interval_ms(&c), 3600000);
    hl_config_free(&c);
    ck_assert_msg(load(&c, "db_path: a.db\nsnapshot:\n  s3_bucket: b\n  interval: 0\n") == HL_OK, "%s", err);
    ck_assert(hl_config_snapshot_store_set(&c));
    ck_assert_int_eq(hl_config_snapshot_interval_ms(&c), 0);
    hl_config_free(&c);
    /* durations: bare digits are milliseconds (HarmonyLite's unit), or with a unit */
    static const struct {
        const char *text;
        int64_t ms;
    } ok[] = {{"1500", 1500},
              {"0", 0},
              {"250ms", 250},
              {"2s", 2000},
              {"5m", 300000},
              {"1h", 3600000},
              {"8760h", INT64_C(31536000000)}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        char y[128];
        snprintf(y, sizeof y, "db_path: a.db\nsleep_timeout: %s\nsnapshot:\n  interval: %s\n", ok[i].text, ok[i].text);
        ck_assert_msg(load(&c, y) == HL_OK, "%s: %s", ok[i].text, err);
        ck_assert_int_eq(c.sleep_timeout_ms, ok[i].ms);
        ck_assert_int_eq(c.snapshot.interval_ms, ok[i].ms);
        /* the dump reads back to the same value */
        char *text = dump(&c);
        hl_config d;
        ck_assert_msg(load(&d, text) == HL_OK, "%s", err);
        ck_assert_int_eq(d.snapshot.interval_ms, ok[i].ms);
        ck_assert_int_eq(d.sleep_timeout_ms, ok[i].ms);
        hl_config_free(&d);
        free(text);
        hl_config_free(&c);
    }
    static const char *const bad[] = {"-1s", "1.5s", "1d", "s", "10 s", "8761h", "99999999999999999999", "1hh"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char y[128], want[300];
        snprintf(y, sizeof y, "snapshot:\n  interval: \"%s\"\n", bad[i]);
        snprintf(want, sizeof want,
                 "2: snapshot.interval: expected auto or a duration: milliseconds, or digits followed by ms, s, m or h "
                 "(e.g. 1h), at most 8760h, got \"%s\"",
                 bad[i]);
        expect_load_error(y, want);
    }
    expect_load_error("snapshot:\n  retention_percent: 101\n",
                      "2: snapshot.retention_percent: expected an integer from 0 to 100, got \"101\"");
    /* asking for snapshots without saying where they go is refused, naming where it was asked */
    expect_finish_error("db_path: a.db\nsnapshot:\n  interval: 10m\n", NULL, NULL, NULL,
                        "@:3: snapshot.interval: expected 0 while the snapshot store has no location (set "
                        "snapshot.dir, snapshot.s3_bucket, snapshot.sftp_url, snapshot.webdav_url or "
                        "snapshot.nats_bucket for snapshot.store s3)");
    expect_finish_error("db_path: a.db\n", "HARMONYLITE_SNAPSHOT_INTERVAL=1h", NULL, NULL,
                        "env HARMONYLITE_SNAPSHOT_INTERVAL: snapshot.interval: expected 0 while the snapshot store "
                        "has no location (set snapshot.dir, snapshot.s3_bucket, snapshot.sftp_url, "
                        "snapshot.webdav_url or snapshot.nats_bucket for snapshot.store s3)");
    expect_workable("db_path: a.db\nsnapshot:\n  interval: 0\n");
    expect_workable("db_path: a.db\nsnapshot:\n  interval: AUTO\n");
    expect_finish_error("db_path: a.db\nsnapshot:\n  lease_bucket: harmonylite-schema\n", NULL, NULL, NULL,
                        "@:3: snapshot.lease_bucket: must differ from schema.registry_bucket (\"harmonylite-schema\"): "
                        "the two buckets have different settings");
    expect_load_error("sleep_timeout: auto\n",
                      "1: sleep_timeout: expected a duration: milliseconds, or digits followed by ms, s, m or h (e.g. "
                      "1h), at most 8760h, got \"auto\"");
    expect_workable("db_path: a.db\nsleep_timeout: 15000\n");
}
END_TEST

START_TEST(test_dump)
{
    hl_config c, d;
    ck_assert_msg(load(&c, "db_path: \"/data/a \\\"q\\\" \\t\\u00e9\\u2028.db\"\nnode_id: 3\n"
                           "nats:\n  urls: [nats://a:4222, nats://b:4222]\n  user_password: hunter2\n"
                           "  user_name: app\nhttp:\n  bind: ''\n") == HL_OK,
                  "%s", err);
    char *text = dump(&c);
    ck_assert_ptr_null(strstr(text, "hunter2"));
    ck_assert_ptr_nonnull(strstr(text, "\n  user_password: \"<redacted>\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  user_name: \"app\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  urls: [\"nats://a:4222\", \"nats://b:4222\"]\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nnode_id: 3\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nreplication_log:\n  shards: 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "\n  seed_file: \"\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nhttp:\n  bind: \"\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "db_path: \"/data/a \\\"q\\\" \\x09\xc3\xa9\\u2028.db\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "# harmonylite effective configuration (file "));

    /* the dump loads back to the same configuration */
    hl_config_defaults(&d);
    const char *p = write_file("dump.yaml", text, strlen(text));
    ck_assert_msg(hl_config_load_file(&d, p, err, sizeof err) == HL_OK, "%s", err);
    ck_assert_str_eq(d.db_path, c.db_path);
    ck_assert_str_eq(d.http.bind, "");
    ck_assert_str_eq(d.nats.user_password, "<redacted>");
    char *a = dump_body(&c), *b = dump_body(&d);
    ck_assert_str_eq(a, b);
    free(a);
    free(b);
    free(text);
    hl_config_free(&c);
    hl_config_free(&d);

    /* an unset password is shown empty, not redacted */
    hl_config_defaults(&c);
    text = dump(&c);
    ck_assert_ptr_nonnull(strstr(text, "\n  user_password: \"\"\n"));
    ck_assert_ptr_nonnull(strstr(text, "# harmonylite effective configuration\n"));
    free(text);
    hl_config_free(&c);
}
END_TEST

/* ---- the example and the docs never rot ------------------------------- */

START_TEST(test_example_file)
{
    hl_config c, d;
    char path[512];
    snprintf(path, sizeof path, "%s/config/harmonylite.yaml", HL_SOURCE_DIR);
    hl_config_defaults(&c);
    ck_assert_msg(hl_config_load_file(&c, path, err, sizeof err) == HL_OK, "%s", err);
    /* it names every key with its default value (db_path has none, so it shows an example) */
    hl_config_defaults(&d);
    ck_assert_int_eq(hl_config_set(&d, "db_path", c.db_path, NULL, err, sizeof err), HL_OK);
    char *a = dump_body(&c), *b = dump_body(&d);
    ck_assert_str_eq(a, b);
    free(a);
    free(b);
    ck_assert_int_eq(hl_config_finish_host(&c, "harmonylite-0", err, sizeof err), HL_OK);
    hl_config_free(&c);
    hl_config_free(&d);

    char *text = read_source("config/harmonylite.yaml");
    for (size_t i = 0; i < hl_config_key_count(); i++) {
        hl_config_key_info k;
        char want[128];
        ck_assert(hl_config_key_at(i, &k));
        const char *dot = strchr(k.path, '.');
        if (dot)
            snprintf(want, sizeof want, "\n  %s: ", dot + 1);
        else
            snprintf(want, sizeof want, "\n%s: ", k.path);
        ck_assert_msg(strstr(text, want) != NULL, "config/harmonylite.yaml lacks %s", k.path);
    }
    free(text);
}
END_TEST

START_TEST(test_docs)
{
    char *text = read_source("docs/configuration.md");
    for (size_t i = 0; i < hl_config_key_count(); i++) {
        hl_config_key_info k;
        char want[128];
        ck_assert(hl_config_key_at(i, &k));
        snprintf(want, sizeof want, "`%s`", k.path);
        ck_assert_msg(strstr(text, want) != NULL, "docs/configuration.md lacks %s", want);
        snprintf(want, sizeof want, "`%s`", k.env);
        ck_assert_msg(strstr(text, want) != NULL, "docs/configuration.md lacks %s", want);
        snprintf(want, sizeof want, "`-%s`", k.flag);
        ck_assert_msg(strstr(text, want) != NULL, "docs/configuration.md lacks %s", want);
    }
    free(text);
}
END_TEST

/* Discovery keys (docs/nats.md): DNS entries, resolver, leaf servers, sync_interval. */
START_TEST(test_discovery_keys)
{
    hl_config c;
    ck_assert_int_eq(load(&c, "nats:\n  cluster_addr: 0.0.0.0:6222\n"
                              "  cluster_peers: [dns+srv://_cluster._tcp.hl.ns.svc.cluster.local, "
                              "'dns://hl-headless:6222', nats://10.0.0.1:6222]\n"
                              "  discovery_interval: 5\n  discovery_resolver: '127.0.0.1:5353,[::1]:53'\n"
                              "  cluster_min_peers: 2\n  leaf_servers: [nats-leaf://hub:7422]\n"
                              "  sync_interval: always\n"),
                     HL_OK);
    ck_assert_uint_eq(c.nats.cluster_peers.n, 3);
    ck_assert_int_eq(c.nats.discovery_interval_s, 5);
    ck_assert_str_eq(c.nats.discovery_resolver, "127.0.0.1:5353,[::1]:53");
    ck_assert_int_eq(c.nats.cluster_min_peers, 2);
    ck_assert_uint_eq(c.nats.leaf_servers.n, 1);
    ck_assert_str_eq(c.nats.sync_interval, "always");
    hl_config_free(&c);
    ck_assert_int_eq(load(&c, "db_path: a.db\n"), HL_OK);
    ck_assert_int_eq(c.nats.discovery_interval_s, 30);
    ck_assert_int_eq(c.nats.cluster_min_peers, 1);
    ck_assert_ptr_null(c.nats.sync_interval);
    hl_config_free(&c);
    ck_assert_str_eq(hl_config_flag_path("-leaf-servers"), "nats.leaf_servers");

    const char *bad_srv[] = {"dns+srv://",
                             "dns+srv://_cluster._tcp",
                             "dns+srv://cluster._tcp.hl",
                             "dns+srv://_cluster.tcp.hl",
                             "dns+srv://_cluster._tcp.h\\\"l",
                             "dns+srv://_c._tcp.-hl",
                             "dns+srv://_c._tcp.a..b"};
    for (size_t i = 0; i < sizeof bad_srv / sizeof bad_srv[0]; i++) {
        char yaml[256];
        snprintf(yaml, sizeof yaml, "nats:\n  cluster_peers: [\"%s\"]\n", bad_srv[i]);
        ck_assert_msg(load(&c, yaml) == HL_ERR_CONFIG, "%s accepted", bad_srv[i]);
        hl_config_free(&c);
    }
    expect_load_error("nats:\n  cluster_peers: ['dns+srv://_cluster._tcp']\n",
                      "2: nats.cluster_peers: expected dns+srv://_<port-name>._tcp.<service> (an SRV name: two '_' "
                      "labels, then a host name), got \"dns+srv://_cluster._tcp\"");
    expect_load_error("nats:\n  cluster_peers: ['dns://hl:0']\n",
                      "2: nats.cluster_peers: expected dns://<host name>:<port> (port 1..65535), got \"dns://hl:0\"");
    const char *bad_a[] = {"dns://hl",       "dns://hl:",   "dns://:6222",   "dns://h l:6222",
                           "dns://hl:65536", "dns://hl:+1", "dns://a_b:6222"};
    for (size_t i = 0; i < sizeof bad_a / sizeof bad_a[0]; i++) {
        char yaml[256];
        snprintf(yaml, sizeof yaml, "nats:\n  cluster_peers: [\"%s\"]\n", bad_a[i]);
        ck_assert_msg(load(&c, yaml) == HL_ERR_CONFIG, "%s accepted", bad_a[i]);
        hl_config_free(&c);
    }
    expect_load_error("nats:\n  discovery_resolver: dns.example:53\n",
                      "2: nats.discovery_resolver: expected DNS server addresses, ip[:port] or [ipv6]:port, "
                      "separated by ',', got \"dns.example:53\"");
    expect_load_error("nats:\n  discovery_resolver: '127.0.0.1:0'\n",
                      "2: nats.discovery_resolver: expected DNS server addresses, ip[:port] or [ipv6]:port, "
                      "separated by ',', got \"127.0.0.1:0\"");
    expect_load_error("nats:\n  discovery_interval: 0\n",
                      "2: nats.discovery_interval: expected an integer from 1 to 86400, got \"0\"");
    expect_load_error("nats:\n  cluster_min_peers: -1\n",
                      "2: nats.cluster_min_peers: expected an integer from 0 to 1024, got \"-1\"");
    expect_load_error("nats:\n  leaf_servers: [http://hub:7422]\n",
                      "2: nats.leaf_servers: expected a URL starting with nats-leaf://, nats://, tls://, ws:// or "
                      "wss://, got \"http://hub:7422\"");
    expect_load_error("nats:\n  sync_interval: sometimes\n",
                      "2: nats.sync_interval: expected always, or a positive duration: digits followed by ms, s, m "
                      "or h (e.g. 10s), got \"sometimes\"");
    expect_load_error("schema:\n  registry_bucket: KV.registry\n",
                      "2: schema.registry_bucket: expected a bucket name of 1 to 64 letters, digits, '_' or '-', "
                      "got \"KV.registry\"");
    expect_load_error("schema:\n  heartbeat: 0\n",
                      "2: schema.heartbeat: expected an integer from 1 to 3600, got \"0\"");
    expect_load_error("schema:\n  max_held_bytes: 1000\n",
                      "2: schema.max_held_bytes: expected an integer from 1048576 to 1099511627776, got \"1000\"");
    expect_load_error("nats:\n  sync_interval: 0s\n",
                      "2: nats.sync_interval: expected always, or a positive duration: digits followed by ms, s, m "
                      "or h (e.g. 10s), got \"0s\"");

    /* With DNS entries the number of servers is known only at runtime. */
    expect_workable("db_path: a.db\nreplication_log:\n  replicas: 3\nnats:\n  cluster_addr: 0.0.0.0:6222\n"
                    "  cluster_peers: [dns+srv://_cluster._tcp.hl]\n");
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_defaults);
    tcase_add_test(tc, test_key_table);
    tcase_add_test(tc, test_empty_files);
    tcase_add_test(tc, test_full_file);
    tcase_add_test(tc, test_yaml_forms);
    tcase_add_test(tc, test_error_types);
    tcase_add_test(tc, test_error_unknown_keys);
    tcase_add_test(tc, test_error_structure);
    tcase_add_test(tc, test_error_duplicates);
    tcase_add_test(tc, test_error_syntax);
    tcase_add_test(tc, test_error_io);
    tcase_add_test(tc, test_env);
    tcase_add_test(tc, test_env_errors);
    tcase_add_test(tc, test_set);
    tcase_add_test(tc, test_precedence);
    tcase_add_test(tc, test_node_id_from_hostname);
    tcase_add_test(tc, test_finish);
    tcase_add_test(tc, test_unworkable);
    tcase_add_test(tc, test_dump);
    tcase_add_test(tc, test_snapshot_keys);
    tcase_add_test(tc, test_schedule_keys);
    tcase_add_test(tc, test_example_file);
    tcase_add_test(tc, test_docs);
    tcase_add_test(tc, test_discovery_keys);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(config_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
