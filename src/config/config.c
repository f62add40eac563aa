/*
 * config.c - the key table and everything derived from it: defaults, the YAML
 * loader (libyaml event API), HARMONYLITE_* environment variables, flags
 * (hl_config_set), cross-field checks and the effective-config dump.
 *
 * Every error is one line "<where>: <key>: <what was expected>", where <where>
 * is "file:line", "env HARMONYLITE_X" or the caller's origin ("flag -node-id").
 * Cross-field checks in hl_config_finish name the key that is wrong and where
 * it was last set (remembered per key in hl_config.origins); a key left at its
 * default has no <where>.
 */
#include "config/config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <yaml.h>

#include "common/buf.h"
#include "common/log.h"

#define HL_CONFIG_MAX_FILE (1024 * 1024) /* bytes of YAML read at most */
#define HL_CONFIG_MAX_STR 4096           /* bytes in one string value */
#define HL_CONFIG_MAX_LIST 256           /* entries in one list */
#define HL_CONFIG_MAX_PATH 96            /* bytes in a dotted key path */
#define HL_CONFIG_SUGGEST_LEN 64         /* longer unknown keys get no suggestion */
#define HL_ENV_PREFIX "HARMONYLITE_"

typedef enum hl_key_type {
    HL_KEY_STRING,
    HL_KEY_BOOL,
    HL_KEY_INT,    /* int field */
    HL_KEY_INT64,  /* int64_t field */
    HL_KEY_UINT64, /* uint64_t field, range within [0, INT64_MAX] */
    HL_KEY_LIST,   /* hl_strlist field */
    /* int64_t field, milliseconds: bare digits are ms (as in HarmonyLite), or digits + ms|s|m|h */
    HL_KEY_DURATION,
} hl_key_type;

/* Returns NULL when v is acceptable, else what was expected ("a URL starting with ..."). */
typedef const char *(*hl_key_check)(const char *v);

typedef struct hl_key {
    const char *path; /* dotted path; the part before '.' is the YAML section */
    hl_key_type type;
    size_t off;          /* offsetof the field in hl_config */
    int64_t min, max;    /* integer range */
    const char *def;     /* default as text, parsed like any value; NULL: none (NULL string, empty list) */
    const char *choices; /* "a|b": the value must be one of these (any case; stored lower-case) */
    hl_key_check check;  /* extra check of a string or of each list entry */
    bool secret;         /* never printed */
    const char *doc;
} hl_key;

static const char *check_nats_url(const char *v);
static const char *check_route_url(const char *v);
static const char *check_subject(const char *v);
static const char *check_stream(const char *v);
static const char *check_token(const char *v);
static const char *check_listen(const char *v);
static const char *check_http_listen(const char *v);
static const char *check_leaf_url(const char *v);
static const char *check_resolver(const char *v);
static const char *check_sync_interval(const char *v);
static const char *check_bucket(const char *v);

#define OFF(field) offsetof(hl_config, field)
#define STR(p, f, d, doc)                                                                                              \
    {                                                                                                                  \
        p, HL_KEY_STRING, OFF(f), 0, 0, d, NULL, NULL, false, doc                                                      \
    }
#define STRC(p, f, d, chk, doc)                                                                                        \
    {                                                                                                                  \
        p, HL_KEY_STRING, OFF(f), 0, 0, d, NULL, chk, false, doc                                                       \
    }
#define BOOL(p, f, d, doc)                                                                                             \
    {                                                                                                                  \
        p, HL_KEY_BOOL, OFF(f), 0, 0, d, NULL, NULL, false, doc                                                        \
    }
#define INT(p, f, lo, hi, d, doc)                                                                                      \
    {                                                                                                                  \
        p, HL_KEY_INT, OFF(f), lo, hi, d, NULL, NULL, false, doc                                                       \
    }
#define I64(p, f, lo, hi, d, doc)                                                                                      \
    {                                                                                                                  \
        p, HL_KEY_INT64, OFF(f), lo, hi, d, NULL, NULL, false, doc                                                     \
    }
#define DUR(p, f, lo, hi, d, doc)                                                                                      \
    {                                                                                                                  \
        p, HL_KEY_DURATION, OFF(f), lo, hi, d, NULL, NULL, false, doc                                                  \
    }
#define LIST(p, f, chk, doc)                                                                                           \
    {                                                                                                                  \
        p, HL_KEY_LIST, OFF(f), 0, 0, NULL, NULL, chk, false, doc                                                      \
    }

/*
 * The key table. Top-level keys come first, then each section's keys together
 * (the dump relies on that order). Defaults are text so that they go through
 * the same parser as every other value.
 */
