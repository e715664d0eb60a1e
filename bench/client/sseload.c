/* sseload: many-connection SSE load client for the benchmark suite.
 *
 * One thread, one epoll set (level-triggered), nonblocking sockets. Every connection sends
 * `GET <path> HTTP/1.1`, decodes the response body (chunked per RFC 9112 section 7.1,
 * Content-Length, or identity until EOF) and parses it as an SSE stream per the WHATWG HTML
 * "Server-sent events" section 9.2.6 (lines end in CRLF, LF or CR; a blank line dispatches;
 * lines starting with ':' are comments; fields event/data/id/retry). For every event whose data
 * contains `"ts":<digits>` (ns since the epoch, CLOCK_REALTIME, see bench/targets/__init__.py)
 * it records receive time - ts into a log-linear histogram (hist.h), where the receive time is
 * CLOCK_REALTIME read when the read() carrying the event's last byte returned.
 *
 * Phases: connect (connections started at --rate, at most --concurrency in flight, each
 * settled as ready or failed within --connect-timeout), then measure (--duration s, the first
 * --warmup s of which are not counted). Events, bytes and latencies count only inside the
 * counted window; `event: close` frames and server-side closes count over the whole run.
 * `event: ephemeral` frames (PROTOCOL.md §5) are events like any other and are also counted on
 * their own; `event: presence` frames are not events: they are counted apart (frames, data
 * bytes, frames per connection, the shortest gap between two on one connection), without
 * latency. The result is one JSON object on stdout; progress lines go to stderr.
 *
 * One read buffer is shared by all connections and parsed in place; per connection only the
 * parser states (chunk framing, SSE line, `"ts":` match) are kept, in a small struct.
 *
 * Exit status: 0 after a run (whatever its outcome), 2 on bad arguments, 1 on a setup failure
 * (host lookup, epoll, out of memory).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hist.h"

#define READ_BUF_BYTES (256 * 1024)
#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_EVENTS 1024
#define MAX_ERROR_KINDS 64
#define MAX_SOURCE_IPS 64

/* ---- connection state ------------------------------------------------------------------ */

enum conn_state { C_IDLE, C_CONNECTING, C_SENDING, C_HEADERS, C_BODY, C_STALLED, C_CLOSED };
enum body_mode { B_EOF, B_LENGTH, B_CHUNKED };
enum chunk_state {
    K_SIZE, K_EXT, K_SIZE_LF, K_DATA, K_DATA_CR, K_DATA_LF, K_TRAILER, K_TRAILER_LINE,
    K_TRAILER_LF, K_DONE
};
enum sse_state { S_LINE, S_AFTER_CR, S_NAME, S_VALUE_START, S_VALUE, S_SKIP };
enum sse_field { F_OTHER, F_DATA, F_EVENT };
/* `"ts":` matcher: 0 = searching, 1..4 = that many pattern bytes matched, then: */
enum { TS_SPACE = 5, TS_DIGITS = 6, TS_FOUND = 7 };

#define CF_READY 0x01u  /* ready marker seen (or headers complete without a marker) */
#define CF_FAILED 0x02u /* never became ready */
#define CF_SLOW 0x04u   /* stops reading once ready */
#define EV_DATA 0x01u   /* the event has a data field */
#define EV_CLOSE 0x02u  /* its event type is "close" */
#define EV_EPHEMERAL 0x04u /* its event type is "ephemeral" */
#define EV_PRESENCE 0x08u  /* its event type is "presence" */
#define EV_NAME_BYTES 9    /* longest event type told apart: "ephemeral" */

struct conn {
    int fd;
    uint8_t state, flags, body_mode, chunk_state;
    uint8_t sse_state, field, name_len, ts_state;
    uint8_t ts_digits, ev_flags, ev_len, chunk_digits;
    char name[6];
    char ev_name[EV_NAME_BYTES]; /* the event type's first bytes; ev_len counts to 255 */
    uint32_t ev_data_bytes;      /* bytes of the event's data so far (lines joined by LF) */
    uint32_t presence;           /* presence frames in the counted window */
    int64_t presence_last_ns;    /* CLOCK_MONOTONIC of the last one counted, 0 = none */
    uint16_t marker_pos; /* bytes of the ready marker matched so far */
    uint32_t sent;       /* request bytes written */
    uint32_t path;       /* index into the request table */
    uint64_t remaining;  /* chunk bytes left (B_CHUNKED) or body bytes left (B_LENGTH) */
    uint64_t ts;
    int64_t started_ns;  /* CLOCK_MONOTONIC at connect() */
    char *hdr;           /* response head being collected, freed once complete */
    uint32_t hdr_len, hdr_cap;
};

/* ---- options and run-wide state ----------------------------------------------------------- */

struct options {
    const char *host, *port, *paths_file, *ready_marker, *histogram_out;
    long connections, concurrency;
    double rate, slow_fraction, duration_s, warmup_s, connect_timeout_s, progress_s;
    char **headers;
    int n_headers;
    char *source_ips;
};

struct error_kind {
    char name[48];
    uint64_t count;
};

static struct {
    struct options o;
    struct conn *conns;
    char **requests;
    uint32_t *request_len;
    long n_requests;
    struct sockaddr_storage dst;
    socklen_t dst_len;
    struct sockaddr_storage src[MAX_SOURCE_IPS];
    socklen_t src_len[MAX_SOURCE_IPS];
    int n_src;
    uint32_t port_lo, port_span, port_cursor[MAX_SOURCE_IPS + 1];
    int port_windows; /* IP_LOCAL_PORT_RANGE works */
    long slow_every; /* 0 = no slow connections */
    const char *marker;
    size_t marker_len;
    int *marker_fail; /* KMP failure table */
    int epfd;
    char *rbuf;

    long started, pending, ready, failed, open, next_timeout_check;
    int64_t t0_ns, first_start_ns, last_ready_ns;
    int measuring, counting;
    int64_t measure_start_ns, count_start_ns, measure_end_ns;

    uint64_t events, bytes, close_events, closed_healthy, closed_slow, negative;
    uint64_t interval_events;
    uint64_t ephemeral_events, presence_events, presence_bytes, interval_presence;
    uint64_t presence_run_events, presence_run_bytes; /* over the whole run */
    int64_t presence_min_gap_ns; /* shortest gap between presence frames on one connection */
    struct hist latency, interval_latency, connect;
    struct error_kind errors[MAX_ERROR_KINDS];
    int n_errors;
} g;

