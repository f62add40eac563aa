/*
 * engine.h - the engine thread: owns the database connection and runs the
 * capture -> outbox -> publish and fetch -> apply loop until a stop signal.
 */
#ifndef HL_ENGINE_H
#define HL_ENGINE_H

#include "common/status.h"
#include <stddef.h>

#include "config/config.h"

/* Re-reads the configuration the way the process was started (file, environment,
 * flags) into out; on error writes a one-line message to err. Used on SIGHUP. */
typedef hl_status (*hl_config_loader)(hl_config *out, char *err, size_t errlen);

/* Runs harmonylite with configuration c until SIGTERM/SIGINT. reload may be
 * NULL. Returns the process exit code (0 after a graceful stop). */
int hl_engine_run(hl_config *c, hl_config_loader reload);

#endif
