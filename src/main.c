/*
 * main.c - flags and wiring only; the work is in engine.c.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "common/log.h"
#include "config/config.h"
#include "db/db.h"
#include "engine.h"
#include "natsio/conn.h"
#include "registry/registry.h"
#include "snapshot/schedule.h"
#include "snapshot/snapshot.h"

extern char **environ;

static const char usage[] =
    "Usage: harmonylite [options]\n"
    "\n"
    "Leaderless, eventually consistent replication for SQLite through NATS JetStream.\n"
    "Runs beside an application that uses the SQLite file at db_path: captures every\n"
    "committed change with triggers, publishes it, and applies the other nodes' changes.\n"
    "\n"
    "Options (each also accepted with --, and as -flag=value):\n"
    "  -config FILE          YAML configuration file (see config/harmonylite.yaml)\n"
    "  -node-id N            this node's id, >= 1 (overrides node_id)\n"
    "  -cluster-addr H:P     embedded nats-server cluster listener (nats.cluster_addr)\n"
    "  -cluster-peers URLS   comma-separated nats://host:port routes to the other nodes, or\n"
    "                        DNS names to discover them: dns+srv://_cluster._tcp.<service>,\n"
    "                        dns://<name>:<port> (nats.cluster_peers; docs/nats.md)\n"
    "  -leaf-servers URLS    comma-separated URLs the embedded nats-server connects to as a\n"
    "                        leaf node (nats.leaf_servers)\n"
    "  -check-config         validate the configuration without touching the database, print\n"
    "                        the effective settings (secrets redacted) and exit: 0 valid, 2 not\n"
    "  -cleanup              remove every trigger and table harmonylite created in db_path\n"
    "                        and exit; application tables and rows are left untouched\n"
    "  -drop-held ORIGIN     drop every changeset held for origin node ORIGIN (listed under\n"
    "                        \"held\" in /schema) so its next changesets apply, print how many\n"
    "                        and exit; safe beside the running node (docs/operations.md)\n"
    "  -save-snapshot        take a snapshot of db_path now, upload it to the snapshot store\n"
    "                        (snapshot.*), print where it went and exit; non-zero on failure\n"
    "  -restore              before the application starts (an init container): when db_path\n"
    "                        is missing or empty, download the newest snapshot that verifies\n"
    "                        and put it in place; a database with data is left alone; no\n"
    "                        snapshot at all is not an error (docs/snapshots.md)\n"
    "  -force                with -restore: replace db_path even when it has data\n"
    "  -schema-status        print this node's schema (hash, previous hash, tables) and the\n"
    "                        changesets it holds per origin, from db_path alone, and exit\n"
    "  -schema-status-cluster\n"
    "                        print every live node of the schema registry grouped by schema\n"
    "                        and the verdict: consistent, upgrading (exit 0) or incompatible\n"
    "                        (exit 1; also when the registry cannot be read)\n"
    "  -json                 with -schema-status[-cluster]: print JSON instead\n"
    "  -version              print the version and exit\n"
    "  -help                 print this help and exit\n"
    "  -<key> VALUE          any configuration key as a flag: the dotted path with '.' and\n"
    "                        '_' written as '-', e.g. -db-path /data/app.db,\n"
    "                        -replication-log-shards 4, -logging-format json\n"
    "\n"
    "Configuration is read from the YAML file, then HARMONYLITE_* environment variables\n"
    "(the key path upper-cased with '.' as '_', e.g. HARMONYLITE_NODE_ID,\n"
    "HARMONYLITE_REPLICATION_LOG_SHARDS, HARMONYLITE_NATS_URLS=nats://a:4222,nats://b:4222),\n"
    "then flags; each overrides the one before. Without nats.urls harmonylite starts and\n"
    "supervises its own nats-server (embedded mode).\n"
    "\n"
    "Signals: SIGTERM/SIGINT stop gracefully (a second one exits at once); SIGHUP reloads.\n"
    "Exit status: 0 success, 1 runtime error, 2 usage or configuration error (also with\n"
    "-check-config).\n"
    "Documentation: docs/configuration.md, docs/operations.md, docs/protocol.md.\n";

/* Action flags; every configuration key is a flag too (see hl_config_flag_path). */
static const char *const actions[] = {
    "config",        "check-config",          "cleanup", "drop-held", "save-snapshot", "restore", "force",
    "schema-status", "schema-status-cluster", "json",    "version",   "help",          "h"};

