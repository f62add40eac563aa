/*
 * config.h - harmonylite configuration: YAML file, then HARMONYLITE_* environment,
 * then command-line flags (each overriding the previous).
 *
 * Every key is described once in the key table in config.c; the YAML loader,
 * the environment mapping, the docs and `-check-config` all derive from it.
 */
#ifndef HL_CONFIG_H
#define HL_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/status.h"

typedef struct hl_strlist {
    char **v; /* owned strings */
    size_t n;
} hl_strlist;

typedef struct hl_config {
    char *config_path; /* the YAML file read, or NULL */
    char **origins;    /* per key (table order): where it was last set ("file:line", "env HARMONYLITE_X",
                          "flag -x"), NULL when never set; for error messages, kept by config.c */

    char *db_path;                 /* db_path: the application's SQLite file (required) */
    uint64_t node_id;              /* node_id: >= 1; default: StatefulSet ordinal of the host name + 1 */
    char *data_dir;                /* data_dir: harmonylite's own files (nats store, generated config);
                                      default "<db_path>-harmonylite" */
    bool publish;                  /* publish: send local changes (default true) */
    bool replicate;                /* replicate: apply remote changes (default true) */
    int scan_max_changes;          /* scan_max_changes: accepted for HarmonyLite configs; no effect */
    int polling_interval_ms;       /* polling_interval: fallback poll of the db, ms (default 1000; 0 = inotify only) */
    int cleanup_interval_ms;       /* cleanup_interval: accepted for compatibility, ignored (default 5000) */
    int64_t tombstone_retention_s; /* tombstone_retention: seconds to keep delete tombstones (default 7 days) */
    int64_t max_clock_drift_s;     /* max_clock_drift: seconds a remote version may be ahead (default 60) */
    int shutdown_grace_s;          /* shutdown_grace: seconds to flush the outbox on SIGTERM (default 10) */
    int order_hold_timeout_s;      /* order_hold_timeout: seconds before a missing predecessor is given up on (60) */
    int stall_timeout_s;           /* stall_timeout: seconds of failing engine transactions before not ready (30) */
    int apply_batch_rows;          /* apply_batch_rows: rows applied per SQLite transaction (default 10000) */
    int64_t cache_size_kib;        /* cache_size: engine connection page cache in KiB (default 32768) */
    int64_t wal_size_limit;        /* wal_size_limit: bytes of -wal file before checkpoints truncate it (64 MiB) */
    /* sleep_timeout (docs/snapshots.md#sleep_timeout) */
    int64_t sleep_timeout_ms; /* sleep_timeout: ms without a change before a snapshot and exit 0 (0: off) */

    struct {
        int shards;                  /* replication_log.shards (default 1) */
        int64_t max_entries;         /* replication_log.max_entries (default 1048576) */
        int replicas;                /* replication_log.replicas (default 1) */
        bool compress;               /* replication_log.compress (default true) */
        int64_t max_bytes;           /* replication_log.max_bytes: stream byte limit, -1 unlimited (default -1) */
        int64_t max_age_s;           /* replication_log.max_age: seconds, 0 unlimited (default 0) */
        int chunk_bytes;             /* replication_log.chunk_bytes: max payload per message (default 524288) */
        int64_t max_changeset_bytes; /* replication_log.max_changeset_bytes: reject larger (default 268435456) */
        int duplicate_window_s;      /* replication_log.duplicate_window: seconds (default 120) */
        int64_t incomplete_expiry_s; /* replication_log.incomplete_expiry: seconds, 0 derived (default 0) */
        bool update_existing;        /* replication_log.update_existing: update stream config if it differs */
    } replication_log;

    struct {
        hl_strlist urls;            /* nats.urls: external servers; empty = embedded mode */
        char *bind_address;         /* nats.bind_address: embedded client listener (default "127.0.0.1:4222") */
        char *subject_prefix;       /* nats.subject_prefix (default "harmonylite-change-log") */
        char *stream_prefix;        /* nats.stream_prefix (default "harmonylite-changes") */
        char *server_config;        /* nats.server_config: include this file in the generated nats-server config */
        char *server_bin;           /* nats.server_bin: nats-server executable (default "nats-server" on PATH) */
        char *cluster_name;         /* nats.cluster_name (default "harmonylite") */
        char *cluster_addr;         /* nats.cluster_addr / -cluster-addr: embedded cluster listener, host:port */
        hl_strlist cluster_peers;   /* nats.cluster_peers / -cluster-peers: nats://host:port route URLs */
        char *user_name;            /* nats.user_name */
        char *user_password;        /* nats.user_password (secret: never logged) */
        char *seed_file;            /* nats.seed_file: NKey seed file */
        char *creds_file;           /* nats.creds_file: JWT credentials file */
        char *ca_file;              /* nats.ca_file */
        char *cert_file;            /* nats.cert_file */
        char *key_file;             /* nats.key_file */
        int connect_retries;        /* nats.connect_retries (default 5; -1 forever) */
        int reconnect_wait_seconds; /* nats.reconnect_wait_seconds (default 2) */
        int max_payload;            /* nats.max_payload: embedded server max_payload bytes (default 1048576) */
        hl_strlist leaf_servers;    /* nats.leaf_servers / -leaf-servers: leaf remotes of the embedded server */
        int discovery_interval_s;   /* nats.discovery_interval: seconds between DNS lookups (default 30) */
        char *discovery_resolver;   /* nats.discovery_resolver: DNS server(s) "ip[:port],..." (default: system) */
        int cluster_min_peers;      /* nats.cluster_min_peers: peers known before nats-server starts (default 1) */
        char *sync_interval;        /* nats.sync_interval: JetStream fsync, "always" or a duration */
        char *reader_user;          /* nats.reader_user: embedded server's read-only user */
        char *reader_password;      /* nats.reader_password: plain or bcrypt (secret) */
        char *cluster_user;         /* nats.cluster_user: user routes authenticate with */
        char *cluster_password;     /* nats.cluster_password: route shared secret (secret) */
        char *server_cert_file;     /* nats.server_cert_file: embedded server's certificate (routes, leafs) */
        char *server_key_file;      /* nats.server_key_file */
        char *server_ca_file;       /* nats.server_ca_file: CA verifying route peers' certificates */
        char *client_tls;           /* nats.client_tls: "off", "on" or "verify" (client port TLS) */
    } nats;

    struct {
        bool verbose; /* logging.verbose: debug level */
        char *format; /* logging.format: "console" | "json" */
        char *level;  /* logging.level: "debug" | "info" | "warn" | "error" (default "info") */
    } logging;

    struct {
        char *registry_bucket;  /* schema.registry_bucket: NATS KV bucket of the schema registry */
        int heartbeat_s;        /* schema.heartbeat: seconds between registry heartbeats (entries expire after 3) */
        int64_t max_held_bytes; /* schema.max_held_bytes: held changesets, per origin and in total (bytes) */
    } schema;

    struct {
        char
            *bind; /* http.bind: listener for /healthz /readyz /metrics /schema (default "0.0.0.0:8080"; "" disables) */
        char *auth_token_file;          /* http.auth_token_file: bearer token for /metrics and /schema */
        int request_timeout_s;          /* http.request_timeout: hard per-request deadline, seconds (default 10) */
        int max_connections;            /* http.max_connections: open at once (default 1024) */
        int max_connections_per_client; /* http.max_connections_per_client: per client address (default 16) */
    } http;

    /* snapshot.*: where -save-snapshot puts snapshots and -restore takes them from (docs/snapshots.md) */
    struct {
        char *store;               /* snapshot.store: "s3" (default), "dir", "sftp" or "webdav" */
        int keep;                  /* snapshot.keep: newest snapshots kept (default 3) */
        char *dir;                 /* snapshot.dir: directory of the dir store */
        char *s3_endpoint;         /* snapshot.s3_endpoint: URL; default https://s3.<region>.amazonaws.com */
        char *s3_region;           /* snapshot.s3_region: default $AWS_REGION, else us-east-1 */
        char *s3_bucket;           /* snapshot.s3_bucket (required for s3) */
        char *s3_prefix;           /* snapshot.s3_prefix: key prefix (default "harmonylite/") */
        bool s3_path_style;        /* snapshot.s3_path_style: endpoint/bucket/key instead of bucket.endpoint */
        char *s3_access_key;       /* snapshot.s3_access_key: default $AWS_ACCESS_KEY_ID */
        char *s3_secret_key;       /* snapshot.s3_secret_key (secret): default $AWS_SECRET_ACCESS_KEY */
        char *s3_session_token;    /* snapshot.s3_session_token (secret): default $AWS_SESSION_TOKEN */
        char *s3_ca_file;          /* snapshot.s3_ca_file: CA certificates (PEM) for https endpoints */
        int64_t s3_part_size;      /* snapshot.s3_part_size: larger objects go up in parts of this size */
        char *sftp_url;            /* snapshot.sftp_url: sftp://host[:port]/directory */
        char *sftp_user;           /* snapshot.sftp_user: default $USER, else the process's user */
        char *sftp_password;       /* snapshot.sftp_password (secret) */
        char *sftp_key_file;       /* snapshot.sftp_key_file: private key (OpenSSH PEM) */
        char *sftp_key_passphrase; /* snapshot.sftp_key_passphrase (secret): of an encrypted key */
        char *sftp_known_hosts;    /* snapshot.sftp_known_hosts: default ~/.ssh/known_hosts */
        char *webdav_url;          /* snapshot.webdav_url: http(s)://host[:port]/collection/ */
        char *webdav_user;         /* snapshot.webdav_user */
        char *webdav_password;     /* snapshot.webdav_password (secret) */
        char *webdav_ca_file;      /* snapshot.webdav_ca_file: CA certificates (PEM) for https */
        char *nats_bucket;         /* snapshot.nats_bucket: object store bucket of the nats store */
        int nats_replicas;         /* snapshot.nats_replicas: 0 = replication_log.replicas */
        /* periodic snapshots (src/snapshot/schedule.c, docs/snapshots.md#periodic-snapshots) */
        int64_t interval_ms;   /* snapshot.interval: ms between the cluster's snapshots (0: off; -1: auto, the
                                  default); use hl_config_snapshot_interval_ms() */
        int retention_percent; /* snapshot.retention_percent: snapshot early once a stream advanced this share
                                  of replication_log.max_entries (default 50; 0: interval only) */
        char *lease_bucket;    /* snapshot.lease_bucket: NATS KV bucket of the lease and the last snapshot */
    } snapshot;
} hl_config;