static const hl_key keys[] = {
    STR("db_path", db_path, NULL, "the application's SQLite database file (required)"),
    {"node_id", HL_KEY_UINT64, OFF(node_id), 0, INT64_MAX, "0", NULL, NULL, false,
     "this node's id, >= 1; 0 derives it from the host name's StatefulSet ordinal (ordinal + 1)"},
    STR("data_dir", data_dir, NULL,
        "directory for harmonylite's own files (NATS store, generated config); empty: <db_path>-harmonylite"),
    BOOL("publish", publish, "true", "publish local changes to NATS"),
    BOOL("replicate", replicate, "true", "apply changes received from other nodes"),
    INT("scan_max_changes", scan_max_changes, 1, 1000000, "10000",
        "accepted for HarmonyLite configs; no effect (transactions are never split)"),
    INT("polling_interval", polling_interval_ms, 0, 3600000, "1000",
        "milliseconds between fallback polls of the database; 0: inotify only"),
    INT("cleanup_interval", cleanup_interval_ms, 0, INT_MAX, "5000",
        "milliseconds; accepted for compatibility with HarmonyLite and ignored"),
    I64("tombstone_retention", tombstone_retention_s, 1, INT64_C(3153600000), "604800",
        "seconds to keep delete tombstones"),
    I64("max_clock_drift", max_clock_drift_s, 1, INT64_C(3153600000), "60",
        "seconds a remote version may be ahead of the local wall clock; later ones are held until it catches up"),
    INT("shutdown_grace", shutdown_grace_s, 0, 3600, "10", "seconds to flush the outbox on SIGTERM"),
    INT("order_hold_timeout", order_hold_timeout_s, 1, 86400, "60",
        "seconds a changeset waits for a missing predecessor of its origin before that one is given up on"),
    INT("stall_timeout", stall_timeout_s, 1, 3600, "30",
        "seconds the engine's transactions may keep failing before /readyz reports the node not ready"),
    INT("apply_batch_rows", apply_batch_rows, 1, 10000000, "10000", "rows applied per SQLite transaction"),
    I64("cache_size", cache_size_kib, 0, INT64_C(1073741824), "32768",
        "page cache of harmonylite's database connection, KiB"),
    I64("wal_size_limit", wal_size_limit, 1048576, INT64_C(1099511627776), "67108864",
        "bytes; a -wal file checkpoints find larger is cut back to zero"),
    /* sleep_timeout: serverless nodes (src/snapshot/schedule.c) */
    DUR("sleep_timeout", sleep_timeout_ms, 0, INT64_C(31536000000), "0",
        "after this long without a local or remote change: take a snapshot (under the lease) and exit 0; 0: off"),

    INT("replication_log.shards", replication_log.shards, 1, 1024, "1", "number of JetStream streams (shards)"),
    I64("replication_log.max_entries", replication_log.max_entries, 1, INT64_MAX, "1048576",
        "maximum messages kept per stream"),
    INT("replication_log.replicas", replication_log.replicas, 1, 5, "1", "JetStream replicas per stream"),
    BOOL("replication_log.compress", replication_log.compress, "true", "zstd-compress changesets"),
    I64("replication_log.max_bytes", replication_log.max_bytes, -1, INT64_MAX, "-1",
        "maximum bytes kept per stream; -1: unlimited"),
    I64("replication_log.max_age", replication_log.max_age_s, 0, INT64_C(9223372036), "0",
        "seconds messages are kept; 0: unlimited"),
    INT("replication_log.chunk_bytes", replication_log.chunk_bytes, 1024, 67108864, "524288",
        "maximum payload per message; must be less than nats.max_payload - 64"),
    I64("replication_log.max_changeset_bytes", replication_log.max_changeset_bytes, 1024, INT64_C(1099511627776),
        "268435456",
        "largest changeset (uncompressed) sent or accepted; bigger transactions travel as a chain of changesets "
        "of min(1 MiB, a quarter of this) each, so this only bounds a single row"),
    INT("replication_log.duplicate_window", replication_log.duplicate_window_s, 0, 604800, "120",
        "seconds JetStream remembers message ids to drop duplicates"),
    I64("replication_log.incomplete_expiry", replication_log.incomplete_expiry_s, 0, INT64_C(31536000), "0",
        "seconds a partly received changeset waits for its missing parts; 0: twice duplicate_window + 60"),
    BOOL("replication_log.update_existing", replication_log.update_existing, "false",
         "update a stream whose configuration differs from the above"),

    LIST("nats.urls", nats.urls, check_nats_url,
         "external NATS servers (nats://, tls://, ws://, wss://); empty: start an embedded nats-server"),
    STRC("nats.bind_address", nats.bind_address, "127.0.0.1:4222", check_listen,
         "embedded server's client listener, host:port (its own harmonylite is the only client it needs)"),
    STRC("nats.subject_prefix", nats.subject_prefix, "harmonylite-change-log", check_subject,
         "subject prefix of change messages (the shard number is appended)"),
    STRC("nats.stream_prefix", nats.stream_prefix, "harmonylite-changes", check_stream,
         "JetStream stream name prefix (the shard number is appended)"),
    STR("nats.server_config", nats.server_config, NULL, "file included in the generated nats-server config"),
    STR("nats.server_bin", nats.server_bin, "nats-server", "nats-server executable (searched on PATH)"),
    STRC("nats.cluster_name", nats.cluster_name, "harmonylite", check_token, "embedded server's cluster name"),
    STRC("nats.cluster_addr", nats.cluster_addr, NULL, check_listen,
         "embedded server's cluster (route) listener, host:port"),
    LIST("nats.cluster_peers", nats.cluster_peers, check_route_url,
         "route URLs of the other embedded servers (nats:// or nats-route://)"),
    STR("nats.user_name", nats.user_name, NULL, "user name for NATS authentication"),
    {"nats.user_password", HL_KEY_STRING, OFF(nats.user_password), 0, 0, NULL, NULL, NULL, true,
     "password for NATS authentication (never logged or dumped)"},
    STR("nats.seed_file", nats.seed_file, NULL, "NKey seed file for NATS authentication"),
    STR("nats.creds_file", nats.creds_file, NULL, "JWT credentials file for NATS authentication"),
    STR("nats.ca_file", nats.ca_file, NULL, "CA certificates to verify NATS servers (PEM)"),
    STR("nats.cert_file", nats.cert_file, NULL, "client certificate for NATS TLS (PEM)"),
    STR("nats.key_file", nats.key_file, NULL, "client key for NATS TLS (PEM)"),
    INT("nats.connect_retries", nats.connect_retries, -1, INT_MAX, "5",
        "attempts to connect to external servers at start; -1: forever"),
    INT("nats.reconnect_wait_seconds", nats.reconnect_wait_seconds, 0, 3600, "2", "seconds between reconnect attempts"),
    INT("nats.max_payload", nats.max_payload, 1024, 67108864, "1048576", "embedded server's max_payload, bytes"),
    LIST("nats.leaf_servers", nats.leaf_servers, check_leaf_url,
         "embedded server connects as a leaf node to these URLs (nats-leaf://, nats://, tls://, ws://, wss://)"),
    INT("nats.discovery_interval", nats.discovery_interval_s, 1, 86400, "30",
        "seconds between DNS lookups of the dns:// and dns+srv:// entries of nats.cluster_peers"),
    STRC("nats.discovery_resolver", nats.discovery_resolver, NULL, check_resolver,
         "DNS server(s) for discovery, ip[:port] separated by ','; empty: the system's (resolv.conf)"),
    INT("nats.cluster_min_peers", nats.cluster_min_peers, 0, 1024, "1",
        "other embedded servers that must be known (from DNS) before this one starts and the node is ready"),
    STRC("nats.sync_interval", nats.sync_interval, NULL, check_sync_interval,
         "JetStream fsync interval of the embedded server: always, or a duration like 10s; empty: the server's "
         "default (2m); needs nats-server 2.10 or newer"),
    /* Who may use the embedded server (docs/security.md). harmonylite's own
     * login (user_name/user_password or seed_file) becomes the server's only
     * full user; these add a read-only user and authenticate the routes. */
    STR("nats.reader_user", nats.reader_user, NULL,
        "embedded server: a read-only user that may read the change streams but never publish"),
    {"nats.reader_password", HL_KEY_STRING, OFF(nats.reader_password), 0, 0, NULL, NULL, NULL, true,
     "password of nats.reader_user, plain or a bcrypt hash ($2a$...) (never logged or dumped)"},
    STRC("nats.cluster_user", nats.cluster_user, "harmonylite", check_token,
         "embedded server: user name the routes between servers authenticate with"),
    {"nats.cluster_password", HL_KEY_STRING, OFF(nats.cluster_password), 0, 0, NULL, NULL, NULL, true,
     "embedded server: shared secret every route must present; without it (or route TLS) any server that "
     "reaches the cluster port can join (never logged or dumped)"},
    STR("nats.server_cert_file", nats.server_cert_file, NULL,
        "embedded server's certificate (PEM) for TLS on routes; reloaded when the file changes"),
    STR("nats.server_key_file", nats.server_key_file, NULL, "private key of nats.server_cert_file (PEM)"),
    STR("nats.server_ca_file", nats.server_ca_file, NULL,
        "CA (PEM) route peers' certificates must be signed by; set, routes without such a certificate are refused"),
    {"nats.client_tls", HL_KEY_STRING, OFF(nats.client_tls), 0, 0, "off", "off|on|verify", NULL, false,
     "embedded server: TLS on the client port with nats.server_cert_file (on), and clients must present a "
     "certificate nats.server_ca_file signed (verify); off: plain"},

    BOOL("logging.verbose", logging.verbose, "false", "log at debug level (overrides logging.level)"),
    {"logging.format", HL_KEY_STRING, OFF(logging.format), 0, 0, "console", "console|json", NULL, false,
     "log line format: console or json"},
    {"logging.level", HL_KEY_STRING, OFF(logging.level), 0, 0, "info", "debug|info|warn|error", NULL, false,
     "minimum level logged: debug, info, warn or error"},

    STRC("schema.registry_bucket", schema.registry_bucket, "harmonylite-schema", check_bucket,
         "NATS KV bucket of the schema registry (every node of a cluster must use the same)"),
    INT("schema.heartbeat", schema.heartbeat_s, 1, 3600, "5",
        "seconds between schema registry heartbeats; a node's entry expires after three missed ones"),
    I64("schema.max_held_bytes", schema.max_held_bytes, 1048576, INT64_C(1099511627776), "268435456",
        "bytes of changesets held for a newer schema, per origin and in total; at the bound the node stops "
        "reading that origin's changesets (JetStream keeps them) instead of storing more"),

    STRC("http.bind", http.bind, "0.0.0.0:8080", check_http_listen,
         "listener for /healthz /readyz /metrics /schema; empty: disabled"),
    STR("http.auth_token_file", http.auth_token_file, NULL,
        "file holding the bearer token /metrics and /schema require; empty: none (the probes never need one)"),
    INT("http.request_timeout", http.request_timeout_s, 1, 3600, "10",
        "seconds a client has to send a request and read the answer, from when it connected or its previous "
        "request ended; bytes trickled in do not extend it"),
    INT("http.max_connections", http.max_connections, 1, 1000000, "1024", "HTTP connections open at once"),
    INT("http.max_connections_per_client", http.max_connections_per_client, 1, 1000000, "16",
        "HTTP connections open at once from one client address"),

    {"snapshot.store", HL_KEY_STRING, OFF(snapshot.store), 0, 0, "s3", "s3|dir|sftp|webdav|nats", NULL, false,
     "where snapshots go: s3, dir, sftp, webdav or nats (a NATS object store)"},
    INT("snapshot.keep", snapshot.keep, 1, 1000, "3", "newest snapshots kept in the store; older ones are removed"),
    STR("snapshot.dir", snapshot.dir, NULL, "directory of the dir store (a local or mounted file system)"),
    STR("snapshot.s3_endpoint", snapshot.s3_endpoint, NULL,
        "S3 endpoint URL (https:// or http://); empty: https://s3.<region>.amazonaws.com"),
    STR("snapshot.s3_region", snapshot.s3_region, NULL, "S3 region for signing; empty: $AWS_REGION, else us-east-1"),
    STR("snapshot.s3_bucket", snapshot.s3_bucket, NULL, "S3 bucket (required when snapshot.store is s3)"),
    STR("snapshot.s3_prefix", snapshot.s3_prefix, "harmonylite/", "key prefix of snapshots in the bucket"),
    BOOL("snapshot.s3_path_style", snapshot.s3_path_style, "false",
         "address the bucket as <endpoint>/<bucket>/ instead of <bucket>.<endpoint host>"),
    STR("snapshot.s3_access_key", snapshot.s3_access_key, NULL, "S3 access key id; empty: $AWS_ACCESS_KEY_ID"),
    {"snapshot.s3_secret_key", HL_KEY_STRING, OFF(snapshot.s3_secret_key), 0, 0, NULL, NULL, NULL, true,
     "S3 secret access key; empty: $AWS_SECRET_ACCESS_KEY (never logged or dumped)"},
    {"snapshot.s3_session_token", HL_KEY_STRING, OFF(snapshot.s3_session_token), 0, 0, NULL, NULL, NULL, true,
     "S3 session token; empty: $AWS_SESSION_TOKEN (never logged or dumped)"},
    STR("snapshot.s3_ca_file", snapshot.s3_ca_file, NULL, "CA certificates (PEM) to verify an https endpoint"),
    I64("snapshot.s3_part_size", snapshot.s3_part_size, 1024, INT64_C(5368709120), "67108864",
        "objects larger than this are uploaded in parts of this size (multipart upload; S3 wants >= 5 MiB)"),
    STR("snapshot.sftp_url", snapshot.sftp_url, NULL, "SFTP directory of the sftp store: sftp://host[:port]/path"),
    STR("snapshot.sftp_user", snapshot.sftp_user, NULL, "SFTP user name; empty: $USER, else the process's user"),
    {"snapshot.sftp_password", HL_KEY_STRING, OFF(snapshot.sftp_password), 0, 0, NULL, NULL, NULL, true,
     "SFTP password (never logged or dumped)"},
    STR("snapshot.sftp_key_file", snapshot.sftp_key_file, NULL, "SFTP private key file"),
    {"snapshot.sftp_key_passphrase", HL_KEY_STRING, OFF(snapshot.sftp_key_passphrase), 0, 0, NULL, NULL, NULL, true,
     "passphrase of an encrypted snapshot.sftp_key_file (never logged or dumped)"},
    STR("snapshot.sftp_known_hosts", snapshot.sftp_known_hosts, NULL,
        "known_hosts file the SFTP server's key must be in; empty: ~/.ssh/known_hosts"),
    STR("snapshot.webdav_url", snapshot.webdav_url, NULL,
        "WebDAV collection of the webdav store: https://host[:port]/path/ (http:// on a trusted network)"),
    STR("snapshot.webdav_user", snapshot.webdav_user, NULL, "WebDAV user name (HTTP basic or digest authentication)"),
    {"snapshot.webdav_password", HL_KEY_STRING, OFF(snapshot.webdav_password), 0, 0, NULL, NULL, NULL, true,
     "WebDAV password (never logged or dumped)"},
    STR("snapshot.webdav_ca_file", snapshot.webdav_ca_file, NULL, "CA certificates (PEM) to verify an https server"),
    /* snapshot.store: nats */
    STRC("snapshot.nats_bucket", snapshot.nats_bucket, "harmonylite-snapshots", check_bucket,
         "object store bucket of the nats store (stream OBJ_<bucket>), created when missing"),
    INT("snapshot.nats_replicas", snapshot.nats_replicas, 0, 5, "0",
        "replicas of a nats store bucket harmonylite creates; 0: replication_log.replicas"),
    /* periodic snapshots: who takes them and when (src/snapshot/schedule.c) */
    DUR("snapshot.interval", snapshot.interval_ms, -1, INT64_C(31536000000), "auto",
        "time between the cluster's snapshots, taken by one node at a time; 0: off; auto: 1h when the store's "
        "location is set, else off"),
    INT("snapshot.retention_percent", snapshot.retention_percent, 0, 100, "50",
        "snapshot early once a stream advanced this percentage of replication_log.max_entries; 0: interval only"),
    STRC("snapshot.lease_bucket", snapshot.lease_bucket, "harmonylite-snapshot", check_bucket,
         "NATS KV bucket holding the snapshot lease and the cluster's last snapshot"),
};

#define NKEYS (sizeof(keys) / sizeof(keys[0]))

/* Flags kept from the seed (HarmonyLite) that do not follow the path rule. */
static const struct {
    const char *flag;
    const char *path;
} flag_aliases[] = {
    {"cluster-addr", "nats.cluster_addr"},
    {"cluster-peers", "nats.cluster_peers"},
    {"leaf-servers", "nats.leaf_servers"},
};

/* ---- small helpers ---------------------------------------------------- */