/* What the command line asked for; kept so SIGHUP can reload the same way. */
static const char *config_path;
static const char *sets[64][3]; /* key, value, the flag as given */
static size_t nsets;

/* Defaults, then the file, the environment and the flags, then derived values. */
static hl_status load_config(hl_config *c, char *err, size_t errlen)
{
    hl_status st;
    if (config_path && (st = hl_config_load_file(c, config_path, err, errlen)))
        return st;
    if ((st = hl_config_load_env(c, environ, err, errlen)))
        return st;
    for (size_t i = 0; i < nsets; i++) {
        char origin[160];
        const char *f = sets[i][2];
        size_t fl = strcspn(f, "=");
        snprintf(origin, sizeof origin, "flag %.*s", (int)fl, f);
        if ((st = hl_config_set(c, sets[i][0], sets[i][1], origin, err, errlen)))
            return st;
    }
    return hl_config_finish(c, err, errlen);
}

/* -drop-held: one short write transaction beside the running node. */
static int run_drop_held(const hl_config *c, uint64_t origin)
{
    hl_db *d = NULL;
    uint64_t dropped = 0;
    hl_status st = hl_db_open(&d, c->db_path, c->node_id, 0);
    if (!st)
        st = hl_db_drop_held(d, origin, &dropped);
    hl_db_close(d);
    if (st) {
        fprintf(stderr, "harmonylite: -drop-held %llu: %s\n", (unsigned long long)origin, hl_status_str(st));
        return 1;
    }
    if (dropped)
        printf("dropped %llu changesets held for node %llu; its next changesets apply\n", (unsigned long long)dropped,
               (unsigned long long)origin);
    else
        printf("no changesets were held for node %llu\n", (unsigned long long)origin);
    return 0;
}

/* -save-snapshot: exit 0 and print where it went, 1 on failure, 2 on a configuration error. */
static int run_save_snapshot(const hl_config *c)
{
    char where[1024], err[1024], mname[HL_SNAPSHOT_NAME_MAX + 1];
    hl_manifest m;
    hl_status st = hl_snapshot_save_manifest(c, &m, mname, where, sizeof where, err, sizeof err);
    if (!st && hl_sched_wanted(c)) {
        /* The schedulers start their interval from it (docs/snapshots.md, "Periodic snapshots"). */
        hl_status rst = hl_sched_record(c, &m, mname);
        if (rst)
            hl_log(HL_LOG_WARN, "snapshot saved but not recorded in the lease bucket (NATS not reachable?)", "bucket",
                   c->snapshot.lease_bucket, "error", hl_status_str(rst), NULL);
    }
    hl_manifest_free(&m);
    hl_nats_shutdown(5000); /* the nats store's or the record's connection, if one was made */
    if (st) {
        fprintf(stderr, "harmonylite: -save-snapshot: %s\n", err);
        return st == HL_ERR_CONFIG ? 2 : 1;
    }
    printf("snapshot saved to %s\n", where);
    return 0;
}

/* -restore [-force]: 0 when restored, left alone or nothing to restore; 1 on failure. */
static int run_restore(const hl_config *c, bool force)
{
    char info[1024], err[1024];
    hl_restore_result res;
    hl_status st = hl_snapshot_restore(c, force, &res, info, sizeof info, err, sizeof err);
    hl_nats_shutdown(5000); /* the nats store's connection, if it was used */
    if (st) {
        fprintf(stderr, "harmonylite: -restore: %s\n", err);
        return st == HL_ERR_CONFIG ? 2 : 1;
    }
    hl_log(HL_LOG_INFO, res == HL_RESTORE_DONE ? "restore: done" : "restore: nothing to do", "detail", info, NULL);
    printf("%s\n", info);
    return 0;
}

