#include "common/log.h"

#include "common/hlc.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static hl_log_level log_level = HL_LOG_INFO;
static bool log_json = false;
static uint64_t log_node_id = 0;

void hl_log_setup(hl_log_level level, bool format_json, uint64_t node_id)
{
    pthread_mutex_lock(&log_mu);
    log_level = level;
    log_json = format_json;
    log_node_id = node_id;
    pthread_mutex_unlock(&log_mu);
}

void hl_log_set_level(hl_log_level level)
{
    pthread_mutex_lock(&log_mu);
    log_level = level;
    pthread_mutex_unlock(&log_mu);
}

hl_log_level hl_log_get_level(void)
{
    pthread_mutex_lock(&log_mu);
    hl_log_level l = log_level;
    pthread_mutex_unlock(&log_mu);
    return l;
}

bool hl_log_enabled(hl_log_level level)
{
    return level >= hl_log_get_level();
}

int hl_log_parse_level(const char *s)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    if (strcmp(s, "warning") == 0)
        return HL_LOG_WARN;
    return -1;
}

static void put_json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (*p < 0x20)
                fprintf(f, "\\u%04x", *p);
            else
                fputc(*p, f);
        }
    }
    fputc('"', f);
}

/* Console values are quoted when they contain spaces, quotes or '='. */
static void put_console_val(FILE *f, const char *s)
{
    if (*s && !strpbrk(s, " \"=\t\n")) {
        fputs(s, f);
        return;
    }
    put_json_str(f, s);
}

static void emit(hl_log_level level, const char *msg, va_list *fields)
{
    static const char *lvl_json[] = {"debug", "info", "warn", "error"};
    static const char *lvl_con[] = {"DBG", "INF", "WRN", "ERR"};
    struct timespec ts;
    struct tm tm;
    char tbuf[40];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(tbuf + n, sizeof tbuf - n, ".%03ldZ", ts.tv_nsec / 1000000);

    FILE *f = stderr;
    pthread_mutex_lock(&log_mu);
    if (level < log_level) {
        pthread_mutex_unlock(&log_mu);
        return;
    }
    flockfile(f);
    if (log_json) {
        fprintf(f, "{\"time\":\"%s\",\"level\":\"%s\",\"msg\":", tbuf, lvl_json[level]);
        put_json_str(f, msg);
        fprintf(f, ",\"node_id\":%llu", (unsigned long long)log_node_id);
        if (fields) {
            const char *k;
            while ((k = va_arg(*fields, const char *)) != NULL) {
                const char *v = va_arg(*fields, const char *);
                fputc(',', f);
                put_json_str(f, k);
                fputc(':', f);
                put_json_str(f, v ? v : "");
            }
        }
        fputs("}\n", f);
    } else {
        fprintf(f, "%s %s %s", tbuf, lvl_con[level], msg);
        if (fields) {
            const char *k;
            while ((k = va_arg(*fields, const char *)) != NULL) {
                const char *v = va_arg(*fields, const char *);
                fprintf(f, " %s=", k);
                put_console_val(f, v ? v : "");
            }
        }
        fputc('\n', f);
    }
    fflush(f);
    funlockfile(f);
    pthread_mutex_unlock(&log_mu);
}

void hl_log(hl_log_level level, const char *msg, ...)
{
    va_list ap;
    va_start(ap, msg);
    emit(level, msg, &ap);
    va_end(ap);
}

void hl_logf(hl_log_level level, const char *fmt, ...)
{
    char buf[2048];
    if (level < hl_log_get_level())
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    emit(level, buf, NULL);
}

bool hl_ratelimit_allow(hl_ratelimit *rl, uint64_t *suppressed)
{
    uint64_t now = hl_mono_ms();
    if (rl->start == 0 || now - rl->start >= rl->window_ms) {
        rl->start = now;
        rl->count = 0;
    }
    if (rl->count >= rl->burst) {
        rl->suppressed++;
        return false;
    }
    rl->count++;
    *suppressed = rl->suppressed;
    rl->suppressed = 0;
    return true;
}
