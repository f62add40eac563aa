/*
 * discovery.h - the embedded server's peers from DNS (c-ares).
 *
 * nats.cluster_peers entries of the forms
 *
 *   dns+srv://_<port-name>._tcp.<service>   SRV: one route per target, by the
 *                                           target's host name and port
 *   dns://<name>:<port>                     A/AAAA: one route per address
 *
 * are looked up every nats.discovery_interval seconds on a thread of their
 * own, merged with the plain nats:// entries and nats.leaf_servers into a
 * peer set (server.h), and a changed set is applied to the running
 * nats-server with a config reload. A lookup that fails or answers nothing
 * keeps that entry's last good answer (logged once until it answers again).
 * This node's own cluster address is left out. Every name from DNS is checked
 * strictly (hl_discovery_valid_host) before it goes near the server config.
 */
#ifndef HL_NATSIO_DISCOVERY_H
#define HL_NATSIO_DISCOVERY_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"
#include "config/config.h"
#include "natsio/server.h"

/* Most routes one entry's answer may contribute; the rest is ignored (logged).
 * A DNS answer is network input: its size bounds the generated config. */
#define HL_DISCOVERY_MAX_ANSWERS 256

typedef enum hl_dns_kind { HL_DNS_SRV, HL_DNS_ADDR } hl_dns_kind;

typedef struct hl_dns_entry {
    hl_dns_kind kind;
    char name[254]; /* the name looked up, without a trailing dot */
    int port;       /* HL_DNS_ADDR: the route port; HL_DNS_SRV: 0 (each target has its own) */
} hl_dns_entry;

/* True when v is a dns:// or dns+srv:// entry (checked or not). */
bool hl_discovery_is_dns(const char *v);

/* Parses a dns:// or dns+srv:// entry. HL_ERR_CONFIG when it is malformed. */
hl_status hl_discovery_parse_entry(const char *v, hl_dns_entry *out);

/*
 * A host name fit for a route URL: 1..253 characters of labels of 1..63
 * letters, digits and '-' (not first or last) separated by single dots, one
 * trailing dot allowed. Everything else (quotes, spaces, control characters,
 * '\', '@', ':', '/', '_', empty labels) is refused: a name from DNS must not be
 * able to add text to the nats-server config or change the URL it goes into.
 */
bool hl_discovery_valid_host(const char *name);

/*
 * Turns a raw SRV answer (a whole DNS message) into route URLs
 * "nats://<target>:<port>" added to out, target lowercased and without its
 * trailing dot. Targets that fail hl_discovery_valid_host, the "." target
 * (service decidedly not available) and port 0 are skipped and counted in
 * *rejected. Returns HL_ERR_NOT_FOUND for an answer without any SRV record,
 * HL_ERR_INVALID for a malformed message.
 */
hl_status hl_discovery_srv_routes(const unsigned char *abuf, int alen, hl_peer_set *out, size_t *rejected);

/* The same for an A (ipv6 false) or AAAA answer: "nats://<address>:<port>"
 * ("nats://[<v6>]:<port>") per address. */
hl_status hl_discovery_addr_routes(const unsigned char *abuf, int alen, bool ipv6, int port, hl_peer_set *out);

typedef struct hl_discovery hl_discovery;

/*
 * Starts discovery for c when nats.cluster_peers holds a DNS entry (*out stays
 * NULL otherwise: the peer set is hl_peer_set_from_config(c)). Returns once
 * nats.cluster_min_peers peers other than this node are known, or with
 * HL_ERR_STOPPED when *stop becomes non-zero first. c must outlive it.
 */
hl_status hl_discovery_start(hl_discovery **out, const hl_config *c, const volatile int *stop);

/* The current peer set (copy). With d NULL: hl_peer_set_from_config(c). */
hl_status hl_discovery_peers(hl_discovery *d, const hl_config *c, hl_peer_set *out);

/* From now on changes are applied to srv (reload). srv must stay valid until
 * hl_discovery_stop(). NULL d is a no-op. */
void hl_discovery_attach(hl_discovery *d, hl_nats_server *srv);

/* Stops the thread (an ongoing lookup is cancelled) and frees d. NULL is a no-op. */
void hl_discovery_stop(hl_discovery *d);

#endif