/* Fills c with defaults. Never fails. */
void hl_config_defaults(hl_config *c);

/*
 * Reads the YAML file at path into c (c must hold defaults). On error writes
 * "path:line: key: what was expected" to err (NUL-terminated, truncated to
 * errlen) and returns HL_ERR_CONFIG. Unknown keys and wrong types are errors.
 */
hl_status hl_config_load_file(hl_config *c, const char *path, char *err, size_t errlen);

/*
 * Applies HARMONYLITE_<PATH> environment variables (path upper-cased, '.' -> '_',
 * e.g. HARMONYLITE_REPLICATION_LOG_SHARDS, HARMONYLITE_NATS_URLS as a comma list).
 * envp is a NULL-terminated "NAME=value" array (pass `environ`). Unknown
 * HARMONYLITE_* names are ignored (Kubernetes injects HARMONYLITE_SERVICE_HOST
 * and friends for a Service named harmonylite). Errors as above with
 * "env HARMONYLITE_X: ..." instead of file:line.
 */
hl_status hl_config_load_env(hl_config *c, char *const *envp, char *err, size_t errlen);

/*
 * Sets one key by its dotted path ("nats.cluster_addr") from a string, as a flag
 * would. origin names the source for error messages (e.g. "flag -node-id").
 */
hl_status hl_config_set(hl_config *c, const char *path, const char *value, const char *origin, char *err,
                        size_t errlen);

