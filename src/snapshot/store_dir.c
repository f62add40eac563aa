/*
 * store_dir.c - snapshots in a directory (local disk, NFS, a mounted volume).
 *
 * put writes ".<name>.tmp-XXXXXX" in the directory, fsyncs it, renames it to
 * name and fsyncs the directory: a crash leaves either the old state or the
 * whole new file, never a partial one under its final name. Dot files are
 * never listed (hl_snapshot_name_ok refuses them), so leftovers of a crash are
 * invisible to readers.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "snapshot/manifest.h"
#include "snapshot/store.h"

#define COPY_CHUNK (1u << 20)

typedef struct dir_store {
    hl_store base;
    char *dir;
} dir_store;

/* dir/name into buf; false when it does not fit. */
static int path_of(const dir_store *d, const char *name, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "%s/%s", d->dir, name);
    return n > 0 && (size_t)n < cap;
}

static hl_status dir_fsync(const dir_store *d, char *err, size_t errlen)
{
    int fd = open(d->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
        snprintf(err, errlen, "dir store %s: fsync of the directory: %s", d->dir, strerror(errno));
        if (fd >= 0)
            close(fd);
        return HL_ERR_IO;
    }
    close(fd);
    return HL_OK;
}

static hl_status dir_put(hl_store *s, const char *name, const hl_store_src *src, char *err, size_t errlen)
{
    dir_store *d = (dir_store *)s;
    char tmp[4096], final[4096];
    hl_status st = HL_OK;
    char *chunk = NULL;
    int fd = -1;
    if (!hl_snapshot_name_ok(name) || !path_of(d, name, final, sizeof final) ||
        snprintf(tmp, sizeof tmp, "%s/.%s.tmp-XXXXXX", d->dir, name) >= (int)sizeof tmp) {
        snprintf(err, errlen, "dir store %s: bad name \"%s\"", d->dir, name);
        return HL_ERR_INVALID;
    }
    fd = mkostemp(tmp, O_CLOEXEC);
    if (fd >= 0)
        fchmod(fd, hl_store_created_mode());
    if (fd < 0) {
        snprintf(err, errlen, "dir store %s: cannot create a file: %s", d->dir, strerror(errno));
        return HL_ERR_IO;
    }
    hl_progress pr;
    hl_progress_start(&pr, "upload", name, src->size);
    if (src->fd < 0) {
        st = hl_store_write_all(fd, src->mem, (size_t)src->size);
    } else {
        chunk = malloc(COPY_CHUNK);
        if (!chunk) {
            st = HL_ERR_NOMEM;
            goto fail;
        }
        for (uint64_t off = 0; off < src->size && !st;) {
            size_t want = src->size - off < COPY_CHUNK ? (size_t)(src->size - off) : COPY_CHUNK;
            ssize_t r = pread(src->fd, chunk, want, (off_t)off);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                snprintf(err, errlen, "dir store: reading the source at %llu: %s", (unsigned long long)off,
                         r < 0 ? strerror(errno) : "unexpected end of file");
                st = HL_ERR_IO;
                goto fail;
            }
            st = hl_store_write_all(fd, chunk, (size_t)r);
            off += (uint64_t)r;
            hl_progress_update(&pr, off);
        }
    }
    if (st || fsync(fd) != 0) {
        snprintf(err, errlen, "dir store %s: writing %s: %s", d->dir, name, strerror(errno));
        st = HL_ERR_IO;
        goto fail;
    }
    if (close(fd) != 0) {
        fd = -1;
        snprintf(err, errlen, "dir store %s: closing %s: %s", d->dir, name, strerror(errno));
        st = HL_ERR_IO;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, final) != 0) {
        snprintf(err, errlen, "dir store %s: renaming into %s: %s", d->dir, name, strerror(errno));
        st = HL_ERR_IO;
        goto fail;
    }
    free(chunk);
    return dir_fsync(d, err, errlen);
fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    free(chunk);
    return st ? st : HL_ERR_IO;
}

