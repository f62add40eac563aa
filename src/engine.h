/*
 * engine.h - the engine thread: owns the database connection and runs the
 * capture -> outbox -> publish and fetch -> apply loop until a stop signal.
 */
#ifndef HL_ENGINE_H
#define HL_ENGINE_H

#include "common/status.h"
#include "config/config.h"

/* Runs harmonylite with configuration c until SIGTERM/SIGINT. Returns the
 * process exit code (0 after a graceful stop). */
int hl_engine_run(hl_config *c);

#endif