#define FIELD(c, k, T) ((T *)(void *)((char *)(c) + (k)->off))
#define CFIELD(c, k, T) ((const T *)(const void *)((const char *)(c) + (k)->off))

/* Whether s starts with prefix, ignoring case (URL schemes). */
static bool has_prefix_ci(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* A client URL of nats.urls. */
static const char *check_nats_url(const char *v)
{
    if (has_prefix_ci(v, "nats://") || has_prefix_ci(v, "tls://") || has_prefix_ci(v, "ws://") ||
        has_prefix_ci(v, "wss://"))
        return NULL;
    return "a URL starting with nats://, tls://, ws:// or wss://";
}

/* A DNS host name: labels of letters, digits and '-' (not at either end),
 * 1..63 characters each, 1..253 in all, one trailing dot allowed. With
 * underscores = n, the first n labels are "_<letters, digits, '-'>" (SRV). */
static bool is_dns_name(const char *v, size_t n, int underscores)
{
    if (n > 0 && v[n - 1] == '.')
        n--;
    if (n == 0 || n > 253)
        return false;
    size_t start = 0;
    for (int label = 0; start <= n; label++) {
        size_t end = start;
        while (end < n && v[end] != '.')
            end++;
        size_t len = end - start;
        if (len == 0 || len > 63)
            return false;
        size_t i = start;
        if (label < underscores) {
            if (v[i] != '_' || len < 2)
                return false;
            i++;
        } else if (v[start] == '-' || v[end - 1] == '-') {
            return false;
        }
        for (; i < end; i++)
            if (!isalnum((unsigned char)v[i]) && v[i] != '-')
                return false;
        if (label < underscores && end == n)
            return false; /* "_cluster._tcp" needs a name after it */
        start = end + 1;
    }
    return true;
}

/* A route URL of nats.cluster_peers, or a DNS entry discovery looks up. */
static const char *check_route_url(const char *v)
{
    if (has_prefix_ci(v, "nats://") || has_prefix_ci(v, "nats-route://"))
        return NULL;
    if (has_prefix_ci(v, "dns+srv://")) {
        if (is_dns_name(v + 10, strlen(v + 10), 2))
            return NULL;
        return "dns+srv://_<port-name>._tcp.<service> (an SRV name: two '_' labels, then a host name)";
    }
    if (has_prefix_ci(v, "dns://")) {
        const char *colon = strrchr(v + 6, ':');
        char *end = NULL;
        long port = colon ? strtol(colon + 1, &end, 10) : 0;
        if (colon && is_dns_name(v + 6, (size_t)(colon - v - 6), 0) && isdigit((unsigned char)colon[1]) && !*end &&
            port >= 1 && port <= 65535)
            return NULL;
        return "dns://<host name>:<port> (port 1..65535)";
    }
    return "a URL starting with nats:// or nats-route://, or a DNS entry dns+srv://_<port-name>._tcp.<service> or "
           "dns://<name>:<port>";
}

/* A leaf node remote URL of nats.leaf_servers. */
static const char *check_leaf_url(const char *v)
{
    if (has_prefix_ci(v, "nats-leaf://") || has_prefix_ci(v, "nats://") || has_prefix_ci(v, "tls://") ||
        has_prefix_ci(v, "ws://") || has_prefix_ci(v, "wss://"))
        return NULL;
    return "a URL starting with nats-leaf://, nats://, tls://, ws:// or wss://";
}

/* nats.discovery_resolver: "ip[:port]" or "[v6]:port", separated by ','
 * (c-ares' server list). Only addresses: the resolver cannot be looked up. */
static const char *check_resolver(const char *v)
{
    static const char *want = "DNS server addresses, ip[:port] or [ipv6]:port, separated by ','";
    const char *p = v;
    if (!*v)
        return NULL;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        char item[80], host[64];
        unsigned char addr[16];
        if (n == 0 || n >= sizeof item)
            return want;
        memcpy(item, p, n);
        item[n] = 0;
        const char *port = NULL;
        if (item[0] == '[') {
            char *rb = strchr(item, ']');
            if (!rb || (rb[1] && rb[1] != ':') || (size_t)(rb - item - 1) >= sizeof host)
                return want;
            memcpy(host, item + 1, (size_t)(rb - item - 1));
            host[rb - item - 1] = 0;
            port = rb[1] ? rb + 2 : NULL;
            if (inet_pton(AF_INET6, host, addr) != 1)
                return want;
        } else {
            char *colon = strchr(item, ':');
            if (colon && strchr(colon + 1, ':')) { /* bare IPv6 */
                if (inet_pton(AF_INET6, item, addr) != 1)
                    return want;
            } else {
                if (colon) {
                    *colon = 0;
                    port = colon + 1;
                }
                if (inet_pton(AF_INET, item, addr) != 1)
                    return want;
            }
        }
        if (port) {
            char *end = NULL;
            long pn = strtol(port, &end, 10);
            if (!isdigit((unsigned char)*port) || *end || pn < 1 || pn > 65535)
                return want;
        }
        p += n;
        if (*p == ',')
            p++;
    }
    return NULL;
}

/* nats.sync_interval: "always" or a duration nats-server parses (Go's
 * time.ParseDuration), kept to <digits><ms|s|m|h>. */
static const char *check_sync_interval(const char *v)
{
    if (strcmp(v, "always") == 0)
        return NULL;
    const char *p = v;
    while (isdigit((unsigned char)*p))
        p++;
    if (p == v || (strcmp(p, "ms") && strcmp(p, "s") && strcmp(p, "m") && strcmp(p, "h")) || strtol(v, NULL, 10) <= 0)
        return "always, or a positive duration: digits followed by ms, s, m or h (e.g. 10s)";
    return NULL;
}

/* A NATS subject prefix: dot-separated tokens, no spaces or wildcards. */
static const char *check_subject(const char *v)
{
    static const char *want = "a NATS subject (tokens separated by '.', no spaces, '*' or '>')";
    size_t n = strlen(v);
    if (n == 0 || v[0] == '.' || v[n - 1] == '.' || strstr(v, ".."))
        return want;
    for (const unsigned char *p = (const unsigned char *)v; *p; p++)
        if (*p <= ' ' || *p == 0x7f || *p == '*' || *p == '>')
            return want;
    return NULL;
}

/* A JetStream stream name prefix. */
static const char *check_stream(const char *v)
{
    if (!*v || strpbrk(v, ".*>/\\"))
        return "a stream name (no spaces, '.', '*', '>', '/' or '\\')";
    for (const unsigned char *p = (const unsigned char *)v; *p; p++)
        if (*p <= ' ' || *p == 0x7f)
            return "a stream name (no spaces, '.', '*', '>', '/' or '\\')";
    return NULL;
}

/* A non-empty word without spaces (cluster names). */
/* A NATS KV bucket name: 1 to 64 of [A-Za-z0-9_-]. */
static const char *check_bucket(const char *v)
{
    size_t n = strlen(v);
    if (n == 0 || n > 64 || strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") != n)
        return "a bucket name of 1 to 64 letters, digits, '_' or '-'";
    return NULL;
}

static const char *check_token(const char *v)
{
    if (!*v)
        return "a name without spaces";
    for (const unsigned char *p = (const unsigned char *)v; *p; p++)
        if (*p <= ' ' || *p == 0x7f)
            return "a name without spaces";
    return NULL;
}

/*
 * Whether v is a listen address "host:port", "[IPv6 address]:port" or ":port"
 * (any host) with a decimal port from min_port to 65535. Host names are not
 * resolved here; an IPv6 address must be in brackets.
 */
static bool is_listen_addr(const char *v, long min_port)
{
    const char *port;
    if (v[0] == '[') {
        const char *rb = strchr(v, ']');
        if (!rb || rb == v + 1 || rb[1] != ':')
            return false;
        port = rb + 2;
    } else {
        const char *colon = strrchr(v, ':');
        if (!colon || memchr(v, ':', (size_t)(colon - v)))
            return false;
        port = colon + 1;
    }
    for (const unsigned char *p = (const unsigned char *)v; *p; p++)
        if (*p <= ' ' || *p == 0x7f)
            return false;
    size_t pn = strlen(port);
    if (pn == 0 || pn > 5 || strspn(port, "0123456789") != pn)
        return false;
    long x = strtol(port, NULL, 10);
    return x >= min_port && x <= 65535;
}

/* A nats-server listener (nats.bind_address, nats.cluster_addr): a real port is needed to reach it. */
static const char *check_listen(const char *v)
{
    if (is_listen_addr(v, 1))
        return NULL;
    return "host:port, [IPv6 address]:port or :port with a port from 1 to 65535";
}

/* http.bind: port 0 picks a free port; "" disables the listener. */
static const char *check_http_listen(const char *v)
{
    if (!*v || is_listen_addr(v, 0))
        return NULL;
    return "host:port, [IPv6 address]:port or :port with a port from 0 to 65535 (\"\" disables the listener)";
}

/*
 * Writes s[0..n) to out (outlen >= 16) as printable one-line text: control
 * bytes as \xNN and, when quoted, wrapped in '"' with '"' and '\' escaped.
 * Too long text is cut and ends in "...".
 */
static void esc(char *out, size_t outlen, const char *s, size_t n, bool quoted)
{
    size_t o = 0;
    if (outlen < 16) {
        if (outlen)
            out[0] = 0;
        return;
    }
    if (quoted)
        out[o++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char tmp[8];
        size_t tn = 1;
        tmp[0] = (char)ch;
        if (quoted && (ch == '"' || ch == '\\')) {
            tmp[0] = '\\';
            tmp[1] = (char)ch;
            tn = 2;
        } else if (ch < 0x20 || ch == 0x7f) {
            snprintf(tmp, sizeof tmp, "\\x%02x", ch);
            tn = 4;
        }
        /* keep room for "...", the closing quote and the NUL */
        if (o + tn + 5 > outlen) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(out + o, tmp, tn);
        o += tn;
    }
    if (quoted)
        out[o++] = '"';
    out[o] = 0;
}

/* Writes "<where>: <key>: <message>" to err (either prefix may be NULL) and returns st. */
static hl_status vfail(char *err, size_t errlen, hl_status st, const char *where, const char *key, const char *fmt,
                       va_list ap) __attribute__((format(printf, 6, 0)));
static hl_status vfail(char *err, size_t errlen, hl_status st, const char *where, const char *key, const char *fmt,
                       va_list ap)
{
    int n = 0;
    if (!err || errlen == 0)
        return st;
    err[0] = 0;
    if (where && *where && key)
        n = snprintf(err, errlen, "%s: %s: ", where, key);
    else if (where && *where)
        n = snprintf(err, errlen, "%s: ", where);
    else if (key)
        n = snprintf(err, errlen, "%s: ", key);
    if (n < 0)
        n = 0;
    if ((size_t)n < errlen)
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    return st;
}

/* As vfail, with the arguments given directly. */
static hl_status fail(char *err, size_t errlen, hl_status st, const char *where, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static hl_status fail(char *err, size_t errlen, hl_status st, const char *where, const char *key, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    st = vfail(err, errlen, st, where, key, fmt, ap);
    va_end(ap);
    return st;
}

/* Describes what a value of k must look like ("an integer from 1 to 1024"). */
static void expected(const hl_key *k, char *out, size_t outlen)
{
    switch (k->type) {
    case HL_KEY_BOOL:
        snprintf(out, outlen, "true or false");
        return;
    case HL_KEY_INT:
    case HL_KEY_INT64:
    case HL_KEY_UINT64:
        snprintf(out, outlen, "an integer from %" PRId64 " to %" PRId64, k->min, k->max);
        return;
    case HL_KEY_LIST:
        snprintf(out, outlen, "a list of strings");
        return;
    case HL_KEY_DURATION:
        snprintf(out, outlen,
                 "%sa duration: milliseconds, or digits followed by ms, s, m or h (e.g. 1h), at most %" PRId64 "h",
                 k->min < 0 ? "auto or " : "", k->max / 3600000);
        return;
    case HL_KEY_STRING:
        break;
    }
    if (k->choices) {
        size_t o = (size_t)snprintf(out, outlen, "one of ");
        for (const char *p = k->choices; *p && o + 3 < outlen; p++) {
            if (*p == '|') {
                out[o++] = ',';
                out[o++] = ' ';
            } else {
                out[o++] = *p;
            }
        }
        out[o < outlen ? o : outlen - 1] = 0;
        return;
    }
    snprintf(out, outlen, "a string");
}

/* Returns the key whose dotted path is path[0..n), or NULL. */
static const hl_key *key_find(const char *path, size_t n)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (strlen(keys[i].path) == n && memcmp(keys[i].path, path, n) == 0)
            return &keys[i];
    return NULL;
}

/* Returns the first key of section name[0..n), or NULL when it is not a section. */
static const hl_key *section_find(const char *name, size_t n)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (strncmp(keys[i].path, name, n) == 0 && keys[i].path[n] == '.' && !memchr(name, '.', n))
            return &keys[i];
    return NULL;
}