static volatile sig_atomic_t g_stop;

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void count_error(const char *prefix, const char *what)
{
    char name[48];
    snprintf(name, sizeof name, "%s%s", prefix, what);
    for (int i = 0; i < g.n_errors; i++) {
        if (strcmp(g.errors[i].name, name) == 0) {
            g.errors[i].count++;
            return;
        }
    }
    if (g.n_errors < MAX_ERROR_KINDS - 1) {
        snprintf(g.errors[g.n_errors].name, sizeof name, "%s", name);
        g.errors[g.n_errors++].count = 1;
    } else { /* table full: the last slot counts every further kind */
        snprintf(g.errors[MAX_ERROR_KINDS - 1].name, sizeof name, "other");
        g.errors[MAX_ERROR_KINDS - 1].count++;
        g.n_errors = MAX_ERROR_KINDS;
    }
}

static void count_errno(const char *prefix, int err)
{
    const char *name = strerrorname_np(err);
    char num[16];
    if (name == NULL) {
        snprintf(num, sizeof num, "errno%d", err);
        name = num;
    }
    count_error(prefix, name);
}

/* ---- connection lifecycle ----------------------------------------------------------------- */

static void conn_close(struct conn *c)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
        g.open--;
    }
    free(c->hdr);
    c->hdr = NULL;
    c->hdr_len = c->hdr_cap = 0;
    c->state = C_CLOSED;
}

/* The connection never became ready: count `kind` and close it. */
static void conn_fail(struct conn *c, const char *prefix, const char *kind)
{
    count_error(prefix, kind);
    c->flags |= CF_FAILED;
    g.failed++;
    g.pending--;
    conn_close(c);
}

static void conn_fail_errno(struct conn *c, const char *prefix, int err)
{
    count_errno(prefix, err);
    c->flags |= CF_FAILED;
    g.failed++;
    g.pending--;
    conn_close(c);
}

/* The stream ended after the connection became ready (EOF, reset, or end of the response). */
static void conn_closed_by_server(struct conn *c)
{
    if (c->flags & CF_SLOW)
        g.closed_slow++;
    else
        g.closed_healthy++;
    conn_close(c);
}

/* The stream ended, either before or after ready; `err` 0 = orderly end. */
static void conn_ended(struct conn *c, int err)
{
    if (c->flags & CF_READY) {
        if (err != 0 && err != ECONNRESET && err != EPIPE)
            count_errno("read_", err);
        conn_closed_by_server(c);
    } else if (err != 0) {
        conn_fail_errno(c, "read_", err);
    } else {
        conn_fail(c, "", c->state == C_HEADERS ? "eof_before_headers" : "eof_before_ready");
    }
}

static void conn_ready(struct conn *c)
{
    int64_t now = now_ns(CLOCK_MONOTONIC);
    c->flags |= CF_READY;
    g.ready++;
    g.pending--;
    g.last_ready_ns = now;
    hist_record(&g.connect, (uint64_t)(now - c->started_ns));
}

static int epoll_set(struct conn *c, int op, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(c - g.conns)};
    return epoll_ctl(g.epfd, op, c->fd, &ev);
}

/* Local port choice. Left alone, connect() searches the whole ephemeral range for a free port
 * and checks each candidate against the established connections: O(open connections) per
 * connect, which caps connects at ~2k/s past 15k connections to one destination. Instead every
 * connect gets a narrow window of the range (IP_LOCAL_PORT_RANGE, Linux >= 6.3) that slides
 * by one port per connect, so the kernel finds a free port in a few probes. Each source
 * address has its own cursor, starting at a per-process offset so parallel processes overlap
 * little; a full window (EADDRNOTAVAIL) moves the cursor on by a window and retries. */
#ifndef IP_LOCAL_PORT_RANGE
#define IP_LOCAL_PORT_RANGE 51
#endif
#define PORT_WINDOW 64u

static void read_port_range(void)
{
    unsigned lo = 32768, hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f != NULL) {
        if (fscanf(f, "%u %u", &lo, &hi) != 2 || lo == 0 || hi <= lo || hi > 65535) {
            lo = 32768;
            hi = 60999;
        }
        fclose(f);
    }
    g.port_lo = lo;
    g.port_span = hi - lo + 1;
    uint32_t start = ((uint32_t)getpid() * 2654435761u) % g.port_span;
    for (int s = 0; s <= MAX_SOURCE_IPS; s++)
        g.port_cursor[s] = start + (uint32_t)s * 7919u;
}

/* Restrict `fd`'s local port to the next window of source `s`. */
static void set_port_window(int fd, int s, uint32_t advance)
{
    if (!g.port_windows || g.port_span <= PORT_WINDOW)
        return;
    uint32_t off = g.port_cursor[s] % g.port_span;
    g.port_cursor[s] += advance;
    if (off > g.port_span - PORT_WINDOW)
        off = g.port_span - PORT_WINDOW;
    uint32_t lo = g.port_lo + off, hi = lo + PORT_WINDOW - 1;
    uint32_t range = lo | hi << 16;
    if (setsockopt(fd, IPPROTO_IP, IP_LOCAL_PORT_RANGE, &range, sizeof range) < 0)
        g.port_windows = 0; /* older kernel: fall back to the kernel's own search */
}

/* A nonblocking socket with its connect() under way, or -1 with errno set (errno_where names
 * the call that failed). */
