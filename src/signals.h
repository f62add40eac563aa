/*
 * signals.h - SIGTERM/SIGINT (graceful stop; a second one exits at once),
 * SIGHUP (re-read the configuration), SIGPIPE (ignored), on a thread of their
 * own.
 */
#ifndef HL_SIGNALS_H
#define HL_SIGNALS_H

#include <stdbool.h>

#include "config/config.h"
#include "engine.h"
#include "repl/queue.h"

/* Blocks the signals in the calling thread and every thread it creates from
 * then on: call it before any other thread is started. */
void hl_signals_block(void);
/* Starts the signal thread: a stop signal wakes wake (may be NULL); SIGHUP
 * reloads with reload (may be NULL) and compares with running. */
void hl_signals_start(hl_queue *wake, hl_config_loader reload, const hl_config *running);
/* The queue is about to be destroyed: signals no longer wake it. */
void hl_signals_forget_queue(void);
/* True once a stop signal arrived. */
bool hl_signals_stopping(void);
/* Stops the process gracefully as one stop signal would (sleep_timeout): hl_signals_stopping()
 * turns true and the engine is woken; a later SIGTERM still counts as the first. */
void hl_signals_stop_self(void);
/* Makes the stop flag read by blocking loops (NATS setup) true. */
void hl_signals_request_stop(void);
/* The flag blocking loops poll (hl_nats_connect, hl_nats_ensure_streams). */
const volatile int *hl_signals_stop_flag(void);

#endif
