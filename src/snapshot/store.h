/*
 * store.h - where snapshots go: one small interface, one file per kind.
 *
 *   store_dir.c  a local or mounted directory (temp file, fsync, rename, fsync dir)
 *   store_s3.c   an S3-compatible bucket through libcurl (SigV4, multipart)
 *   store_sftp.c a directory on an SSH server through libcurl (known_hosts checked)
 *   store_webdav.c a WebDAV collection through libcurl (PUT, MOVE, PROPFIND)
 *   store_nats.c a NATS object store (JetStream), in the layout nats.go and the nats CLI use
 *
 * A store holds flat names (hl_snapshot_name_ok) under its location. Every
 * call is synchronous and used from one thread. Errors are written to err as
 * one line without secrets; the caller decides whether to retry.
 */
#ifndef HL_SNAPSHOT_STORE_H
#define HL_SNAPSHOT_STORE_H

#include <sys/types.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "config/config.h"

/* What to upload: size bytes, read with pread from fd, or from mem when fd < 0. */
typedef struct hl_store_src {
    int fd;
    const void *mem;
    uint64_t size;
} hl_store_src;

/* Receives downloaded bytes in order; a non-OK status aborts the download. */
typedef hl_status (*hl_store_sink)(void *ctx, const void *data, size_t n);

/* Names found by list, owned by the list. */
typedef struct hl_store_names {
    char **v;
    size_t n;
} hl_store_names;
void hl_store_names_free(hl_store_names *l);
/* Sorts the names (byte order: snapshot names sort by creation time), as every list returns them. */
void hl_store_names_sort(hl_store_names *l);

typedef struct hl_store hl_store;

typedef struct hl_store_ops {
    /* Stores src under name; readers never see a partial object under name. */
    hl_status (*put)(hl_store *s, const char *name, const hl_store_src *src, char *err, size_t errlen);
    /* Streams the object to sink; at most max bytes (more is an error, HL_ERR_TOO_LARGE).
     * HL_ERR_NOT_FOUND when there is no such object. */
    hl_status (*get)(hl_store *s, const char *name, uint64_t max, hl_store_sink sink, void *ctx, char *err,
                     size_t errlen);
    /* Every valid name in the store (others are ignored), at most HL_STORE_LIST_MAX. */
    hl_status (*list)(hl_store *s, hl_store_names *out, char *err, size_t errlen);
    /* Removes name; a name that does not exist is not an error. */
    hl_status (*del)(hl_store *s, const char *name, char *err, size_t errlen);
    void (*destroy)(hl_store *s);
} hl_store_ops;

struct hl_store {
    const hl_store_ops *ops;
    char where[512]; /* location the names follow, for messages: "/backups/app/" or "s3://bucket/prefix/"; no secrets */
};

#define HL_STORE_LIST_MAX 100000 /* names a list returns at most; the rest are ignored */

/*
 * Opens the store configured in c->snapshot. Checks what the chosen kind
 * needs and reports a missing or wrong setting as "<key>: expected ..." in
 * err (HL_ERR_CONFIG). The caller owns *out and frees it with hl_store_close.
 */
hl_status hl_store_open(hl_store **out, const hl_config *c, char *err, size_t errlen);
void hl_store_close(hl_store *s); /* NULL is a no-op */

/* curl_global_init once per process (the stores run on the main thread, before any other). */
hl_status hl_store_curl_init(char *err, size_t errlen);
/* Its counterpart, when no store is open any more (also releases libssh2's and OpenSSL's state). */
void hl_store_curl_cleanup(void);

hl_status hl_store_dir_open(hl_store **out, const char *dir, char *err, size_t errlen);
hl_status hl_store_s3_open(hl_store **out, const hl_config *c, char *err, size_t errlen);
hl_status hl_store_sftp_open(hl_store **out, const hl_config *c, char *err, size_t errlen);
hl_status hl_store_webdav_open(hl_store **out, const hl_config *c, char *err, size_t errlen);
hl_status hl_store_nats_open(hl_store **out, const hl_config *c, char *err, size_t errlen);

/* Makes every curl transfer in progress fail at its next progress call (about once a second,
 * also while the server says nothing) and every later upload retry give up: a running node that
 * stops does not wait for a store that hangs. For the process's lifetime. */
void hl_store_cancel(void);
bool hl_store_cancelled(void);

/* Progress of a transfer: logs bytes, rate and ETA every few seconds once it has taken more than a few. */
typedef struct hl_progress {
    const char *what; /* "upload", "download" */
    const char *name;
    uint64_t total; /* 0: unknown */
    uint64_t start_ms, last_ms;
} hl_progress;
void hl_progress_start(hl_progress *p, const char *what, const char *name, uint64_t total);
void hl_progress_update(hl_progress *p, uint64_t done);

/* The mode a file created with open(2) would get (0666 less the umask): mkstemp
 * gives 0600, which would lock out a reader running as another user of the group. */
mode_t hl_store_created_mode(void);
/* Writes all n bytes to fd (retrying short writes and EINTR); HL_ERR_IO otherwise. */
hl_status hl_store_write_all(int fd, const void *p, size_t n);

#endif