static int open_socket(long i, const char **errno_where)
{
    int s = g.n_src > 0 ? (int)(i % g.n_src) : MAX_SOURCE_IPS;
    uint32_t attempts = g.port_span / PORT_WINDOW + 1;
    for (uint32_t attempt = 0;; attempt++) {
        int fd = socket(g.dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            *errno_where = "socket_";
            return -1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        set_port_window(fd, s, attempt == 0 ? 1 : PORT_WINDOW);
        if (g.n_src > 0) {
            /* bind() only the address; connect() picks the port for the whole 4-tuple. */
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            if (bind(fd, (struct sockaddr *)&g.src[s], g.src_len[s]) < 0) {
                *errno_where = "bind_";
                int err = errno;
                close(fd);
                errno = err;
                return -1;
            }
        }
        if (connect(fd, (struct sockaddr *)&g.dst, g.dst_len) == 0 || errno == EINPROGRESS)
            return fd;
        int err = errno;
        close(fd);
        errno = err;
        *errno_where = "connect_";
        if (err != EADDRNOTAVAIL || !g.port_windows || attempt + 1 >= attempts)
            return -1;
    }
}

static void conn_start(long i)
{
    struct conn *c = &g.conns[i];
    int64_t now = now_ns(CLOCK_MONOTONIC);
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->started_ns = now;
    c->path = (uint32_t)(i % g.n_requests);
    if (g.slow_every > 0 && i % g.slow_every == g.slow_every - 1)
        c->flags |= CF_SLOW;
    if (g.started == 0)
        g.first_start_ns = now;
    g.started++;
    g.pending++;

    const char *where = "";
    int fd = open_socket(i, &where);
    if (fd < 0) {
        conn_fail_errno(c, where, errno);
        return;
    }
    c->fd = fd;
    g.open++;
    c->state = C_CONNECTING;
    if (epoll_set(c, EPOLL_CTL_ADD, EPOLLOUT) < 0)
        conn_fail_errno(c, "epoll_", errno);
}

static void conn_send(struct conn *c)
{
    const char *req = g.requests[c->path];
    uint32_t len = g.request_len[c->path];
    while (c->sent < len) {
        ssize_t n = send(c->fd, req + c->sent, len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            conn_fail_errno(c, "write_", errno);
            return;
        }
        c->sent += (uint32_t)n;
    }
    c->state = C_HEADERS;
    if (epoll_set(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLRDHUP) < 0)
        conn_fail_errno(c, "epoll_", errno);
}

static void conn_connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err != 0) {
        conn_fail_errno(c, "connect_", err);
        return;
    }
    c->state = C_SENDING;
    conn_send(c);
}

/* A slow consumer stops reading once ready: only a reset or hang-up is still reported. */
static void conn_stall(struct conn *c)
{
    c->state = C_STALLED;
    if (epoll_set(c, EPOLL_CTL_MOD, EPOLLRDHUP) < 0)
        conn_closed_by_server(c);
}

/* ---- SSE parsing (WHATWG HTML 9.2.6) ------------------------------------------------------ */

/* A presence frame: counted over the whole run and, in the counted window, per connection
 * with the gap since the connection's last one. */
static void presence_dispatch(struct conn *c)
{
    g.interval_presence++;
    g.presence_run_events++;
    g.presence_run_bytes += c->ev_data_bytes;
    if (!g.counting)
        return;
    int64_t now = now_ns(CLOCK_MONOTONIC);
    if (c->presence_last_ns != 0 && now - c->presence_last_ns < g.presence_min_gap_ns)
        g.presence_min_gap_ns = now - c->presence_last_ns;
    c->presence_last_ns = now;
    c->presence++;
    g.presence_events++;
    g.presence_bytes += c->ev_data_bytes;
}

static void sse_dispatch(struct conn *c, int64_t recv_ns)
{
    if (c->ev_flags & EV_CLOSE)
        g.close_events++;
    if ((c->ev_flags & (EV_DATA | EV_PRESENCE)) == (EV_DATA | EV_PRESENCE)) {
        presence_dispatch(c);
    } else if (c->ev_flags & EV_DATA) {
        g.interval_events++;
        if (g.counting) {
            g.events++;
            if (c->ev_flags & EV_EPHEMERAL)
                g.ephemeral_events++;
        }
        if (c->ts_state == TS_FOUND) {
            int64_t lat = recv_ns - (int64_t)c->ts;
            if (lat < 0) {
                g.negative++;
                lat = 0;
            }
            hist_record(&g.interval_latency, (uint64_t)lat);
            if (g.counting)
                hist_record(&g.latency, (uint64_t)lat);
        }
    }
    c->ev_flags = 0;
    c->ts_state = 0;
    c->ev_data_bytes = 0;
}

/* Field name complete (at ':' or end of line). */
static void sse_field_start(struct conn *c)
{
    if (c->name_len == 4 && memcmp(c->name, "data", 4) == 0) {
        c->field = F_DATA;
        if (c->ev_flags & EV_DATA)
            c->ev_data_bytes++; /* the LF that joins data lines */
        c->ev_flags |= EV_DATA;
        if (c->ts_state != TS_FOUND)
            c->ts_state = 0;
    } else if (c->name_len == 5 && memcmp(c->name, "event", 5) == 0) {
        c->field = F_EVENT;
        c->ev_len = 0;
        c->ev_flags &= (uint8_t) ~(EV_CLOSE | EV_EPHEMERAL | EV_PRESENCE);
    } else {
        c->field = F_OTHER;
    }
}

static void sse_field_end(struct conn *c)
{
    if (c->field == F_EVENT) {
        if (c->ev_len == 5 && memcmp(c->ev_name, "close", 5) == 0)
            c->ev_flags |= EV_CLOSE;
        else if (c->ev_len == 9 && memcmp(c->ev_name, "ephemeral", 9) == 0)
            c->ev_flags |= EV_EPHEMERAL;
        else if (c->ev_len == 8 && memcmp(c->ev_name, "presence", 8) == 0)
            c->ev_flags |= EV_PRESENCE;
    } else if (c->field == F_DATA && c->ts_state != TS_FOUND) {
        c->ts_state = (c->ts_state == TS_DIGITS && c->ts_digits > 0) ? TS_FOUND : 0;
    }
}