/* The actions the command line asked for (the configuration flags go to sets). */
typedef struct cmdline {
    bool check, cleanup, save_snapshot, restore, force, json;
    int schema_status;  /* 1: -schema-status, 2: -schema-status-cluster (registry.h) */
    uint64_t drop_held; /* 0 when -drop-held was not given */
} cmdline;

/* -drop-held's value: a node id from 1 to INT64_MAX. Returns 0, or 2 after
 * saying what was wrong. */
static int parse_origin(const char *val, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(val, &end, 10);
    if (!val[0] || *end || errno || v == 0 || v > INT64_MAX || val[0] == '-') {
        fprintf(stderr, "harmonylite: -drop-held: expected a node id from 1 to %lld, got \"%s\"\n",
                (long long)INT64_MAX, val);
        return 2;
    }
    *out = (uint64_t)v;
    return 0;
}

/* Records one flag (name without dashes; key is its configuration key or NULL
 * for an action; given is the flag as written). Returns -1 to go on, or the
 * exit status: 0 after -help and -version, 2 on a bad flag. */
static int take_flag(cmdline *o, const char *name, const char *key, const char *val, const char *given)
{
    if (strcmp(name, "help") == 0 || strcmp(name, "h") == 0) {
        fputs(usage, stdout);
        return 0;
    }
    if (strcmp(name, "version") == 0) {
        printf("harmonylite %s\n", HL_VERSION);
        return 0;
    }
    if (strcmp(name, "config") == 0) {
        config_path = val;
    } else if (strcmp(name, "check-config") == 0) {
        o->check = true;
    } else if (strcmp(name, "cleanup") == 0) {
        o->cleanup = true;
    } else if (strcmp(name, "save-snapshot") == 0) {
        o->save_snapshot = true;
    } else if (strcmp(name, "restore") == 0) {
        o->restore = true;
    } else if (strcmp(name, "force") == 0) {
        o->force = true;
    } else if (strcmp(name, "schema-status") == 0 || strcmp(name, "schema-status-cluster") == 0) {
        o->schema_status = strcmp(name, "schema-status") == 0 ? 1 : 2;
    } else if (strcmp(name, "json") == 0) {
        o->json = true;
    } else if (strcmp(name, "drop-held") == 0) {
        if (parse_origin(val, &o->drop_held))
            return 2;
    } else {
        if (nsets == sizeof sets / sizeof sets[0]) {
            fprintf(stderr, "harmonylite: too many flags\n");
            return 2;
        }
        sets[nsets][0] = key;
        sets[nsets][1] = val;
        sets[nsets][2] = given;
        nsets++;
    }
    return -1;
}

/* Parses the command line into o and sets. Returns -1 to go on, or the exit
 * status (2 on a usage error, said on stderr). */
