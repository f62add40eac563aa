/*
 * fuzz_config.c - libFuzzer harness for the YAML config loader.
 *
 * Each input is written to a temporary file and loaded with
 * hl_config_load_file. Checked besides memory safety: an error is exactly one
 * line, and a configuration that loads dumps to YAML that loads back to the
 * same configuration (the dump is what `-check-config` prints).
 *
 *   scripts/fuzz.sh builds and runs it (with every source file it needs).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Writes n bytes to path (truncating); returns 0 on success. */
static int write_all(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(p, 1, n, f);
    int rc = fclose(f);
    return w == n && rc == 0 ? 0 : -1;
}

/* Returns c dumped as YAML without its first line (which names the file); caller frees. */
static char *dump_body(const hl_config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f)
        abort();
    hl_config_dump(c, f);
    fclose(f);
    char *nl = strchr(text, '\n');
    if (!nl)
        abort();
    memmove(text, nl + 1, strlen(nl + 1) + 1);
    return text;
}

static char path[64], path2[64];

/* Removes the temporary files when the fuzzer exits. */
static void cleanup(void)
{
    unlink(path);
    unlink(path2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    hl_config c, d;

    if (!path[0]) {
        snprintf(path, sizeof path, "/tmp/fuzz_config.%ld.yaml", (long)getpid());
        snprintf(path2, sizeof path2, "/tmp/fuzz_config.%ld.dump.yaml", (long)getpid());
        atexit(cleanup);
    }
    if (write_all(path, data, size) != 0)
        abort();

    hl_config_defaults(&c);
    hl_status st = hl_config_load_file(&c, path, err, sizeof err);
    if (st != HL_OK && (err[0] == 0 || strchr(err, '\n')))
        abort(); /* every error is one non-empty line */
    if (st == HL_OK) {
        char *a = dump_body(&c);
        if (write_all(path2, a, strlen(a)) != 0)
            abort();
        hl_config_defaults(&d);
        if (hl_config_load_file(&d, path2, err, sizeof err) != HL_OK) {
            fprintf(stderr, "dump does not load: %s\n%s\n", err, a);
            abort();
        }
        char *b = dump_body(&d);
        if (strcmp(a, b) != 0) {
            fprintf(stderr, "dump does not round-trip:\n%s\n---\n%s\n", a, b);
            abort();
        }
        free(a);
        free(b);
        hl_config_free(&d);
        /* finish must not crash on whatever the file held */
        st = hl_config_finish_host(&c, "harmonylite-0", err, sizeof err);
        if (st != HL_OK && (err[0] == 0 || strchr(err, '\n')))
            abort();
    }
    hl_config_free(&c);
    return 0;
}