/* Scan one piece of a data line for the first `"ts":<digits>` of the event. */
static void ts_scan(struct conn *c, const char *p, const char *end)
{
    static const char pat[] = "\"ts\":";
    while (p < end && c->ts_state != TS_FOUND) {
        if (c->ts_state == 0) {
            const char *q = memchr(p, '"', (size_t)(end - p));
            if (q == NULL)
                return;
            if (end - q >= 5 && memcmp(q, pat, 5) == 0) {
                p = q + 5;
                c->ts_state = TS_SPACE;
            } else {
                p = q + 1;
                c->ts_state = 1;
            }
        } else if (c->ts_state < TS_SPACE) {
            if (*p == pat[c->ts_state]) {
                p++;
                c->ts_state++;
            } else {
                c->ts_state = 0; /* re-examine *p: it may start a new match */
            }
        } else if (c->ts_state == TS_SPACE) {
            if (*p == ' ' || *p == '\t') {
                p++;
            } else {
                c->ts_state = TS_DIGITS;
                c->ts = 0;
                c->ts_digits = 0;
            }
        } else { /* TS_DIGITS; locals, as stores through c could alias *p */
            uint64_t ts = c->ts;
            unsigned digits = c->ts_digits;
            while (p < end && (unsigned)(*p - '0') < 10u) {
                if (digits < 20) {
                    ts = ts * 10 + (uint64_t)(*p - '0');
                    digits++;
                }
                p++;
            }
            c->ts = ts;
            c->ts_digits = (uint8_t)digits;
            if (p < end)
                c->ts_state = (c->ts_digits > 0 && c->ts_digits <= 19) ? TS_FOUND : 0;
        }
    }
}

static void sse_value(struct conn *c, const char *p, const char *end)
{
    if (c->field == F_DATA) {
        c->ev_data_bytes += (uint32_t)(end - p);
        ts_scan(c, p, end);
    } else if (c->field == F_EVENT) {
        unsigned len = c->ev_len; /* a local: stores through c could alias *p */
        for (; p < end && len < 255; p++, len++)
            if (len < EV_NAME_BYTES)
                c->ev_name[len] = *p;
        c->ev_len = (uint8_t)len;
    }
}

/* First CR or LF in [p, end), or end. */
static const char *find_eol(const char *p, const char *end)
{
    const char *lf = memchr(p, '\n', (size_t)(end - p));
    const char *lim = lf ? lf : end;
    const char *cr = memchr(p, '\r', (size_t)(lim - p));
    return cr ? cr : lim;
}

static const char *sse_name(struct conn *c, const char *p, const char *end)
{
    unsigned len = c->name_len; /* a local: stores through c could alias *p */
    for (; p < end; p++) {
        char ch = *p;
        if (ch == ':' || ch == '\n' || ch == '\r')
            break;
        if (len < sizeof c->name)
            c->name[len] = ch;
        if (len < 255)
            len++;
    }
    c->name_len = (uint8_t)len;
    if (p == end)
        return p;
    sse_field_start(c);
    if (*p == ':') {
        c->sse_state = S_VALUE_START;
    } else { /* a field name alone: empty value */
        sse_field_end(c);
        c->sse_state = *p == '\r' ? S_AFTER_CR : S_LINE;
    }
    return p + 1;
}

static void sse_feed(struct conn *c, const char *p, const char *end, int64_t recv_ns)
{
    while (p < end) {
        switch (c->sse_state) {
        case S_AFTER_CR:
            c->sse_state = S_LINE;
            if (*p == '\n')
                p++;
            break;
        case S_LINE:
            if (*p == '\n' || *p == '\r') {
                sse_dispatch(c, recv_ns);
                c->sse_state = *p == '\r' ? S_AFTER_CR : S_LINE;
                p++;
            } else if (*p == ':') {
                c->sse_state = S_SKIP;
                p++;
            } else {
                c->name_len = 0;
                c->sse_state = S_NAME;
            }
            break;
        case S_NAME:
            p = sse_name(c, p, end);
            break;
        case S_VALUE_START:
            if (*p == ' ')
                p++;
            c->sse_state = S_VALUE;
            break;
        default: { /* S_VALUE, S_SKIP */
            const char *eol = find_eol(p, end);
            if (c->sse_state == S_VALUE)
                sse_value(c, p, eol);
            if (eol == end)
                return;
            if (c->sse_state == S_VALUE)
                sse_field_end(c);
            c->sse_state = *eol == '\r' ? S_AFTER_CR : S_LINE;
            p = eol + 1;
        }
        }
    }
}

/* ---- body decoding ----------------------------------------------------------------------- */