/* Length of the section part of a path ("nats.urls" -> 4), 0 for a top-level key. */
static size_t section_len(const char *path)
{
    const char *dot = strchr(path, '.');
    return dot ? (size_t)(dot - path) : 0;
}

/* Case-insensitive Levenshtein distance; SIZE_MAX when either string is too long. */
static size_t edit_distance(const char *a, size_t an, const char *b, size_t bn)
{
    size_t row[HL_CONFIG_SUGGEST_LEN + 1];
    if (an > HL_CONFIG_SUGGEST_LEN || bn > HL_CONFIG_SUGGEST_LEN)
        return SIZE_MAX;
    for (size_t j = 0; j <= bn; j++)
        row[j] = j;
    for (size_t i = 1; i <= an; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= bn; j++) {
            size_t up = row[j];
            size_t cost = tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]);
            size_t best = diag + cost;
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[bn];
}

/* Distance from an unknown path to a candidate: whole path, or same leaf in another section (+1). */
static size_t suggest_score(const char *p, size_t pn, const char *cand, size_t cn)
{
    size_t d = edit_distance(p, pn, cand, cn);
    const char *pl = memchr(p, '.', pn);
    const char *cl = memchr(cand, '.', cn);
    const char *pleaf = pl ? pl + 1 : p;
    const char *cleaf = cl ? cl + 1 : cand;
    size_t ld = edit_distance(pleaf, pn - (size_t)(pleaf - p), cleaf, cn - (size_t)(cleaf - cand));
    if (ld != SIZE_MAX && ld + 1 < d)
        d = ld + 1;
    return d;
}

/* Returns the known key or section nearest to the unknown path p, or NULL when none is close. */
static const char *suggest(const char *p, size_t pn, size_t *cand_len)
{
    const char *best = NULL;
    size_t best_d = 3, best_n = 0;
    if (pn == 0 || pn > HL_CONFIG_SUGGEST_LEN || memchr(p, 0, pn))
        return NULL;
    for (size_t i = 0; i < NKEYS; i++) {
        const char *cand = keys[i].path;
        size_t cn = strlen(cand);
        size_t d = suggest_score(p, pn, cand, cn);
        if (d < best_d && d < pn) {
            best = cand;
            best_d = d;
            best_n = cn;
        }
        size_t sl = section_len(cand);
        /* sections too ("natz" -> "nats"), once per section */
        if (sl && (i == 0 || strncmp(keys[i - 1].path, cand, sl + 1) != 0)) {
            d = edit_distance(p, pn, cand, sl);
            if (d < best_d && d < pn) {
                best = cand;
                best_d = d;
                best_n = sl;
            }
        }
    }
    *cand_len = best_n;
    return best;
}

/*
 * Reports the unknown key name[0..n) (inside section, when not NULL) with the
 * nearest known key as a suggestion when one is close.
 */
static hl_status unknown_key(char *err, size_t errlen, const char *where, const char *section, const char *name,
                             size_t n)
{
    char shown[160], what[HL_CONFIG_MAX_PATH + 168];
    char path[HL_CONFIG_MAX_PATH + HL_CONFIG_SUGGEST_LEN + 2];
    size_t pn = 0, sn;
    esc(shown, sizeof shown, name, n, false);
    if (section) {
        snprintf(what, sizeof what, "%s.%s", section, shown);
        pn = (size_t)snprintf(path, sizeof path, "%s.", section);
    } else {
        snprintf(what, sizeof what, "%s", shown);
    }
    const char *s = NULL;
    if (n <= HL_CONFIG_SUGGEST_LEN && pn + n < sizeof path) {
        memcpy(path + pn, name, n);
        s = suggest(path, pn + n, &sn);
    }
    if (s)
        return fail(err, errlen, HL_ERR_CONFIG, where, what, "unknown key (did you mean %.*s?)", (int)sn, s);
    return fail(err, errlen, HL_ERR_CONFIG, where, what, "unknown key");
}

/* Frees a list's entries and array; the list is left empty. */
static void list_free(hl_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* Appends a copy of s[0..n) to l. */
static hl_status list_push(hl_strlist *l, const char *s, size_t n)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v)
        return HL_ERR_NOMEM;
    l->v = v;
    v[l->n] = strndup(s, n);
    if (!v[l->n])
        return HL_ERR_NOMEM;
    l->n++;
    return HL_OK;
}

/*
 * Checks one string value v[0..n) of k (a string key or a list entry) and
 * writes its stored form to *out (malloc'd; NULL for an unset optional string).
 */
static hl_status parse_str(const hl_key *k, const char *v, size_t n, char **out, const char *where, char *err,
                           size_t errlen)
{
    char want[128], got[96];
    *out = NULL;
    if (memchr(v, 0, n))
        return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected text without NUL bytes");
    if (n > HL_CONFIG_MAX_STR)
        return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected at most %d bytes, got %zu", HL_CONFIG_MAX_STR,
                    n);
    /* a secret is never repeated in a message */
    if (k->secret)
        snprintf(got, sizeof got, "a secret value");
    else
        esc(got, sizeof got, v, n, true);
    if (k->choices) {
        for (const char *p = k->choices; *p;) {
            size_t tn = strcspn(p, "|");
            if (tn == n && strncasecmp(p, v, n) == 0) {
                *out = strndup(p, tn);
                goto done;
            }
            p += tn + (p[tn] == '|');
        }
        expected(k, want, sizeof want);
        return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected %s, got %s", want, got);
    }
    /* an optional string set to "" is the same as not set */
    if (n == 0 && k->type == HL_KEY_STRING && !k->def)
        return HL_OK;
    *out = strndup(v, n);
    if (!*out)
        goto done;
    if (k->check) {
        const char *w = k->check(*out);
        if (w) {
            free(*out);
            *out = NULL;
            return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected %s, got %s", w, got);
        }
    }
done:
    if (!*out)
        return fail(err, errlen, HL_ERR_NOMEM, where, k->path, "out of memory");
    return HL_OK;
}

/* Stores a list built by the caller into k's field, taking it over (l is left empty). */
static hl_status list_store(hl_config *c, const hl_key *k, hl_strlist *l)
{
    hl_strlist *dst = FIELD(c, k, hl_strlist);
    list_free(dst);
    *dst = *l;
    l->v = NULL;
    l->n = 0;
    return HL_OK;
}

/* Parses a comma-separated list (env and flags): entries are trimmed, empty ones skipped. */
static hl_status set_list_text(hl_config *c, const hl_key *k, const char *v, const char *where, char *err,
                               size_t errlen)
{
    hl_strlist l = {NULL, 0};
    hl_status st = HL_OK;
    const char *p = v;
    while (*p) {
        size_t n = strcspn(p, ",");
        const char *s = p, *e = p + n;
        p = *e ? e + 1 : e;
        while (s < e && isspace((unsigned char)*s))
            s++;
        while (e > s && isspace((unsigned char)e[-1]))
            e--;
        if (s == e)
            continue;
        if (l.n == HL_CONFIG_MAX_LIST) {
            st = fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected at most %d entries", HL_CONFIG_MAX_LIST);
            goto out;
        }
        char *item = NULL;
        st = parse_str(k, s, (size_t)(e - s), &item, where, err, errlen);
        if (st)
            goto out;
        st = list_push(&l, item, strlen(item));
        free(item);
        if (st) {
            st = fail(err, errlen, st, where, k->path, "out of memory");
            goto out;
        }
    }
    st = list_store(c, k, &l);
out:
    list_free(&l);
    return st;
}

/* Parses an integer: optional sign, decimal digits only, within k's range. */
static hl_status parse_int(const hl_key *k, const char *v, size_t n, int64_t *out, const char *where, char *err,
                           size_t errlen)
{
    char tmp[32], want[96], got[96];
    size_t i = 0;
    if (n > 0 && n < sizeof tmp && !memchr(v, 0, n)) {
        memcpy(tmp, v, n);
        tmp[n] = 0;
        if (tmp[0] == '-' || tmp[0] == '+')
            i = 1;
        bool digits = tmp[i] != 0;
        for (size_t j = i; tmp[j]; j++)
            digits = digits && isdigit((unsigned char)tmp[j]);
        if (digits) {
            char *end = NULL;
            errno = 0;
            long long x = strtoll(tmp, &end, 10);
            if (errno == 0 && end && *end == 0 && x >= k->min && x <= k->max) {
                *out = x;
                return HL_OK;
            }
        }
    }
    expected(k, want, sizeof want);
    esc(got, sizeof got, v, n, true);
    return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected %s, got %s", want, got);
}

/* Parses a duration into milliseconds: digits alone are milliseconds (as in
 * HarmonyLite's configuration), or digits followed by ms, s, m or h; within k's range. */
