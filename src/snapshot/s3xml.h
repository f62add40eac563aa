/*
 * s3xml.h - the few things harmonylite reads from S3's XML responses.
 *
 * There is no XML library among our dependencies, and S3 answers are simple:
 * elements without attributes that matter, text with the five predefined
 * entities and numeric character references. These functions find an
 * element's text by tag name and unescape it, bounded everywhere: the input
 * is a length, every output has a capacity, and anything malformed is
 * refused rather than guessed at. The response may come from any server the
 * configuration names, so it is hostile input (fuzz/fuzz_s3xml.c).
 */
#ifndef HL_SNAPSHOT_S3XML_H
#define HL_SNAPSHOT_S3XML_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"
#include "snapshot/store.h"

/*
 * Finds the text of the first <tag>...</tag> at or after *pos in xml[0..len)
 * and writes it, unescaped and NUL-terminated, to out (capacity cap). *pos
 * moves past the closing tag. Returns 1 when found, 0 when there is no such
 * element, -1 when it is malformed, holds markup (a nested element) or does
 * not fit in out.
 */
int hl_s3xml_text(const char *xml, size_t len, size_t *pos, const char *tag, char *out, size_t cap);

/*
 * Parses one ListObjectsV2 result page: appends to names every <Key> inside a
 * <Contents> that starts with prefix, without the prefix, when what is left is
 * a valid snapshot name (hl_snapshot_name_ok); other keys are ignored. At most
 * HL_STORE_LIST_MAX names in all. *truncated and token (capacity tokcap) get
 * IsTruncated and NextContinuationToken. HL_ERR_DECODE when the page is
 * malformed, HL_ERR_NOMEM when out of memory.
 */
hl_status hl_s3xml_list(const char *xml, size_t len, const char *prefix, hl_store_names *names, bool *truncated,
                        char *token, size_t tokcap);

/*
 * Calls fn with the unescaped text of every element whose local name is
 * local (any namespace prefix: <D:href>, <d:href>, <href>) in xml[0..len),
 * in document order, for WebDAV's PROPFIND answers. Text longer than
 * cap - 1 bytes, markup inside the element or a missing closing tag is
 * malformed: HL_ERR_DECODE. A non-OK status from fn stops and is returned.
 * At most max_items calls; more is HL_ERR_TOO_LARGE.
 */
hl_status hl_xml_each(const char *xml, size_t len, const char *local, size_t cap, size_t max_items,
                      hl_status (*fn)(void *ctx, const char *text), void *ctx);

#endif