/* Decoded body bytes: look for the ready marker (KMP), then parse as SSE. */
static void body_bytes(struct conn *c, const char *p, const char *end, int64_t recv_ns)
{
    if (!(c->flags & CF_READY)) {
        int k = c->marker_pos;
        for (const char *q = p; q < end; q++) {
            while (k > 0 && *q != g.marker[k])
                k = g.marker_fail[k - 1];
            if (*q == g.marker[k])
                k++;
            if ((size_t)k == g.marker_len) {
                conn_ready(c);
                break;
            }
        }
        c->marker_pos = (uint16_t)k;
    }
    sse_feed(c, p, end, recv_ns);
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* One byte of chunk framing (not chunk data). Returns -1 on a framing error. */
static int chunk_frame_byte(struct conn *c, char ch)
{
    int h;
    switch (c->chunk_state) {
    case K_SIZE:
        h = hex_value(ch);
        if (h >= 0 && c->chunk_digits < 15) {
            c->remaining = c->remaining * 16 + (uint64_t)h;
            c->chunk_digits++;
            return 0;
        }
        if (c->chunk_digits == 0)
            return -1;
        if (ch == ';' || ch == ' ' || ch == '\t')
            c->chunk_state = K_EXT;
        else if (ch == '\r')
            c->chunk_state = K_SIZE_LF;
        else if (ch == '\n')
            c->chunk_state = c->remaining ? K_DATA : K_TRAILER;
        else
            return -1;
        return 0;
    case K_EXT:
        if (ch == '\n')
            c->chunk_state = c->remaining ? K_DATA : K_TRAILER;
        return 0;
    case K_SIZE_LF:
        if (ch != '\n')
            return -1;
        c->chunk_state = c->remaining ? K_DATA : K_TRAILER;
        return 0;
    case K_DATA_CR:
        if (ch == '\r') {
            c->chunk_state = K_DATA_LF;
            return 0;
        }
        __attribute__((fallthrough)); /* tolerate a bare LF */
    case K_DATA_LF:
        if (ch != '\n')
            return -1;
        c->chunk_state = K_SIZE;
        c->chunk_digits = 0;
        c->remaining = 0;
        return 0;
    case K_TRAILER:
        c->chunk_state = ch == '\n' ? K_DONE : ch == '\r' ? K_TRAILER_LF : K_TRAILER_LINE;
        return 0;
    case K_TRAILER_LINE:
        if (ch == '\n')
            c->chunk_state = K_TRAILER;
        return 0;
    case K_TRAILER_LF:
        if (ch != '\n')
            return -1;
        c->chunk_state = K_DONE;
        return 0;
    default:
        return 0; /* K_DONE: ignore anything after the last chunk */
    }
}

/* RFC 9112 section 7.1. Returns 1 when the last chunk was read, -1 on a framing error. */
static int chunked_feed(struct conn *c, const char *p, const char *end, int64_t recv_ns)
{
    while (p < end && c->state != C_CLOSED) {
        if (c->chunk_state == K_DATA) {
            size_t take = (size_t)(end - p);
            if (take > c->remaining)
                take = (size_t)c->remaining;
            body_bytes(c, p, p + take, recv_ns);
            p += take;
            c->remaining -= take;
            if (c->remaining == 0)
                c->chunk_state = K_DATA_CR;
        } else {
            if (chunk_frame_byte(c, *p++) < 0)
                return -1;
            if (c->chunk_state == K_DONE)
                return 1;
        }
    }
    return 0;
}

/* Returns 1 when the response body ended, -1 on a framing error. */
static int body_feed(struct conn *c, const char *p, const char *end, int64_t recv_ns)
{
    switch (c->body_mode) {
    case B_CHUNKED:
        return chunked_feed(c, p, end, recv_ns);
    case B_LENGTH: {
        size_t take = (size_t)(end - p);
        if (take > c->remaining)
            take = (size_t)c->remaining;
        body_bytes(c, p, p + take, recv_ns);
        c->remaining -= take;
        return c->remaining == 0 ? 1 : 0;
    }
    default:
        body_bytes(c, p, end, recv_ns);
        return 0;
    }
}

/* ---- response head ------------------------------------------------------------------------ */

static int header_is(const char *line, size_t len, const char *name)
{
    size_t n = strlen(name);
    return len > n && line[n] == ':' && strncasecmp(line, name, n) == 0;
}

/* Parse the status line and the framing headers of `head` (ending in a blank line). Returns the
 * status code, or -1 when the status line is malformed. */
static int parse_head(struct conn *c, char *head, size_t len)
{
    char *line_end = memchr(head, '\n', len);
    if (line_end == NULL || len < 12 || strncmp(head, "HTTP/1.", 7) != 0)
        return -1;
    int status = atoi(head + 9);
    c->body_mode = B_EOF;
    for (char *line = line_end + 1; line < head + len;) {
        char *nl = memchr(line, '\n', (size_t)(head + len - line));
        if (nl == NULL)
            break;
        size_t n = (size_t)(nl - line);
        if (header_is(line, n, "transfer-encoding")) {
            *nl = '\0';
            if (strcasestr(line, "chunked") != NULL)
                c->body_mode = B_CHUNKED;
            *nl = '\n';
        } else if (header_is(line, n, "content-length") && c->body_mode != B_CHUNKED) {
            c->body_mode = B_LENGTH;
            c->remaining = strtoull(line + 15, NULL, 10);
        }
        line = nl + 1;
    }
    return status;
}

/* Index just after the blank line ending the response head in buf[0..len), or 0. The scan
 * starts at `from`; everything before it is known to hold no blank line. */
static size_t head_end(const char *buf, size_t len, size_t from)
{
    for (size_t i = from; i < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (i >= 1 && buf[i - 1] == '\n')
            return i + 1;
        if (i >= 3 && buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r')
            return i + 1;
    }
    return 0;
}

/* Keep an incomplete head for the next read. Returns 1 if the connection is now closed. */
static int head_keep(struct conn *c, const char *p, size_t n)
{
    if (c->hdr_len + n > MAX_HEADER_BYTES) {
        conn_fail(c, "", "header_too_large");
        return 1;
    }
    if (c->hdr_len + n > c->hdr_cap) {
        size_t cap = c->hdr_cap ? c->hdr_cap : 1024;
        while (cap < c->hdr_len + n)
            cap *= 2;
        char *grown = realloc(c->hdr, cap);
        if (grown == NULL) {
            conn_fail(c, "", "out_of_memory");
            return 1;
        }
        c->hdr = grown;
        c->hdr_cap = (uint32_t)cap;
    }
    memcpy(c->hdr + c->hdr_len, p, n);
    c->hdr_len += (uint32_t)n;
    return 0;
}

/* The body ended (r > 0) or its framing broke (r < 0). */
static void body_stopped(struct conn *c, int r)
{
    if (r > 0) {
        conn_ended(c, 0);
    } else if (c->flags & CF_READY) {
        count_error("", "bad_chunk");
        conn_closed_by_server(c);
    } else {
        conn_fail(c, "", "bad_chunk");
    }
}

/* Response bytes while the head is incomplete. The head is parsed in place when one read holds
 * all of it, else collected in c->hdr. Returns 1 if the connection is now closed. */
static int head_feed(struct conn *c, char *p, size_t n, int64_t recv_ns)
{
    char *head = p;
    size_t old = c->hdr_len, end = 0, body_off;
    if (old == 0) {
        end = head_end(p, n, 0);
        if (end == 0)
            return head_keep(c, p, n);
        body_off = end;
    } else {
        size_t take = n < MAX_HEADER_BYTES - old ? n : MAX_HEADER_BYTES - old;
        if (head_keep(c, p, take))
            return 1;
        end = head_end(c->hdr, c->hdr_len, old > 3 ? old - 3 : 0);
        if (end == 0) {
            if (c->hdr_len < MAX_HEADER_BYTES)
                return 0;
            conn_fail(c, "", "header_too_large");
            return 1;
        }
        head = c->hdr;
        body_off = end - old; /* the blank line ends inside this read */
    }
    int status = parse_head(c, head, end);
    free(c->hdr);
    c->hdr = NULL;
    c->hdr_len = c->hdr_cap = 0;
    if (status != 200) {
        char kind[24];
        snprintf(kind, sizeof kind, "http_%d", status);
        conn_fail(c, "", status < 0 ? "bad_status_line" : kind);
        return 1;
    }
    c->state = C_BODY;
    if (g.marker == NULL)
        conn_ready(c);
    int r = body_off < n ? body_feed(c, p + body_off, p + n, recv_ns) : 0;
    if (r != 0) {
        body_stopped(c, r);
        return 1;
    }
    return 0;
}

/* ---- event loop ---------------------------------------------------------------------------- */

static void conn_readable(struct conn *c)
{
    ssize_t n = read(c->fd, g.rbuf, READ_BUF_BYTES);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            conn_ended(c, errno);
        return;
    }
    if (n == 0) {
        conn_ended(c, 0);
        return;
    }
    int64_t recv_ns = now_ns(CLOCK_REALTIME);
    if (g.counting)
        g.bytes += (uint64_t)n;
    int r = 0;
    if (c->state == C_HEADERS) {
        if (head_feed(c, g.rbuf, (size_t)n, recv_ns))
            return;
    } else {
        r = body_feed(c, g.rbuf, g.rbuf + n, recv_ns);
    }
    if (r != 0)
        body_stopped(c, r);
    else if ((c->flags & (CF_READY | CF_SLOW)) == (CF_READY | CF_SLOW)) {
        conn_stall(c);
    }
}

static void conn_event(struct conn *c, uint32_t events)
{
    switch (c->state) {
    case C_CONNECTING:
        conn_connected(c);
        break;
    case C_SENDING:
        conn_send(c);
        break;
    case C_HEADERS:
    case C_BODY:
        conn_readable(c);
        break;
    case C_STALLED:
        if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            conn_closed_by_server(c);
        break;
    default:
        break;
    }
}

static void start_connections(int64_t now)
{
    long allowed = g.o.connections;
    if (g.o.rate > 0) {
        double due = (double)(now - g.t0_ns) / 1e9 * g.o.rate + 1.0;
        if (due < (double)allowed)
            allowed = (long)due;
    }
    while (g.started < allowed && g.pending < g.o.concurrency && !g_stop)
        conn_start(g.started);
}

/* Fail connections pending longer than --connect-timeout. They start in index order, so the
 * oldest pending one is found by walking forward. */
static void expire_connections(int64_t now)
{
    int64_t limit = (int64_t)(g.o.connect_timeout_s * 1e9);
    while (g.next_timeout_check < g.started) {
        struct conn *c = &g.conns[g.next_timeout_check];
        if (!(c->flags & (CF_READY | CF_FAILED))) {
            if (now - c->started_ns < limit)
                return;
            conn_fail(c, "", "connect_timeout");
        }
        g.next_timeout_check++;
    }
}

static void progress(int64_t now, double interval_s)
{
    const char *phase = !g.measuring ? "connect" : g.counting ? "measure" : "warmup";
    fprintf(stderr,
            "sseload t=%.1fs phase=%s started=%ld ready=%ld failed=%ld open=%ld events/s=%.0f "
            "p99_ms=%.3f p99_total_ms=%.3f closed_by_server=%llu presence=%llu\n",
            (double)(now - g.t0_ns) / 1e9, phase, g.started, g.ready, g.failed, g.open,
            interval_s > 0 ? (double)g.interval_events / interval_s : 0.0,
            hist_quantile(&g.interval_latency, 9900) / 1e6, hist_quantile(&g.latency, 9900) / 1e6,
            (unsigned long long)(g.closed_healthy + g.closed_slow),
            (unsigned long long)g.interval_presence);
    g.interval_events = 0;
    g.interval_presence = 0;
    hist_reset(&g.interval_latency);
}

static int wait_ms(int64_t now, int64_t next_progress)
{
    int64_t until = now + 100 * 1000000LL; /* expire_connections runs at least every 100 ms */
    if (!g.measuring && g.started < g.o.connections && g.o.rate > 0 &&
        g.pending < g.o.concurrency) {
        int64_t slot = g.t0_ns + (int64_t)((double)g.started / g.o.rate * 1e9);
        if (slot < until)
            until = slot;
    }
    if (g.measuring) {
        if (!g.counting && g.count_start_ns < until)
            until = g.count_start_ns;
        if (g.measure_end_ns < until)
            until = g.measure_end_ns;
    }
    if (next_progress < until)
        until = next_progress;
    if (until <= now)
        return 0;
    return (int)((until - now + 999999) / 1000000);
}

static void update_phase(int64_t now)
{
    if (!g.measuring && g.started == g.o.connections && g.pending == 0) {
        g.measuring = 1;
        g.measure_start_ns = now;
        g.count_start_ns = now + (int64_t)(g.o.warmup_s * 1e9);
        g.measure_end_ns = now + (int64_t)(g.o.duration_s * 1e9);
    }
    if (g.measuring && !g.counting && now >= g.count_start_ns)
        g.counting = 1;
}

static void run(void)
{
    struct epoll_event events[MAX_EVENTS];
    int64_t now = now_ns(CLOCK_MONOTONIC);
    int64_t progress_every = (int64_t)(g.o.progress_s * 1e9);
    int64_t last_progress = now;
    g.t0_ns = now;
    for (;;) {
        now = now_ns(CLOCK_MONOTONIC);
        if (!g.measuring) {
            start_connections(now);
            expire_connections(now);
        }
        update_phase(now);
        if (g.measuring && (now >= g.measure_end_ns || g.open == 0))
            break;
        if (g_stop)
            break;
        if (progress_every > 0 && now - last_progress >= progress_every) {
            progress(now, (double)(now - last_progress) / 1e9);
            last_progress = now;
        }
        int timeout = wait_ms(now, progress_every > 0 ? last_progress + progress_every : INT64_MAX);
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("sseload: epoll_wait");
            break;
        }
        update_phase(now_ns(CLOCK_MONOTONIC));
        for (int i = 0; i < n; i++)
            conn_event(&g.conns[events[i].data.u64], events[i].events);
    }
    if (!g.measuring) { /* interrupted while connecting */
        g.measure_start_ns = g.count_start_ns = now;
    }
    g.measure_end_ns = now;
}