static int parse_args(int argc, char **argv, cmdline *o)
{
    for (int i = 1; i < argc; i++) {
        const char *given = argv[i], *a = argv[i];
        if (a[0] != '-') {
            fprintf(stderr, "harmonylite: unexpected argument \"%s\" (see -help)\n", a);
            return 2;
        }
        a += a[1] == '-' ? 2 : 1;
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a) : strlen(a);
        char name[128];
        if (nl == 0 || nl >= sizeof name) {
            fprintf(stderr, "harmonylite: unknown flag \"%s\" (see -help)\n", argv[i]);
            return 2;
        }
        memcpy(name, a, nl);
        name[nl] = 0;
        bool is_action = false;
        for (size_t k = 0; k < sizeof actions / sizeof actions[0]; k++)
            is_action |= strcmp(actions[k], name) == 0;
        const char *key = is_action ? NULL : hl_config_flag_path(name);
        if (!is_action && !key) {
            fprintf(stderr, "harmonylite: unknown flag \"%s\" (see -help)\n", argv[i]);
            return 2;
        }
        const char *val = NULL;
        if (key || strcmp(name, "config") == 0 || strcmp(name, "drop-held") == 0) {
            if (eq)
                val = eq + 1;
            else if (i + 1 < argc)
                val = argv[++i];
            else {
                fprintf(stderr, "harmonylite: flag -%s needs a value\n", name);
                return 2;
            }
        } else if (eq) {
            fprintf(stderr, "harmonylite: flag -%s takes no value\n", name);
            return 2;
        }
        int rc = take_flag(o, name, key, val, given);
        if (rc >= 0)
            return rc;
    }
    if (o->force && !o->restore) {
        fprintf(stderr, "harmonylite: -force only goes with -restore\n");
        return 2;
    }
    if (o->json && !o->schema_status) {
        fprintf(stderr, "harmonylite: -json goes with -schema-status or -schema-status-cluster\n");
        return 2;
    }
    if (o->save_snapshot && o->restore) {
        fprintf(stderr, "harmonylite: -save-snapshot and -restore: give one of them\n");
        return 2;
    }
    return -1;
}

/* Runs what the command line asked for with the loaded configuration: one
 * action, or the node until it is stopped. Returns the exit status. */
static int run(hl_config *c, const cmdline *o)
{
    if (o->check) {
        /* The effective configuration, secrets redacted, then the verdict. */
        hl_config_dump(c, stdout);
        fprintf(stderr, "%s: configuration is valid\n", config_path ? config_path : "(defaults and environment)");
        return 0;
    }
    if (o->drop_held)
        return run_drop_held(c, o->drop_held);
    if (o->schema_status)
        return o->schema_status == 1 ? hl_schema_status_local(c, o->json) : hl_schema_status_cluster(c, o->json);
    if (o->save_snapshot)
        return run_save_snapshot(c);
    if (o->restore)
        return run_restore(c, o->force);
    if (o->cleanup)
        return hl_db_cleanup(c->db_path) == HL_OK ? 0 : 1;
    return hl_engine_run(c, load_config);
}

/*
 * glibc gives freed memory at the top of a heap back to the kernel once more
 * than a threshold (128 KiB, raised dynamically) is free there. A receiver
 * decodes each changeset in the fetcher thread (a block per row) and frees it
 * in the engine thread once applied, so every changeset's memory went back
 * to the kernel and came back as fresh pages, zeroed on a page fault each:
 * 7 - 11 % of a receiver's CPU under a write burst (docs/performance.md, (b)).
 * Keep up to 16 MiB free for reuse; allocations of 4 MiB and more (large
 * payloads) are mapped on their own and unmapped when freed. One arena for
 * all threads: malloc_trim, run when the engine has been idle a while
 * (hl_db_release_memory), returns the free top of the main arena only, so
 * memory kept in another thread's arena would stay resident at rest.
 */
static void tune_malloc(void)
{
#ifdef __GLIBC__
    mallopt(M_ARENA_MAX, 1);
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    mallopt(M_TRIM_THRESHOLD, 16 << 20);
#endif
}

int main(int argc, char **argv)
{
    tune_malloc();
    hl_db_global_init();
    cmdline o = {0};
    char err[1024];
    hl_config c;

    int rc = parse_args(argc, argv, &o);
    if (rc >= 0)
        return rc;
    hl_config_defaults(&c);
    err[0] = 0;
    if (load_config(&c, err, sizeof err)) {
        fprintf(stderr, "harmonylite: %s\n", err);
        hl_config_free(&c);
        return 2;
    }
    int level = c.logging.verbose ? HL_LOG_DEBUG : hl_log_parse_level(c.logging.level);
    hl_log_setup(level < 0 ? HL_LOG_INFO : (hl_log_level)level, strcmp(c.logging.format, "json") == 0, c.node_id);
    rc = run(&c, &o);
    hl_config_free(&c);
    return rc;
}
