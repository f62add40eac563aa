/*
 * signals.c - a thread of its own for the process's signals.
 *
 * SIGTERM/SIGINT ask for a graceful stop (a second one exits at once);
 * SIGHUP re-reads the configuration: the log level and format change at run
 * time, other changed settings are logged as needing a restart. SIGPIPE is
 * ignored. Every other thread keeps these signals blocked.
 */
#include "signals.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"

static atomic_int stop_signals;
static volatile int stop_flag; /* polled by blocking NATS setup loops */
static atomic_bool stop_self;  /* the process stops itself (sleep_timeout) as for one stop signal */
static hl_queue *_Atomic signal_queue;
static hl_config_loader signal_reload;
static const hl_config *signal_current; /* the running configuration (read-only) */
static sigset_t handled;                /* read by the signal thread for the life of the process */

static const char *level_name(int l)
{
    static const char *const n[] = {"debug", "info", "warn", "error"};
    return l >= 0 && l < 4 ? n[l] : "info";
}

/* SIGHUP: re-read the configuration; the log level and format change at run
 * time, other keys need a restart and are reported as such. */
static void reload_config(void)
{
    hl_config nc;
    char err[1024] = "";
    if (!signal_reload) {
        hl_infof("SIGHUP: no configuration source to reload");
        return;
    }
    hl_config_defaults(&nc);
    if (signal_reload(&nc, err, sizeof err)) {
        hl_errorf("SIGHUP: configuration not reloaded: %s", err);
        hl_config_free(&nc);
        return;
    }
    int level = nc.logging.verbose ? HL_LOG_DEBUG : hl_log_parse_level(nc.logging.level);
    if (level < 0)
        level = HL_LOG_INFO;
    int old = hl_log_get_level();
    bool json = strcmp(nc.logging.format, "json") == 0;
    hl_log_setup((hl_log_level)level, json, nc.node_id);
    if (old != level)
        hl_log(HL_LOG_INFO, "SIGHUP: log level changed", "from", level_name(old), "to", level_name(level), NULL);
    else
        hl_log(HL_LOG_INFO, "SIGHUP: configuration re-read; log level unchanged", "level", level_name(level), NULL);
    if (signal_current)
        hl_config_log_restart_needed(signal_current, &nc);
    hl_config_free(&nc);
}

static void *signal_thread(void *arg)
{
    sigset_t *set = arg;
    for (;;) {
        int sig = 0;
        if (sigwait(set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            reload_config();
            continue;
        }
        if (atomic_fetch_add(&stop_signals, 1) > 0) {
            hl_warnf("second stop signal: exiting at once");
            _exit(1);
        }
        hl_logf(HL_LOG_INFO, "received %s: stopping gracefully", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        stop_flag = 1;
        hl_queue *q = atomic_load(&signal_queue);
        if (q)
            hl_queue_wake(q);
    }
    return NULL;
}

bool hl_signals_stopping(void)
{
    return atomic_load(&stop_signals) > 0 || atomic_load(&stop_self);
}

void hl_signals_stop_self(void)
{
    atomic_store(&stop_self, true);
    stop_flag = 1;
    hl_queue *q = atomic_load(&signal_queue);
    if (q)
        hl_queue_wake(q);
}

void hl_signals_block(void)
{
    sigemptyset(&handled);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGHUP);
    sigaddset(&handled, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &handled, NULL); /* every thread created from here inherits it */
    sigdelset(&handled, SIGPIPE);
}

void hl_signals_start(hl_queue *wake, hl_config_loader reload, const hl_config *running)
{
    pthread_t th;
    atomic_store(&signal_queue, wake);
    signal_reload = reload;
    signal_current = running;
    if (pthread_create(&th, NULL, signal_thread, &handled) == 0)
        pthread_detach(th);
    else
        hl_errorf("cannot start the signal thread: SIGTERM will not stop gracefully");
}

void hl_signals_forget_queue(void)
{
    atomic_store(&signal_queue, NULL);
}

void hl_signals_request_stop(void)
{
    stop_flag = 1;
}

const volatile int *hl_signals_stop_flag(void)
{
    return &stop_flag;
}