/* ---- output -------------------------------------------------------------------------------- */

static void print_result(void)
{
    double measure_s = g.counting ? (double)(g.measure_end_ns - g.count_start_ns) / 1e9 : 0.0;
    double span_s = g.ready ? (double)(g.last_ready_ns - g.first_start_ns) / 1e9 : 0.0;
    printf("{\"connections\":%ld,\"ready\":%ld,\"failed\":%ld,", g.o.connections, g.ready,
           g.failed);
    printf("\"connect\":{\"per_s\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f},",
           span_s > 0 ? (double)g.ready / span_s : 0.0, hist_quantile(&g.connect, 5000) / 1e6,
           hist_quantile(&g.connect, 9900) / 1e6, (double)g.connect.max_ns / 1e6);
    printf("\"measure_s\":%.3f,\"events\":%llu,\"deliveries_per_s\":%.1f,", measure_s,
           (unsigned long long)g.events, measure_s > 0 ? (double)g.events / measure_s : 0.0);
    printf("\"latency_ms\":{\"count\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},",
           (unsigned long long)g.latency.count, hist_quantile(&g.latency, 5000) / 1e6,
           hist_quantile(&g.latency, 9900) / 1e6, (double)g.latency.max_ns / 1e6);
    printf("\"bytes\":%llu,\"closed_by_server\":{\"healthy\":%llu,\"slow\":%llu},",
           (unsigned long long)g.bytes, (unsigned long long)g.closed_healthy,
           (unsigned long long)g.closed_slow);
    uint64_t presence_conns = 0, presence_max = 0;
    for (long i = 0; i < g.started; i++) {
        if (g.conns[i].presence > 0)
            presence_conns++;
        if (g.conns[i].presence > presence_max)
            presence_max = g.conns[i].presence;
    }
    printf("\"ephemeral_events\":%llu,\"presence\":{\"events\":%llu,\"data_bytes\":%llu,"
           "\"connections\":%llu,\"max_per_connection\":%llu,\"run_events\":%llu,"
           "\"run_data_bytes\":%llu,\"min_gap_ms\":",
           (unsigned long long)g.ephemeral_events, (unsigned long long)g.presence_events,
           (unsigned long long)g.presence_bytes, (unsigned long long)presence_conns,
           (unsigned long long)presence_max, (unsigned long long)g.presence_run_events,
           (unsigned long long)g.presence_run_bytes);
    if (g.presence_min_gap_ns == INT64_MAX)
        printf("null},");
    else
        printf("%.3f},", (double)g.presence_min_gap_ns / 1e6);
    printf("\"close_events\":%llu,\"errors\":{", (unsigned long long)g.close_events);
    int first = 1;
    if (g.negative) {
        printf("\"negative_latency\":%llu", (unsigned long long)g.negative);
        first = 0;
    }
    for (int i = 0; i < g.n_errors; i++) {
        printf("%s\"%s\":%llu", first ? "" : ",", g.errors[i].name,
               (unsigned long long)g.errors[i].count);
        first = 0;
    }
    printf("}}\n");
    fflush(stdout);
}