static hl_status dir_get(hl_store *s, const char *name, uint64_t max, hl_store_sink sink, void *ctx, char *err,
                         size_t errlen)
{
    dir_store *d = (dir_store *)s;
    char path[4096];
    hl_status st = HL_OK;
    if (!hl_snapshot_name_ok(name) || !path_of(d, name, path, sizeof path)) {
        snprintf(err, errlen, "dir store %s: bad name \"%s\"", d->dir, name);
        return HL_ERR_INVALID;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "dir store %s: %s: %s", d->dir, name, strerror(errno));
        return errno == ENOENT ? HL_ERR_NOT_FOUND : HL_ERR_IO;
    }
    struct stat sb;
    uint64_t total = fstat(fd, &sb) == 0 ? (uint64_t)sb.st_size : 0;
    char *chunk = malloc(COPY_CHUNK);
    if (!chunk) {
        close(fd);
        return HL_ERR_NOMEM;
    }
    hl_progress pr;
    hl_progress_start(&pr, "download", name, total);
    uint64_t done = 0;
    for (;;) {
        ssize_t r = read(fd, chunk, COPY_CHUNK);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(err, errlen, "dir store %s: reading %s: %s", d->dir, name, strerror(errno));
            st = HL_ERR_IO;
            break;
        }
        if (r == 0)
            break;
        if ((uint64_t)r > max - done) {
            snprintf(err, errlen, "dir store %s: %s is larger than the %llu bytes expected", d->dir, name,
                     (unsigned long long)max);
            st = HL_ERR_TOO_LARGE;
            break;
        }
        done += (uint64_t)r;
        if ((st = sink(ctx, chunk, (size_t)r)))
            break;
        hl_progress_update(&pr, done);
    }
    free(chunk);
    close(fd);
    return st;
}

static hl_status dir_list(hl_store *s, hl_store_names *out, char *err, size_t errlen)
{
    dir_store *d = (dir_store *)s;
    size_t cap = 0;
    memset(out, 0, sizeof *out);
    DIR *dp = opendir(d->dir);
    if (!dp) {
        snprintf(err, errlen, "dir store %s: %s", d->dir, strerror(errno));
        return HL_ERR_IO;
    }
    struct dirent *e;
    while ((e = readdir(dp)) != NULL && out->n < HL_STORE_LIST_MAX) {
        if (!hl_snapshot_name_ok(e->d_name))
            continue;
        if (out->n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nv = realloc(out->v, cap * sizeof *nv);
            if (!nv)
                goto nomem;
            out->v = nv;
        }
        if (!(out->v[out->n] = strdup(e->d_name)))
            goto nomem;
        out->n++;
    }
    closedir(dp);
    if (out->n)
        hl_store_names_sort(out);
    return HL_OK;
nomem:
    closedir(dp);
    hl_store_names_free(out);
    snprintf(err, errlen, "dir store: out of memory");
    return HL_ERR_NOMEM;
}

static hl_status dir_del(hl_store *s, const char *name, char *err, size_t errlen)
{
    dir_store *d = (dir_store *)s;
    char path[4096];
    if (!hl_snapshot_name_ok(name) || !path_of(d, name, path, sizeof path)) {
        snprintf(err, errlen, "dir store %s: bad name \"%s\"", d->dir, name);
        return HL_ERR_INVALID;
    }
    if (unlink(path) != 0 && errno != ENOENT) {
        snprintf(err, errlen, "dir store %s: removing %s: %s", d->dir, name, strerror(errno));
        return HL_ERR_IO;
    }
    return HL_OK;
}

static void dir_destroy(hl_store *s)
{
    dir_store *d = (dir_store *)s;
    free(d->dir);
    free(d);
}

static const hl_store_ops dir_ops = {dir_put, dir_get, dir_list, dir_del, dir_destroy};

hl_status hl_store_dir_open(hl_store **out, const char *dir, char *err, size_t errlen)
{
    struct stat sb;
    *out = NULL;
    errno = 0;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        snprintf(err, errlen, "snapshot.dir: expected an existing directory, got \"%s\" (%s)", dir,
                 errno ? strerror(errno) : "not a directory");
        return HL_ERR_CONFIG;
    }
    dir_store *d = calloc(1, sizeof *d);
    if (!d || !(d->dir = strdup(dir))) {
        free(d);
        snprintf(err, errlen, "dir store: out of memory");
        return HL_ERR_NOMEM;
    }
    d->base.ops = &dir_ops;
    snprintf(d->base.where, sizeof d->base.where, "%s%s", dir, dir[0] && dir[strlen(dir) - 1] == '/' ? "" : "/");
    *out = &d->base;
    return HL_OK;
}