static hl_status parse_duration(const hl_key *k, const char *v, size_t n, int64_t *out, const char *where, char *err,
                                size_t errlen)
{
    char want[128], got[96];
    size_t i = 0;
    int64_t x = 0, mult = 1;
    if (k->min < 0 && n == 4 && strncasecmp(v, "auto", 4) == 0) {
        *out = -1; /* the key's own default rule (hl_config_snapshot_interval_ms) */
        return HL_OK;
    }
    bool ok = n > 0 && n < 32;
    while (ok && i < n && isdigit((unsigned char)v[i])) {
        if (x > (INT64_MAX - 9) / 10) {
            ok = false;
            break;
        }
        x = x * 10 + (v[i++] - '0');
    }
    ok = ok && i > 0;
    if (ok && i < n) {
        size_t ul = n - i;
        const char *u = v + i;
        if (ul == 2 && memcmp(u, "ms", 2) == 0)
            mult = 1;
        else if (ul == 1 && u[0] == 's')
            mult = 1000;
        else if (ul == 1 && u[0] == 'm')
            mult = 60000;
        else if (ul == 1 && u[0] == 'h')
            mult = 3600000;
        else
            ok = false;
    }
    if (ok && x > k->max / mult)
        ok = false;
    if (ok && x * mult >= (k->min > 0 ? k->min : 0)) {
        *out = x * mult;
        return HL_OK;
    }
    expected(k, want, sizeof want);
    esc(got, sizeof got, v, n, true);
    return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected %s, got %s", want, got);
}

/*
 * Sets a non-list key from text v[0..n) (a YAML scalar, an environment value or
 * a flag). Lists are handled by set_list_text and the YAML loader.
 */
static hl_status set_scalar(hl_config *c, const hl_key *k, const char *v, size_t n, const char *where, char *err,
                            size_t errlen)
{
    static const char *truths[] = {"true", "yes", "on"};
    static const char *lies[] = {"false", "no", "off"};
    char want[96], got[96];
    int64_t x = 0;
    hl_status st = HL_OK;

    switch (k->type) {
    case HL_KEY_STRING: {
        char *s = NULL;
        st = parse_str(k, v, n, &s, where, err, errlen);
        if (st)
            return st;
        char **dst = FIELD(c, k, char *);
        free(*dst);
        *dst = s;
        return HL_OK;
    }
    case HL_KEY_BOOL:
        for (size_t i = 0; i < 3; i++) {
            if (strlen(truths[i]) == n && strncasecmp(truths[i], v, n) == 0) {
                *FIELD(c, k, bool) = true;
                return HL_OK;
            }
            if (strlen(lies[i]) == n && strncasecmp(lies[i], v, n) == 0) {
                *FIELD(c, k, bool) = false;
                return HL_OK;
            }
        }
        expected(k, want, sizeof want);
        esc(got, sizeof got, v, n, true);
        return fail(err, errlen, HL_ERR_CONFIG, where, k->path, "expected %s, got %s", want, got);
    case HL_KEY_INT:
    case HL_KEY_INT64:
    case HL_KEY_UINT64:
        st = parse_int(k, v, n, &x, where, err, errlen);
        if (st)
            return st;
        if (k->type == HL_KEY_INT)
            *FIELD(c, k, int) = (int)x;
        else if (k->type == HL_KEY_INT64)
            *FIELD(c, k, int64_t) = x;
        else
            *FIELD(c, k, uint64_t) = (uint64_t)x;
        return HL_OK;
    case HL_KEY_DURATION:
        st = parse_duration(k, v, n, &x, where, err, errlen);
        if (st)
            return st;
        *FIELD(c, k, int64_t) = x;
        return HL_OK;
    case HL_KEY_LIST:
        break;
    }
    return fail(err, errlen, HL_ERR_INTERNAL, where, k->path, "internal error: not a scalar key");
}

/*
 * Remembers where k was set (NULL: a default or an unnamed caller) for the
 * cross-field checks' messages. Best effort: without memory the message only
 * loses its <where>.
 */
static void note_origin(hl_config *c, const hl_key *k, const char *where)
{
    size_t i = (size_t)(k - keys);
    if (!c->origins) {
        if (!where)
            return;
        c->origins = calloc(NKEYS, sizeof *c->origins);
        if (!c->origins)
            return;
    }
    free(c->origins[i]);
    c->origins[i] = where ? strdup(where) : NULL;
}

/* Where k was last set, or NULL. */
static const char *origin_of(const hl_config *c, const char *path)
{
    const hl_key *k = key_find(path, strlen(path));
    return k && c->origins ? c->origins[k - keys] : NULL;
}

/* Sets k from text as the environment and flags give it (lists comma-separated). */
static hl_status set_text(hl_config *c, const hl_key *k, const char *v, const char *where, char *err, size_t errlen)
{
    hl_status st;
    if (k->type == HL_KEY_LIST)
        st = set_list_text(c, k, v, where, err, errlen);
    else
        st = set_scalar(c, k, v, strlen(v), where, err, errlen);
    if (st == HL_OK)
        note_origin(c, k, where);
    return st;
}

/* ---- public: defaults, set, env --------------------------------------- */

void hl_config_defaults(hl_config *c)
{
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < NKEYS; i++) {
        /* defaults are valid by construction (a test checks); only allocation can fail, and
           hl_config_finish reports a default string left NULL */
        if (keys[i].def)
            (void)set_text(c, &keys[i], keys[i].def, NULL, NULL, 0);
    }
}

hl_status hl_config_set(hl_config *c, const char *path, const char *value, const char *origin, char *err, size_t errlen)
{
    const hl_key *k = path ? key_find(path, strlen(path)) : NULL;
    const hl_key *sec = path && !k ? section_find(path, strlen(path)) : NULL;
    if (sec)
        return fail(err, errlen, HL_ERR_CONFIG, origin, path,
                    "unknown key (%s is a section: name one of its keys, such as %s)", path, sec->path);
    if (!k)
        return unknown_key(err, errlen, origin, NULL, path ? path : "", path ? strlen(path) : 0);
    if (!value)
        return fail(err, errlen, HL_ERR_CONFIG, origin, k->path, "expected a value");
    return set_text(c, k, value, origin, err, errlen);
}

/* Returns the key whose environment name is name[0..n) ("HARMONYLITE_NATS_URLS"), or NULL. */
static const hl_key *key_by_env(const char *name, size_t n)
{
    size_t pl = strlen(HL_ENV_PREFIX);
    if (n <= pl || strncmp(name, HL_ENV_PREFIX, pl) != 0)
        return NULL;
    name += pl;
    n -= pl;
    for (size_t i = 0; i < NKEYS; i++) {
        const char *p = keys[i].path;
        size_t j = 0;
        for (; j < n && p[j]; j++) {
            char want = p[j] == '.' ? '_' : (char)toupper((unsigned char)p[j]);
            if (name[j] != want)
                break;
        }
        if (j == n && p[j] == 0)
            return &keys[i];
    }
    return NULL;
}

hl_status hl_config_load_env(hl_config *c, char *const *envp, char *err, size_t errlen)
{
    for (; envp && *envp; envp++) {
        const char *e = *envp;
        const char *eq = strchr(e, '=');
        if (!eq)
            continue;
        const hl_key *k = key_by_env(e, (size_t)(eq - e));
        if (!k)
            continue; /* not ours, or e.g. HARMONYLITE_SERVICE_HOST from a Kubernetes Service */
        char where[80];
        snprintf(where, sizeof where, "env %.*s", (int)(eq - e), e);
        hl_status st = set_text(c, k, eq + 1, where, err, errlen);
        if (st)
            return st;
    }
    return HL_OK;
}

/* ---- YAML file -------------------------------------------------------- */

typedef struct hl_loader {
    hl_config *c;
    yaml_parser_t parser;
    yaml_event_t ev;
    bool have_ev;
    const unsigned char *text; /* the file's content */
    size_t len;
    char file[272]; /* file name as shown in errors */
    char *err;
    size_t errlen;
    size_t line[NKEYS];    /* line where key i was set; 0: not set by this file */
    size_t secline[NKEYS]; /* line of the section whose first key is i */
} hl_loader;