static void dump_hist(FILE *f, const char *name, const struct hist *h)
{
    fprintf(f, "\"%s\":{\"count\":%llu,\"max_ns\":%llu,\"buckets\":[", name,
            (unsigned long long)h->count, (unsigned long long)h->max_ns);
    int first = 1;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        if (h->buckets[i] == 0)
            continue;
        uint64_t low, width;
        hist_bounds(i, &low, &width);
        fprintf(f, "%s[%llu,%llu,%llu]", first ? "" : ",", (unsigned long long)low,
                (unsigned long long)width, (unsigned long long)h->buckets[i]);
        first = 0;
    }
    fprintf(f, "]}");
}

/* --histogram-out: raw buckets as [low_ns, width_ns, count] plus the connect-phase span on
 * CLOCK_MONOTONIC (shared by all processes of one host), so several runs merge exactly. */
static void write_histograms(const char *path)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        perror("sseload: --histogram-out");
        return;
    }
    fprintf(f, "{\"first_connect_ns\":%lld,\"last_ready_ns\":%lld,",
            (long long)g.first_start_ns, (long long)g.last_ready_ns);
    dump_hist(f, "latency", &g.latency);
    fputc(',', f);
    dump_hist(f, "connect", &g.connect);
    fprintf(f, "}\n");
    fclose(f);
}