/*
 * Fills derived defaults (node_id from host name ordinal, data_dir from db_path)
 * and checks cross-field rules (db_path set, shards >= 1, ...). Errors as above.
 */
hl_status hl_config_finish(hl_config *c, char *err, size_t errlen);

/* Frees every owned string. NULL is a no-op. */
void hl_config_free(hl_config *c);

/* Writes every key with its effective value as YAML to f; secrets as "<redacted>". */
void hl_config_dump(const hl_config *c, FILE *f);

/* The stream's duplicate window in seconds as harmonylite creates streams:
 * duplicate_window (0 means 120), at most max_age when that is set. */
int hl_config_duplicate_window_s(const hl_config *c);
/* Seconds a partly received changeset waits for its missing parts:
 * incomplete_expiry, or when 0 twice the duplicate window + 60 (always longer
 * than the window; docs/architecture.md says why). */
int64_t hl_config_incomplete_expiry_s(const hl_config *c);
/* nats.client_tls as a value (off when unset); the key's values are checked
 * when the configuration loads. Inline: code built without config.c (the
 * fuzz targets) uses it too. */
typedef enum { HL_CLIENT_TLS_OFF, HL_CLIENT_TLS_ON, HL_CLIENT_TLS_VERIFY } hl_client_tls;
static inline hl_client_tls hl_config_client_tls(const hl_config *c)
{
    const char *v = c->nats.client_tls;
    return !v || !*v || strcmp(v, "off") == 0 ? HL_CLIENT_TLS_OFF
           : strcmp(v, "verify") == 0         ? HL_CLIENT_TLS_VERIFY
                                              : HL_CLIENT_TLS_ON;
}
/* Whether the chosen snapshot.store has its location set (dir, s3_bucket,
 * sftp_url or webdav_url): periodic snapshots are on by default only then. */