/* Reports an error at line of the file being loaded. */
static hl_status lfail(hl_loader *L, hl_status st, size_t line, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static hl_status lfail(hl_loader *L, hl_status st, size_t line, const char *key, const char *fmt, ...)
{
    char where[300];
    va_list ap;
    snprintf(where, sizeof where, "%s:%zu", L->file, line);
    va_start(ap, fmt);
    st = vfail(L->err, L->errlen, st, where, key, fmt, ap);
    va_end(ap);
    return st;
}

/* Moves to the next event; reports libyaml's errors as "file:line: YAML syntax error: ...". */
static hl_status next_event(hl_loader *L)
{
    char problem[200];
    size_t line;
    if (L->have_ev) {
        yaml_event_delete(&L->ev);
        L->have_ev = false;
    }
    if (yaml_parser_parse(&L->parser, &L->ev)) {
        L->have_ev = true;
        return HL_OK;
    }
    if (L->parser.error == YAML_MEMORY_ERROR)
        return lfail(L, HL_ERR_NOMEM, L->parser.mark.line + 1, NULL, "out of memory");
    line = L->parser.problem_mark.line + 1;
    if (L->parser.error == YAML_READER_ERROR) {
        /* the reader reports a byte offset, not a mark */
        size_t end = L->parser.problem_offset < L->len ? L->parser.problem_offset : L->len;
        line = 1;
        for (size_t i = 0; i < end; i++)
            line += L->text[i] == '\n';
    }
    const char *p = L->parser.problem ? L->parser.problem : "unknown error";
    esc(problem, sizeof problem, p, strlen(p), false);
    return lfail(L, HL_ERR_CONFIG, line, NULL, "YAML syntax error: %s", problem);
}

/* The 1-based line where the current event starts. */
static size_t ev_line(const hl_loader *L)
{
    return L->ev.start_mark.line + 1;
}

/* A plain scalar that YAML reads as null: empty, "~" or "null". */
static bool ev_is_null(const hl_loader *L)
{
    const char *v = (const char *)L->ev.data.scalar.value;
    size_t n = L->ev.data.scalar.length;
    if (L->ev.type != YAML_SCALAR_EVENT || L->ev.data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    return n == 0 || (n == 1 && v[0] == '~') ||
           (n == 4 && (!memcmp(v, "null", 4) || !memcmp(v, "Null", 4) || !memcmp(v, "NULL", 4)));
}

/* What the current event is, for "got ..." ("a mapping", "\"abc\""). */
static void ev_what(const hl_loader *L, char *out, size_t outlen)
{
    switch (L->ev.type) {
    case YAML_MAPPING_START_EVENT:
        snprintf(out, outlen, "a mapping");
        break;
    case YAML_SEQUENCE_START_EVENT:
        snprintf(out, outlen, "a sequence");
        break;
    case YAML_ALIAS_EVENT:
        snprintf(out, outlen, "an alias (YAML aliases are not supported)");
        break;
    case YAML_SCALAR_EVENT:
        esc(out, outlen, (const char *)L->ev.data.scalar.value, L->ev.data.scalar.length, true);
        break;
    default:
        snprintf(out, outlen, "nothing");
        break;
    }
}

/* Reads a YAML sequence of scalars (the current event is its start) into list key k. */
static hl_status load_list(hl_loader *L, const hl_key *k)
{
    hl_strlist l = {NULL, 0};
    hl_status st;
    char where[300], got[96];
    for (;;) {
        st = next_event(L);
        if (st)
            goto out;
        if (L->ev.type == YAML_SEQUENCE_END_EVENT)
            break;
        if (L->ev.type != YAML_SCALAR_EVENT) {
            ev_what(L, got, sizeof got);
            st = lfail(L, HL_ERR_CONFIG, ev_line(L), k->path, "expected a list of strings, got %s in the list", got);
            goto out;
        }
        snprintf(where, sizeof where, "%s:%zu", L->file, ev_line(L));
        if (L->ev.data.scalar.length == 0 || ev_is_null(L)) {
            st = fail(L->err, L->errlen, HL_ERR_CONFIG, where, k->path, "expected a non-empty string in the list");
            goto out;
        }
        if (l.n == HL_CONFIG_MAX_LIST) {
            st = fail(L->err, L->errlen, HL_ERR_CONFIG, where, k->path, "expected at most %d entries",
                      HL_CONFIG_MAX_LIST);
            goto out;
        }
        char *item = NULL;
        st = parse_str(k, (const char *)L->ev.data.scalar.value, L->ev.data.scalar.length, &item, where, L->err,
                       L->errlen);
        if (st)
            goto out;
        st = list_push(&l, item, strlen(item));
        free(item);
        if (st) {
            st = fail(L->err, L->errlen, st, where, k->path, "out of memory");
            goto out;
        }
    }
    st = list_store(L->c, k, &l);
out:
    list_free(&l);
    return st;
}

/* Reads the value of key k (the next event). */
static hl_status load_value(hl_loader *L, const hl_key *k)
{
    char want[96], got[96], where[300];
    hl_status st = next_event(L);
    if (st)
        return st;
    snprintf(where, sizeof where, "%s:%zu", L->file, ev_line(L));
    if (k->type == HL_KEY_LIST) {
        if (L->ev.type == YAML_SEQUENCE_START_EVENT) {
            st = load_list(L, k);
        } else if (ev_is_null(L)) {
            hl_strlist empty = {NULL, 0};
            st = list_store(L->c, k, &empty);
        } else {
            ev_what(L, got, sizeof got);
            return lfail(L, HL_ERR_CONFIG, ev_line(L), k->path,
                         "expected a list of strings (a YAML sequence such as [\"a\", \"b\"]), got %s", got);
        }
        if (st == HL_OK)
            note_origin(L->c, k, where);
        return st;
    }
    if (L->ev.type != YAML_SCALAR_EVENT) {
        expected(k, want, sizeof want);
        ev_what(L, got, sizeof got);
        return lfail(L, HL_ERR_CONFIG, ev_line(L), k->path, "expected %s, got %s", want, got);
    }
    if (k->type == HL_KEY_STRING && ev_is_null(L))
        st = set_scalar(L->c, k, "", 0, where, L->err, L->errlen);
    else
        st = set_scalar(L->c, k, (const char *)L->ev.data.scalar.value, L->ev.data.scalar.length, where, L->err,
                        L->errlen);
    if (st == HL_OK)
        note_origin(L->c, k, where);
    return st;
}

/*
 * Reads a mapping's keys and values (the current event is its start) until its
 * end; section is NULL at the top level, else the section's name.
 */
static hl_status load_mapping(hl_loader *L, const char *section)
{
    char path[HL_CONFIG_MAX_PATH], got[96], where[300];
    size_t pn = section ? strlen(section) + 1 : 0;
    hl_status st;
    for (;;) {
        st = next_event(L);
        if (st)
            return st;
        if (L->ev.type == YAML_MAPPING_END_EVENT)
            return HL_OK;
        size_t line = ev_line(L);
        if (L->ev.type != YAML_SCALAR_EVENT) {
            ev_what(L, got, sizeof got);
            return lfail(L, HL_ERR_CONFIG, line, section, "expected a key name, got %s", got);
        }
        const char *name = (const char *)L->ev.data.scalar.value;
        size_t n = L->ev.data.scalar.length;
        snprintf(where, sizeof where, "%s:%zu", L->file, line);
        if (memchr(name, 0, n) || pn + n >= sizeof path)
            return unknown_key(L->err, L->errlen, where, section, name, n);
        if (section)
            snprintf(path, sizeof path, "%s.", section);
        memcpy(path + pn, name, n);
        path[pn + n] = 0;

        const hl_key *k = key_find(path, pn + n);
        const hl_key *sec = section ? NULL : section_find(path, n);
        if (!k && !sec)
            return unknown_key(L->err, L->errlen, where, section, name, n);
        size_t *seen = k ? &L->line[k - keys] : &L->secline[sec - keys];
        if (*seen)
            return lfail(L, HL_ERR_CONFIG, line, path, "duplicate key (first set on line %zu)", *seen);
        *seen = line;
        if (k) {
            st = load_value(L, k);
            if (st)
                return st;
            continue;
        }
        st = next_event(L);
        if (st)
            return st;
        if (L->ev.type == YAML_MAPPING_START_EVENT) {
            st = load_mapping(L, path);
            if (st)
                return st;
        } else if (!ev_is_null(L)) {
            ev_what(L, got, sizeof got);
            return lfail(L, HL_ERR_CONFIG, ev_line(L), path,
                         "expected a section (a mapping of keys such as %s), got %s", sec->path, got);
        }
    }
}

/* Reads the whole file into b (at most HL_CONFIG_MAX_FILE bytes). */
static hl_status read_file(const char *path, hl_buf *b, const char *shown, char *err, size_t errlen)
{
    unsigned char chunk[8192];
    hl_status st = HL_OK;
    FILE *f = fopen(path, "rb");
    if (!f)
        return fail(err, errlen, HL_ERR_IO, shown, NULL, "cannot open: %s", strerror(errno));
    for (;;) {
        size_t n = fread(chunk, 1, sizeof chunk, f);
        st = n > 0 ? hl_buf_add(b, chunk, n) : HL_OK;
        if (st == HL_ERR_TOO_LARGE) {
            st = fail(err, errlen, st, shown, NULL, "file is larger than %d bytes", HL_CONFIG_MAX_FILE);
            goto out;
        }
        if (st) {
            st = fail(err, errlen, st, shown, NULL, "out of memory");
            goto out;
        }
        if (n < sizeof chunk)
            break;
    }
    if (ferror(f))
        st = fail(err, errlen, HL_ERR_IO, shown, NULL, "cannot read: %s", strerror(errno));
out:
    fclose(f);
    return st;
}

hl_status hl_config_load_file(hl_config *c, const char *path, char *err, size_t errlen)
{
    hl_loader *L = calloc(1, sizeof *L);
    hl_buf b;
    hl_status st = HL_OK;
    bool parser_ready = false;
    char got[96];

    hl_buf_init(&b, HL_CONFIG_MAX_FILE);
    if (!L)
        return fail(err, errlen, HL_ERR_NOMEM, path, NULL, "out of memory");
    L->c = c;
    L->err = err;
    L->errlen = errlen;
    esc(L->file, sizeof L->file, path, strlen(path), false);
    if (err && errlen)
        err[0] = 0;

    char *cp = strdup(path);
    if (!cp) {
        st = fail(err, errlen, HL_ERR_NOMEM, L->file, NULL, "out of memory");
        goto out;
    }
    free(c->config_path);
    c->config_path = cp;

    st = read_file(path, &b, L->file, err, errlen);
    if (st)
        goto out;
    L->text = b.data ? b.data : (const unsigned char *)"";
    L->len = b.len;
    if (!yaml_parser_initialize(&L->parser)) {
        st = fail(err, errlen, HL_ERR_NOMEM, L->file, NULL, "out of memory");
        goto out;
    }
    parser_ready = true;
    yaml_parser_set_input_string(&L->parser, L->text, L->len);

    st = next_event(L); /* stream start */
    if (st)
        goto out;
    st = next_event(L);
    if (st || L->ev.type == YAML_STREAM_END_EVENT) /* an empty file: all defaults */
        goto out;
    st = next_event(L); /* the document's first node */
    if (st)
        goto out;
    if (L->ev.type == YAML_MAPPING_START_EVENT) {
        st = load_mapping(L, NULL);
    } else if (!ev_is_null(L)) {
        ev_what(L, got, sizeof got);
        st = lfail(L, HL_ERR_CONFIG, ev_line(L), NULL, "expected a mapping of keys at the top level, got %s", got);
    }
    if (st)
        goto out;
    st = next_event(L); /* document end */
    if (st)
        goto out;
    st = next_event(L);
    if (st)
        goto out;
    if (L->ev.type != YAML_STREAM_END_EVENT)
        st = lfail(L, HL_ERR_CONFIG, ev_line(L), NULL, "expected a single YAML document, found another");
out:
    if (L->have_ev)
        yaml_event_delete(&L->ev);
    if (parser_ready)
        yaml_parser_delete(&L->parser);
    hl_buf_free(&b);
    free(L);
    return st;
}

/* ---- finish ----------------------------------------------------------- */

uint64_t hl_config_node_id_from_hostname(const char *h)
{
    if (!h)
        return 0;
    size_t n = strcspn(h, ".");
    size_t d = n;
    while (d > 0 && isdigit((unsigned char)h[d - 1]))
        d--;
    /* "<name>-<digits>": a dash with something before it, digits after it, no leading zero */
    if (d == n || d < 2 || h[d - 1] != '-' || (h[d] == '0' && n - d > 1) || n - d > 18)
        return 0;
    uint64_t ord = 0;
    for (size_t i = d; i < n; i++)
        ord = ord * 10 + (uint64_t)(h[i] - '0');
    return ord + 1;
}

/* Re-checks a string value against its key's choices and check (hl_config may have been edited directly). */
static hl_status recheck(const hl_key *k, const char *v, char *err, size_t errlen)
{
    char *tmp = NULL;
    hl_status st = parse_str(k, v, strlen(v), &tmp, NULL, err, errlen);
    free(tmp);
    return st;
}

/*
 * Embedded mode (no nats.urls) runs this node's nats-server and one per
 * cluster peer: a cluster listener needs routes, routes need a listener, and a
 * stream cannot have more replicas than there are servers. A node started
 * otherwise would retry creating its streams forever. External mode's server
 * count is not known here; the engine reports the server's refusal.
 */
static hl_status check_embedded(const hl_config *c, char *err, size_t errlen)
{
    if (c->nats.urls.n > 0)
        return HL_OK;
    bool listener = c->nats.cluster_addr && *c->nats.cluster_addr;
    size_t peers = c->nats.cluster_peers.n;
    bool dns = false; /* how many servers a DNS entry stands for is known only at runtime */
    for (size_t i = 0; i < peers; i++)
        dns = dns || has_prefix_ci(c->nats.cluster_peers.v[i], "dns://") ||
              has_prefix_ci(c->nats.cluster_peers.v[i], "dns+srv://");
    if (listener && peers == 0)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.cluster_addr"), "nats.cluster_addr",
                    "needs nats.cluster_peers (JetStream clustering needs routes to the other servers); leave it "
                    "unset for a single node");
    if (!listener && peers > 0)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.cluster_peers"), "nats.cluster_peers",
                    "needs nats.cluster_addr (routes to the peers are made only from a cluster listener)");
    if (!dns && (size_t)c->replication_log.replicas > 1 + peers) {
        if (peers == 0)
            return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "replication_log.replicas"),
                        "replication_log.replicas",
                        "must not exceed the number of embedded nats-servers, 1 (this node's; a stream cannot have "
                        "more replicas than servers: add nats.cluster_addr and nats.cluster_peers), got %d",
                        c->replication_log.replicas);
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "replication_log.replicas"), "replication_log.replicas",
                    "must not exceed the number of embedded nats-servers, %zu (this node's and %zu in "
                    "nats.cluster_peers; a stream cannot have more replicas than servers), got %d",
                    1 + peers, peers, c->replication_log.replicas);
    }
    return HL_OK;
}