/* ---- setup --------------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: sseload --host H --port P --paths-file F --connections N\n"
            "  [--rate R] [--concurrency C] [--source-ips A,B,...] [--ready-marker STR]\n"
            "  [--slow-fraction F] [--duration S] [--warmup S] [--connect-timeout S]\n"
            "  [--header 'K: V']... [--progress S] [--histogram-out FILE]\n");
    exit(2);
}

static double parse_double(const char *s, const char *what, double min)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || !(v >= min) || isinf(v)) {
        fprintf(stderr, "sseload: bad %s: %s\n", what, s);
        usage();
    }
    return v;
}

static void parse_args(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},          {"port", required_argument, 0, 'p'},
        {"paths-file", required_argument, 0, 'f'},    {"connections", required_argument, 0, 'n'},
        {"rate", required_argument, 0, 'r'},          {"concurrency", required_argument, 0, 'c'},
        {"source-ips", required_argument, 0, 's'},    {"ready-marker", required_argument, 0, 'm'},
        {"slow-fraction", required_argument, 0, 'w'}, {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'u'},        {"connect-timeout", required_argument, 0, 't'},
        {"header", required_argument, 0, 'H'},        {"progress", required_argument, 0, 'P'},
        {"histogram-out", required_argument, 0, 'o'}, {0, 0, 0, 0},
    };
    struct options *o = &g.o;
    o->concurrency = 1000;
    o->duration_s = 10;
    o->connect_timeout_s = 60;
    o->progress_s = 1;
    o->headers = calloc((size_t)argc, sizeof *o->headers);
    int opt;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case 'h': o->host = optarg; break;
        case 'p': o->port = optarg; break;
        case 'f': o->paths_file = optarg; break;
        case 'n': o->connections = (long)parse_double(optarg, "--connections", 1); break;
        case 'r': o->rate = parse_double(optarg, "--rate", 0); break;
        case 'c': o->concurrency = (long)parse_double(optarg, "--concurrency", 1); break;
        case 's': o->source_ips = optarg; break;
        case 'm': o->ready_marker = optarg; break;
        case 'w': o->slow_fraction = parse_double(optarg, "--slow-fraction", 0); break;
        case 'd': o->duration_s = parse_double(optarg, "--duration", 0); break;
        case 'u': o->warmup_s = parse_double(optarg, "--warmup", 0); break;
        case 't': o->connect_timeout_s = parse_double(optarg, "--connect-timeout", 0); break;
        case 'H': o->headers[o->n_headers++] = optarg; break;
        case 'P': o->progress_s = parse_double(optarg, "--progress", 0); break;
        case 'o': o->histogram_out = optarg; break;
        default: usage();
        }
    }
    if (optind != argc || !o->host || !o->port || !o->paths_file || o->connections < 1 ||
        o->slow_fraction > 1 || o->warmup_s > o->duration_s ||
        (o->ready_marker && (o->ready_marker[0] == '\0' || strlen(o->ready_marker) > 60000)))
        usage();
    for (int i = 0; i < o->n_headers; i++) {
        if (strchr(o->headers[i], ':') == NULL || strpbrk(o->headers[i], "\r\n") != NULL) {
            fprintf(stderr, "sseload: bad --header: %s\n", o->headers[i]);
            usage();
        }
    }
}

static void resolve(void)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(g.o.host, g.o.port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "sseload: %s:%s: %s\n", g.o.host, g.o.port, gai_strerror(rc));
        exit(1);
    }
    memcpy(&g.dst, res->ai_addr, res->ai_addrlen);
    g.dst_len = res->ai_addrlen;
    freeaddrinfo(res);
    if (g.o.source_ips == NULL)
        return;
    char *list = strdup(g.o.source_ips), *save = NULL;
    for (char *ip = strtok_r(list, ",", &save); ip; ip = strtok_r(NULL, ",", &save)) {
        if (g.n_src == MAX_SOURCE_IPS)
            break;
        struct sockaddr_storage *s = &g.src[g.n_src];
        memset(s, 0, sizeof *s);
        if (g.dst.ss_family == AF_INET &&
            inet_pton(AF_INET, ip, &((struct sockaddr_in *)s)->sin_addr) == 1) {
            s->ss_family = AF_INET;
            g.src_len[g.n_src++] = sizeof(struct sockaddr_in);
        } else if (g.dst.ss_family == AF_INET6 &&
                   inet_pton(AF_INET6, ip, &((struct sockaddr_in6 *)s)->sin6_addr) == 1) {
            s->ss_family = AF_INET6;
            g.src_len[g.n_src++] = sizeof(struct sockaddr_in6);
        } else {
            fprintf(stderr, "sseload: bad --source-ips entry for this host: %s\n", ip);
            free(list);
            usage();
        }
    }
    free(list);
}

/* One prebuilt request per line of the paths file. */
static void load_requests(void)
{
    FILE *f = fopen(g.o.paths_file, "r");
    if (f == NULL) {
        perror("sseload: --paths-file");
        exit(2);
    }
    char host[300];
    if (strchr(g.o.host, ':'))
        snprintf(host, sizeof host, "[%s]:%s", g.o.host, g.o.port);
    else
        snprintf(host, sizeof host, "%s:%s", g.o.host, g.o.port);
    size_t extra = 0;
    for (int i = 0; i < g.o.n_headers; i++)
        extra += strlen(g.o.headers[i]) + 2;
    long cap = 1024;
    g.requests = malloc((size_t)cap * sizeof *g.requests);
    g.request_len = malloc((size_t)cap * sizeof *g.request_len);
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t len;
    while ((len = getline(&line, &line_cap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        if (g.n_requests == cap) {
            cap *= 2;
            g.requests = realloc(g.requests, (size_t)cap * sizeof *g.requests);
            g.request_len = realloc(g.request_len, (size_t)cap * sizeof *g.request_len);
        }
        size_t size = (size_t)len + strlen(host) + extra + 128;
        char *req = malloc(size);
        int n = snprintf(req, size,
                         "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                         "Cache-Control: no-cache\r\n",
                         line, host);
        for (int i = 0; i < g.o.n_headers; i++)
            n += snprintf(req + n, size - (size_t)n, "%s\r\n", g.o.headers[i]);
        n += snprintf(req + n, size - (size_t)n, "\r\n");
        g.requests[g.n_requests] = req;
        g.request_len[g.n_requests++] = (uint32_t)n;
    }
    free(line);
    fclose(f);
    if (g.n_requests == 0) {
        fprintf(stderr, "sseload: %s has no paths\n", g.o.paths_file);
        exit(2);
    }
}

static void setup_marker(void)
{
    if (g.o.ready_marker == NULL)
        return;
    g.marker = g.o.ready_marker;
    g.marker_len = strlen(g.marker);
    g.marker_fail = calloc(g.marker_len, sizeof *g.marker_fail);
    for (size_t i = 1, k = 0; i < g.marker_len; i++) {
        while (k > 0 && g.marker[i] != g.marker[k])
            k = (size_t)g.marker_fail[k - 1];
        if (g.marker[i] == g.marker[k])
            k++;
        g.marker_fail[i] = (int)k;
    }
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)g.o.connections + 16 > rl.rlim_cur)
        fprintf(stderr,
                "sseload: %ld connections exceed the open-file limit %llu; split them across "
                "processes\n",
                g.o.connections, (unsigned long long)rl.rlim_cur);
}

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void cleanup(void)
{
    for (long i = 0; i < g.started; i++)
        conn_close(&g.conns[i]);
    for (long i = 0; i < g.n_requests; i++)
        free(g.requests[i]);
    free(g.requests);
    free(g.request_len);
    free(g.conns);
    free(g.rbuf);
    free(g.marker_fail);
    free(g.o.headers);
    close(g.epfd);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    resolve();
    load_requests();
    setup_marker();
    raise_nofile();
    read_port_range();
    g.port_windows = 1;
    if (g.o.slow_fraction > 0)
        g.slow_every = lround(1.0 / g.o.slow_fraction);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    g.conns = calloc((size_t)g.o.connections, sizeof *g.conns);
    g.rbuf = malloc(READ_BUF_BYTES);
    g.presence_min_gap_ns = INT64_MAX;
    g.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g.conns == NULL || g.rbuf == NULL || g.epfd < 0) {
        perror("sseload: setup");
        return 1;
    }
    run();
    print_result();
    if (g.o.histogram_out)
        write_histograms(g.o.histogram_out);
    cleanup();
    return 0;
}