bool hl_config_snapshot_store_set(const hl_config *c);
/* The effective snapshot.interval in ms: as set, or for auto (the default)
 * 1 h when the store is set (hl_config_snapshot_store_set), else 0 (off). */
int64_t hl_config_snapshot_interval_ms(const hl_config *c);

/*
 * Key introspection, for main's flag parser, `-check-config`, the docs and the
 * tests. Every key has a flag "-<path with '.' and '_' as '-'>" (-node-id,
 * -replication-log-shards, -nats-cluster-addr) and an environment variable
 * "HARMONYLITE_<path upper-cased, '.' as '_'>".
 */
typedef struct hl_config_key_info {
    const char *path; /* dotted path: "replication_log.shards" */
    const char *type; /* "string", "bool", "integer", "list" or "duration" (milliseconds, or 30s, 5m, 1h) */
    const char *def;  /* default as YAML text; NULL when the key has none */
    const char *doc;  /* one line */
    int64_t min, max; /* range of an integer key */
    bool secret;      /* value is never printed */
    char env[64];     /* "HARMONYLITE_REPLICATION_LOG_SHARDS" */
    char flag[64];    /* "replication-log-shards" (without the leading '-') */
} hl_config_key_info;

/* Number of keys in the key table. */
size_t hl_config_key_count(void);

/* Fills out with the i-th key of the table; returns false when i is past the end. */
bool hl_config_key_at(size_t i, hl_config_key_info *out);

/*
 * Returns the dotted path (static storage) of the key set by a flag, or NULL
 * when flag names no key. Leading dashes are skipped ("-node-id", "--node-id",
 * "node-id"). The seed's -cluster-addr and -cluster-peers are accepted as
 * aliases of -nats-cluster-addr and -nats-cluster-peers.
 */
const char *hl_config_flag_path(const char *flag);

/*
 * Returns the node id a StatefulSet pod gets from its host name: ordinal + 1
 * when the host name (up to the first '.') ends in "-<digits>" with something
 * before the dash and no leading zero ("harmonylite-0" -> 1, "db-12.svc" -> 13);
 * 0 when it does not.
 */
uint64_t hl_config_node_id_from_hostname(const char *hostname);

/*
 * hl_config_finish with the host name given instead of read with gethostname()
 * (hostname is only consulted when node_id is 0; NULL counts as "").
 */
hl_status hl_config_finish_host(hl_config *c, const char *hostname, char *err, size_t errlen);

/* SIGHUP: logs (warn) every setting of next, other than logging, that differs
 * from the running configuration: those take effect only after a restart. */
void hl_config_log_restart_needed(const hl_config *running, const hl_config *next);

#endif