/* nats.client_tls: the embedded server's client port over TLS; harmonylite
 * connects to it over TLS too and must be able to verify it. */
static hl_status check_client_tls(const hl_config *c, char *err, size_t errlen, bool scert)
{
    hl_client_tls mode = hl_config_client_tls(c);
    if (mode == HL_CLIENT_TLS_OFF)
        return HL_OK;
    const char *o = origin_of(c, "nats.client_tls");
    if (c->nats.urls.n > 0)
        return fail(err, errlen, HL_ERR_CONFIG, o, "nats.client_tls",
                    "applies to the embedded server only; with nats.urls, TLS to the servers is nats.ca_file, "
                    "nats.cert_file and nats.key_file");
    if (!scert)
        return fail(err, errlen, HL_ERR_CONFIG, o, "nats.client_tls",
                    "needs nats.server_cert_file and nats.server_key_file (the server's certificate)");
    bool sca = c->nats.server_ca_file && *c->nats.server_ca_file, ca = c->nats.ca_file && *c->nats.ca_file;
    if (mode == HL_CLIENT_TLS_VERIFY && !sca)
        return fail(err, errlen, HL_ERR_CONFIG, o, "nats.client_tls",
                    "verify needs nats.server_ca_file (the CA clients' certificates must be signed by)");
    if (!sca && !ca)
        return fail(err, errlen, HL_ERR_CONFIG, o, "nats.client_tls",
                    "needs nats.server_ca_file or nats.ca_file (harmonylite verifies its own server's certificate)");
    return HL_OK;
}

/* NATS credentials the connection could not use as given (it would fail at every start). */
static hl_status check_credentials(const hl_config *c, char *err, size_t errlen)
{
    bool cert = c->nats.cert_file && *c->nats.cert_file, key = c->nats.key_file && *c->nats.key_file;
    if (cert && !key)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.cert_file"), "nats.cert_file",
                    "needs nats.key_file (the client certificate's private key)");
    if (key && !cert)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.key_file"), "nats.key_file",
                    "needs nats.cert_file (the client certificate it belongs to)");
    if (c->nats.creds_file && *c->nats.creds_file && c->nats.seed_file && *c->nats.seed_file)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.seed_file"), "nats.seed_file",
                    "cannot be used together with nats.creds_file (set one of them)");
    bool user = c->nats.user_name && *c->nats.user_name, pass = c->nats.user_password && *c->nats.user_password;
    if (user != pass)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, user ? "nats.user_name" : "nats.user_password"),
                    user ? "nats.user_name" : "nats.user_password",
                    user ? "needs nats.user_password" : "needs nats.user_name");
    bool ruser = c->nats.reader_user && *c->nats.reader_user,
         rpass = c->nats.reader_password && *c->nats.reader_password;
    if (ruser != rpass)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, ruser ? "nats.reader_user" : "nats.reader_password"),
                    ruser ? "nats.reader_user" : "nats.reader_password",
                    ruser ? "needs nats.reader_password" : "needs nats.reader_user");
    if (ruser && !user && !(c->nats.seed_file && *c->nats.seed_file))
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.reader_user"), "nats.reader_user",
                    "needs harmonylite's own login, nats.user_name and nats.user_password or nats.seed_file (with "
                    "any user configured the server refuses anonymous clients, harmonylite among them)");
    if (ruser && user && strcmp(c->nats.reader_user, c->nats.user_name) == 0)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.reader_user"), "nats.reader_user",
                    "must differ from nats.user_name");
    bool scert = c->nats.server_cert_file && *c->nats.server_cert_file,
         skey = c->nats.server_key_file && *c->nats.server_key_file;
    if (scert != skey)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, scert ? "nats.server_cert_file" : "nats.server_key_file"),
                    scert ? "nats.server_cert_file" : "nats.server_key_file",
                    scert ? "needs nats.server_key_file" : "needs nats.server_cert_file");
    if (c->nats.server_ca_file && *c->nats.server_ca_file && !scert)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "nats.server_ca_file"), "nats.server_ca_file",
                    "needs nats.server_cert_file and nats.server_key_file (routes verify each other only over TLS)");
    return check_client_tls(c, err, errlen, scert);
}

hl_status hl_config_finish_host(hl_config *c, const char *hostname, char *err, size_t errlen)
{
    char shown[160];
    if (err && errlen)
        err[0] = 0;
    if (!hostname)
        hostname = "";

    for (size_t i = 0; i < NKEYS; i++) {
        const hl_key *k = &keys[i];
        if (k->type == HL_KEY_LIST) {
            const hl_strlist *l = FIELD(c, k, hl_strlist);
            for (size_t j = 0; j < l->n; j++) {
                hl_status st = recheck(k, l->v[j], err, errlen);
                if (st)
                    return st;
            }
        } else if (k->type == HL_KEY_STRING) {
            const char *v = *FIELD(c, k, char *);
            if (!v && k->def)
                return fail(err, errlen, HL_ERR_NOMEM, NULL, k->path, "out of memory");
            if (v && (k->choices || k->check)) {
                hl_status st = recheck(k, v, err, errlen);
                if (st)
                    return st;
            }
        }
    }

    if (!c->db_path || !*c->db_path)
        return fail(err, errlen, HL_ERR_CONFIG, NULL, "db_path",
                    "required: set db_path, HARMONYLITE_DB_PATH or -db-path");

    if (c->node_id == 0) {
        c->node_id = hl_config_node_id_from_hostname(hostname);
        if (c->node_id == 0) {
            esc(shown, sizeof shown, hostname, strlen(hostname), true);
            return fail(err, errlen, HL_ERR_CONFIG, NULL, "node_id",
                        "required: set node_id, HARMONYLITE_NODE_ID or -node-id (host name %s has no StatefulSet "
                        "ordinal)",
                        shown);
        }
    }

    if (!c->data_dir || !*c->data_dir) {
        size_t n = strlen(c->db_path) + sizeof "-harmonylite";
        char *d = malloc(n);
        if (!d)
            return fail(err, errlen, HL_ERR_NOMEM, NULL, "data_dir", "out of memory");
        snprintf(d, n, "%s-harmonylite", c->db_path);
        free(c->data_dir);
        c->data_dir = d;
    }

    if (c->logging.verbose && strcmp(c->logging.level, "debug") != 0) {
        char *d = strdup("debug");
        if (!d)
            return fail(err, errlen, HL_ERR_NOMEM, NULL, "logging.level", "out of memory");
        free(c->logging.level);
        c->logging.level = d;
    }

    if ((int64_t)c->replication_log.chunk_bytes >= (int64_t)c->nats.max_payload - 64)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "replication_log.chunk_bytes"),
                    "replication_log.chunk_bytes", "must be less than nats.max_payload - 64 (%d), got %d",
                    c->nats.max_payload - 64, c->replication_log.chunk_bytes);

    if (c->replication_log.max_age_s > 0 && c->replication_log.duplicate_window_s > c->replication_log.max_age_s)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "replication_log.duplicate_window"),
                    "replication_log.duplicate_window",
                    "must not exceed replication_log.max_age (%" PRId64 ") when it is set, got %d",
                    c->replication_log.max_age_s, c->replication_log.duplicate_window_s);
    if (c->replication_log.incomplete_expiry_s > 0 &&
        c->replication_log.incomplete_expiry_s <= hl_config_duplicate_window_s(c))
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "replication_log.incomplete_expiry"),
                    "replication_log.incomplete_expiry",
                    "must be longer than the duplicate window (%d seconds), got %" PRId64,
                    hl_config_duplicate_window_s(c), c->replication_log.incomplete_expiry_s);
    if (c->snapshot.lease_bucket && c->schema.registry_bucket &&
        strcmp(c->snapshot.lease_bucket, c->schema.registry_bucket) == 0)
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "snapshot.lease_bucket"), "snapshot.lease_bucket",
                    "must differ from schema.registry_bucket (\"%s\"): the two buckets have different settings",
                    c->snapshot.lease_bucket);
    if (c->snapshot.interval_ms > 0 && !hl_config_snapshot_store_set(c))
        return fail(err, errlen, HL_ERR_CONFIG, origin_of(c, "snapshot.interval"), "snapshot.interval",
                    "expected 0 while the snapshot store has no location (set snapshot.dir, snapshot.s3_bucket, "
                    "snapshot.sftp_url, snapshot.webdav_url or snapshot.nats_bucket for snapshot.store %s)",
                    c->snapshot.store ? c->snapshot.store : "s3");
    hl_status st = check_credentials(c, err, errlen);
    return st ? st : check_embedded(c, err, errlen);
}

int hl_config_duplicate_window_s(const hl_config *c)
{
    int w = c->replication_log.duplicate_window_s > 0 ? c->replication_log.duplicate_window_s : 120;
    if (c->replication_log.max_age_s > 0 && w > c->replication_log.max_age_s)
        w = (int)c->replication_log.max_age_s;
    return w;
}

