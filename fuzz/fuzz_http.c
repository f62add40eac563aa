/*
 * fuzz_http.c - libFuzzer harness for the HTTP listener (src/http/http.c).
 *
 * One listener on a loopback port, with a bearer token, for the whole run;
 * each input is sent as the raw bytes of a client connection (request line,
 * headers, body: whatever the fuzzer makes), then the harness reads the
 * answer. Anything but no answer or one starting with "HTTP/1." is a bug, as
 * is any crash, leak or sanitizer report in the listener's code, which parses
 * the path, Content-Length and the Authorization header of hostile requests.
 *
 *   scripts/fuzz.sh builds and runs it (fuzz/corpus/http holds the seeds).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static hl_http *listener;
static hl_state state;
static int port;

static void start_once(void)
{
    if (listener)
        return;
    char path[] = "/tmp/fuzz_http_token.XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0 || write(fd, "fuzz-token-0123456789\n", 22) != 22)
        abort();
    close(fd);
    hl_state_init(&state);
    hl_http_opts o = {.bind = "127.0.0.1:0", .request_timeout_s = 2, .auth_token_file = path};
    if (hl_http_start_opts(&listener, &o, &state) != HL_OK)
        abort();
    unlink(path);
    port = hl_http_port(listener);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    start_once();
    if (size > 65536)
        return 0;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        abort();
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        abort();
    for (size_t off = 0; off < size;) {
        ssize_t n = send(s, data + off, size - off, MSG_NOSIGNAL);
        if (n <= 0)
            break; /* the listener closed early: its right */
        off += (size_t)n;
    }
    shutdown(s, SHUT_WR);
    char buf[8192];
    size_t got = 0;
    struct pollfd p = {.fd = s, .events = POLLIN};
    /* The first bytes of an answer may take a moment; once it is there, the
     * rest follows at once (a kept-alive connection is not waited out). */
    while (got < sizeof buf && poll(&p, 1, got ? 20 : 3000) == 1) {
        ssize_t n = recv(s, buf + got, sizeof buf - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(s);
    if (got > 0 && (got < 7 || memcmp(buf, "HTTP/1.", 7) != 0))
        abort();
    return 0;
}