bool hl_config_snapshot_store_set(const hl_config *c)
{
    const char *kind = c->snapshot.store ? c->snapshot.store : "s3";
    const char *loc = strcmp(kind, "dir") == 0      ? c->snapshot.dir
                      : strcmp(kind, "sftp") == 0   ? c->snapshot.sftp_url
                      : strcmp(kind, "webdav") == 0 ? c->snapshot.webdav_url
                      : strcmp(kind, "nats") == 0   ? c->snapshot.nats_bucket
                                                    : c->snapshot.s3_bucket;
    return loc && *loc;
}

int64_t hl_config_snapshot_interval_ms(const hl_config *c)
{
    if (c->snapshot.interval_ms >= 0)
        return c->snapshot.interval_ms;
    /* auto: on with a store; nobody asked for snapshots otherwise, so none fail every hour */
    return hl_config_snapshot_store_set(c) ? 3600000 : 0;
}

int64_t hl_config_incomplete_expiry_s(const hl_config *c)
{
    if (c->replication_log.incomplete_expiry_s > 0)
        return c->replication_log.incomplete_expiry_s;
    return 2 * (int64_t)hl_config_duplicate_window_s(c) + 60;
}

hl_status hl_config_finish(hl_config *c, char *err, size_t errlen)
{
    char host[256] = "";
    if (c->node_id == 0 && gethostname(host, sizeof host - 1) != 0)
        host[0] = 0;
    host[sizeof host - 1] = 0;
    return hl_config_finish_host(c, host, err, errlen);
}

void hl_config_free(hl_config *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < NKEYS; i++) {
        const hl_key *k = &keys[i];
        if (k->type == HL_KEY_STRING) {
            char **p = FIELD(c, k, char *);
            free(*p);
            *p = NULL;
        } else if (k->type == HL_KEY_LIST) {
            list_free(FIELD(c, k, hl_strlist));
        }
    }
    free(c->config_path);
    c->config_path = NULL;
    if (c->origins)
        for (size_t i = 0; i < NKEYS; i++)
            free(c->origins[i]);
    free(c->origins);
    c->origins = NULL;
}

/* ---- dump ------------------------------------------------------------- */

/* Decodes one UTF-8 sequence at s (n bytes left); returns its length, 0 when invalid. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    size_t len;
    uint32_t v;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if ((s[0] & 0xe0) == 0xc0) {
        len = 2;
        v = s[0] & 0x1f;
    } else if ((s[0] & 0xf0) == 0xe0) {
        len = 3;
        v = s[0] & 0x0f;
    } else if ((s[0] & 0xf8) == 0xf0) {
        len = 4;
        v = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    if ((len == 2 && v < 0x80) || (len == 3 && v < 0x800) || (len == 4 && (v < 0x10000 || v > 0x10ffff)) ||
        (v >= 0xd800 && v <= 0xdfff))
        return 0;
    *cp = v;
    return len;
}

/*
 * Writes s as a YAML double-quoted string that reads back to the same bytes:
 * control characters and the code points YAML treats as breaks or BOM escaped.
 */
static void put_yaml_str(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    size_t n = strlen((const char *)p);
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        uint32_t cp = 0;
        size_t len = utf8_decode(p + i, n - i, &cp);
        if (len == 0) { /* not UTF-8 (possible from the environment): pass the byte through */
            fputc(p[i], f);
            i++;
            continue;
        }
        if (cp == '"' || cp == '\\')
            fprintf(f, "\\%c", (char)cp);
        else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0x9f))
            fprintf(f, "\\x%02x", (unsigned)cp);
        else if (cp == 0x2028 || cp == 0x2029 || cp == 0xfeff || cp == 0xfffe || cp == 0xffff)
            fprintf(f, "\\u%04x", (unsigned)cp);
        else
            fwrite(p + i, 1, len, f);
        i += len;
    }
    fputc('"', f);
}

/* put_yaml_str, with the password of a URL's userinfo ("scheme://user:pass@")
 * replaced: nats.urls and route URLs may carry credentials. */
static void put_yaml_value(FILE *f, const char *v)
{
    const char *scheme = v ? strstr(v, "://") : NULL;
    const char *at = NULL; /* the authority's last '@': a password may hold '@' */
    for (const char *p = scheme ? scheme + 3 : ""; *p && *p != '/' && *p != '?' && *p != '#'; p++)
        if (*p == '@')
            at = p;
    const char *colon = at ? memchr(scheme + 3, ':', (size_t)(at - scheme - 3)) : NULL;
    if (!colon) {
        put_yaml_str(f, v);
        return;
    }
    size_t n = strlen(v) + 16;
    char *red = malloc(n);
    if (!red) {
        put_yaml_str(f, "<redacted>");
        return;
    }
    snprintf(red, n, "%.*s<redacted>%s", (int)(colon + 1 - v), v, at);
    put_yaml_str(f, red);
    free(red);
}

void hl_config_dump(const hl_config *c, FILE *f)
{
    const char *prev_section = NULL;
    size_t prev_len = 0;
    fputs("# harmonylite effective configuration", f);
    if (c->config_path) {
        char shown[272];
        esc(shown, sizeof shown, c->config_path, strlen(c->config_path), false);
        fprintf(f, " (file %s)", shown);
    }
    fputc('\n', f);
    for (size_t i = 0; i < NKEYS; i++) {
        const hl_key *k = &keys[i];
        size_t sl = section_len(k->path);
        const char *leaf = k->path;
        const char *indent = "";
        if (sl) {
            if (!prev_section || prev_len != sl || strncmp(prev_section, k->path, sl) != 0)
                fprintf(f, "%.*s:\n", (int)sl, k->path);
            prev_section = k->path;
            prev_len = sl;
            leaf = k->path + sl + 1;
            indent = "  ";
        }
        fprintf(f, "%s%s: ", indent, leaf);
        switch (k->type) {
        case HL_KEY_STRING: {
            const char *v = *CFIELD(c, k, char *);
            if (k->secret && v && *v)
                put_yaml_str(f, "<redacted>");
            else
                put_yaml_value(f, v);
            break;
        }
        case HL_KEY_BOOL:
            fputs(*CFIELD(c, k, bool) ? "true" : "false", f);
            break;
        case HL_KEY_INT:
            fprintf(f, "%d", *CFIELD(c, k, int));
            break;
        case HL_KEY_INT64:
            fprintf(f, "%" PRId64, *CFIELD(c, k, int64_t));
            break;
        case HL_KEY_UINT64:
            fprintf(f, "%" PRIu64, *CFIELD(c, k, uint64_t));
            break;
        case HL_KEY_DURATION: {
            int64_t ms = *CFIELD(c, k, int64_t);
            if (ms <= 0)
                fputs(ms ? "auto" : "0", f);
            else if (ms && ms % 3600000 == 0)
                fprintf(f, "%" PRId64 "h", ms / 3600000);
            else if (ms && ms % 60000 == 0)
                fprintf(f, "%" PRId64 "m", ms / 60000);
            else if (ms && ms % 1000 == 0)
                fprintf(f, "%" PRId64 "s", ms / 1000);
            else
                fprintf(f, "%" PRId64 "ms", ms);
            break;
        }
        case HL_KEY_LIST: {
            const hl_strlist *l = CFIELD(c, k, hl_strlist);
            fputc('[', f);
            for (size_t j = 0; j < l->n; j++) {
                if (j)
                    fputs(", ", f);
                if (k->secret)
                    put_yaml_str(f, "<redacted>");
                else
                    put_yaml_value(f, l->v[j]);
            }
            fputc(']', f);
            break;
        }
        }
        fputc('\n', f);
    }
}

/* ---- introspection ---------------------------------------------------- */

size_t hl_config_key_count(void)
{
    return NKEYS;
}

bool hl_config_key_at(size_t i, hl_config_key_info *out)
{
    static const char *type_names[] = {"string", "bool", "integer", "integer", "integer", "list", "duration"};
    if (i >= NKEYS)
        return false;
    const hl_key *k = &keys[i];
    memset(out, 0, sizeof *out);
    out->path = k->path;
    out->type = type_names[k->type];
    out->def = k->def;
    out->doc = k->doc;
    out->min = k->min;
    out->max = k->max;
    out->secret = k->secret;
    size_t pl = strlen(HL_ENV_PREFIX);
    snprintf(out->env, sizeof out->env, "%s", HL_ENV_PREFIX);
    for (size_t j = 0; k->path[j] && pl + j + 1 < sizeof out->env; j++) {
        char ch = k->path[j];
        out->env[pl + j] = ch == '.' ? '_' : (char)toupper((unsigned char)ch);
        out->env[pl + j + 1] = 0;
    }
    for (size_t j = 0; k->path[j] && j + 1 < sizeof out->flag; j++) {
        char ch = k->path[j];
        out->flag[j] = (ch == '.' || ch == '_') ? '-' : ch;
        out->flag[j + 1] = 0;
    }
    return true;
}

const char *hl_config_flag_path(const char *flag)
{
    if (!flag)
        return NULL;
    while (*flag == '-')
        flag++;
    for (size_t i = 0; i < sizeof flag_aliases / sizeof flag_aliases[0]; i++)
        if (strcmp(flag, flag_aliases[i].flag) == 0)
            return flag_aliases[i].path;
    for (size_t i = 0; i < NKEYS; i++) {
        const char *p = keys[i].path;
        size_t j = 0;
        for (; p[j] && flag[j]; j++) {
            char want = (p[j] == '.' || p[j] == '_') ? '-' : p[j];
            if (flag[j] != want)
                break;
        }
        if (!p[j] && !flag[j])
            return p;
    }
    return NULL;
}

/* Logs every setting of b, other than logging, that differs from the running a. */
void hl_config_log_restart_needed(const hl_config *a, const hl_config *b)
{
    char *ta = NULL, *tb = NULL;
    size_t la = 0, lb = 0;
    FILE *fa = open_memstream(&ta, &la), *fb = open_memstream(&tb, &lb);
    if (fa && fb) {
        hl_config_dump(a, fa);
        hl_config_dump(b, fb);
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    if (ta && tb) {
        /* Compare line by line; the dump lists keys in one fixed order. */
        char *sa = ta, *sb = tb;
        while (*sa && *sb) {
            size_t na = strcspn(sa, "\n"), nb = strcspn(sb, "\n");
            bool logging = strstr(sb, "verbose:") == sb + strspn(sb, " ") ||
                           strstr(sb, "format:") == sb + strspn(sb, " ") ||
                           strstr(sb, "level:") == sb + strspn(sb, " ");
            if ((na != nb || memcmp(sa, sb, na) != 0) && sb[0] != '#' && !logging)
                hl_logf(HL_LOG_WARN, "SIGHUP: changed setting needs a restart to take effect: %.*s", (int)nb, sb);
            sa += na + (sa[na] ? 1 : 0);
            sb += nb + (sb[nb] ? 1 : 0);
        }
    }
    free(ta);
    free(tb);
}
