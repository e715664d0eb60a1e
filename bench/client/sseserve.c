/* sseserve: a trivial SSE server, the reference that measures sseload's own ceiling.
 *
 * One thread, one epoll set. Answers any request (once its head is complete) with
 *   HTTP/1.1 200 OK, Content-Type: text/event-stream, Cache-Control: no-cache
 * and an identity body (no length, no chunking) that starts with `event: offset\ndata: {}\n\n`.
 * Every --tick-ms it builds the events due at --rate per second, each
 *   event: change\ndata: {"ts":<CLOCK_REALTIME ns>,"pad":"xx..."}\n\n   (about --size bytes)
 * formatted once, and writes the tick's frames to every connection in one send(). A connection
 * whose socket buffer cannot take the whole write is a slow consumer and is dropped with a
 * reset (SO_LINGER 0), so the client sees the drop even while it is not reading.
 *
 * usage: sseserve --port P --rate R --size B [--duration S] [--tick-ms T] [--host ADDR]
 * At the end (after --duration, or on SIGINT/SIGTERM) prints one JSON object of counters.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
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
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 1024
#define MAX_BATCH_BYTES (4 << 20) /* frames built per tick at most */

static const char RESPONSE[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Cache-Control: no-cache\r\n\r\n"
                               "event: offset\ndata: {}\n\n";
static const char FRAME_HEAD[] = "event: change\ndata: {\"ts\":";
static const char FRAME_MID[] = ",\"pad\":\"";
static const char FRAME_TAIL[] = "\"}\n\n";

enum { ST_FREE, ST_REQUEST, ST_STREAM };

struct client {
    uint8_t state;
    uint8_t matched; /* bytes of "\r\n\r\n" matched */
    int slot;        /* index in streams[] */
};

static struct {
    int epfd, listen_fd, timer_fd;
    struct client *clients; /* indexed by fd */
    int max_fd;
    int *streams; /* fds receiving events */
    int n_streams;
    char *frame, *batch;
    size_t frame_len, batch_max;
    uint64_t accepted, dropped, closed, events, writes, bytes;
} g;

static volatile sig_atomic_t g_stop;

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void stream_remove(int fd)
{
    struct client *cl = &g.clients[fd];
    if (cl->state == ST_STREAM) {
        int last = g.streams[--g.n_streams];
        g.streams[cl->slot] = last;
        g.clients[last].slot = cl->slot;
    }
    cl->state = ST_FREE;
}

static void client_close(int fd, int reset)
{
    if (reset) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        g.dropped++;
    } else {
        g.closed++;
    }
    stream_remove(fd);
    close(fd);
}

static void accept_all(void)
{
    for (;;) {
        int fd = accept4(g.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                perror("sseserve: accept4");
            return;
        }
        if (fd >= g.max_fd) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        g.clients[fd] = (struct client){.state = ST_REQUEST};
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        epoll_ctl(g.epfd, EPOLL_CTL_ADD, fd, &ev);
        g.accepted++;
    }
}

static void client_readable(int fd)
{
    static char buf[16384];
    struct client *cl = &g.clients[fd];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        client_close(fd, 0);
        return;
    }
    if (cl->state != ST_REQUEST)
        return; /* anything after the request is ignored */
    static const char end[] = "\r\n\r\n";
    for (ssize_t i = 0; i < n && cl->matched < 4; i++) {
        if (buf[i] == end[cl->matched])
            cl->matched++;
        else
            cl->matched = buf[i] == '\r' ? 1 : 0;
    }
    if (cl->matched < 4)
        return;
    ssize_t w = send(fd, RESPONSE, sizeof RESPONSE - 1, MSG_NOSIGNAL);
    if (w != (ssize_t)(sizeof RESPONSE - 1)) {
        client_close(fd, 1);
        return;
    }
    cl->state = ST_STREAM;
    cl->slot = g.n_streams;
    g.streams[g.n_streams++] = fd;
}

/* Write the frames due in this tick to every connection; drop those that cannot take them. */
static void tick(uint64_t due)
{
    if (due > g.batch_max)
        due = g.batch_max;
    size_t len = 0;
    for (uint64_t i = 0; i < due; i++) {
        char ts[24];
        snprintf(ts, sizeof ts, "%019lld", (long long)now_ns(CLOCK_REALTIME));
        memcpy(g.frame + sizeof FRAME_HEAD - 1, ts, 19);
        memcpy(g.batch + len, g.frame, g.frame_len);
        len += g.frame_len;
    }
    g.events += due;
    for (int i = g.n_streams - 1; i >= 0; i--) {
        int fd = g.streams[i];
        ssize_t w = send(fd, g.batch, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w == (ssize_t)len) {
            g.writes++;
            g.bytes += (uint64_t)w;
        } else if (w >= 0 || errno == EAGAIN) {
            client_close(fd, 1); /* slow consumer: its socket buffer is full */
        } else {
            client_close(fd, 0);
        }
    }
}

static void build_frame(long size)
{
    size_t fixed = sizeof FRAME_HEAD - 1 + 19 + sizeof FRAME_MID - 1 + sizeof FRAME_TAIL - 1;
    size_t pad = size > (long)fixed ? (size_t)size - fixed : 0;
    g.frame_len = fixed + pad;
    g.frame = malloc(g.frame_len);
    g.batch_max = MAX_BATCH_BYTES / g.frame_len ? MAX_BATCH_BYTES / g.frame_len : 1;
    g.batch = malloc(g.frame_len * g.batch_max);
    char *p = g.frame;
    memcpy(p, FRAME_HEAD, sizeof FRAME_HEAD - 1);
    p += sizeof FRAME_HEAD - 1 + 19;
    memcpy(p, FRAME_MID, sizeof FRAME_MID - 1);
    p += sizeof FRAME_MID - 1;
    memset(p, 'x', pad);
    p += pad;
    memcpy(p, FRAME_TAIL, sizeof FRAME_TAIL - 1);
}

static int listen_on(const char *host, int port)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "sseserve: bad --host %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 65535) < 0) {
        perror("sseserve: listen");
        exit(1);
    }
    return fd;
}

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: sseserve --port P --rate R --size B [--duration S] [--tick-ms T] "
                    "[--host ADDR]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"port", required_argument, 0, 'p'},     {"rate", required_argument, 0, 'r'},
        {"size", required_argument, 0, 's'},     {"duration", required_argument, 0, 'd'},
        {"tick-ms", required_argument, 0, 't'},  {"host", required_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *host = "0.0.0.0";
    int port = 0, opt;
    double rate = -1, duration_s = 0, tick_ms = 10;
    long size = 200;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 's': size = atol(optarg); break;
        case 'd': duration_s = atof(optarg); break;
        case 't': tick_ms = atof(optarg); break;
        case 'h': host = optarg; break;
        default: usage();
        }
    }
    if (optind != argc || port <= 0 || port > 65535 || rate < 0 || size < 0 || tick_ms < 0.05)
        usage();

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    g.max_fd = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > 1048576 ? 1048576 : (int)rl.rlim_cur;
    g.clients = calloc((size_t)g.max_fd, sizeof *g.clients);
    g.streams = calloc((size_t)g.max_fd, sizeof *g.streams);
    build_frame(size);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    g.epfd = epoll_create1(EPOLL_CLOEXEC);
    g.listen_fd = listen_on(host, port);
    g.timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    long tick_ns = (long)(tick_ms * 1e6);
    struct itimerspec its = {.it_interval = {tick_ns / 1000000000, tick_ns % 1000000000},
                             .it_value = {tick_ns / 1000000000, tick_ns % 1000000000}};
    timerfd_settime(g.timer_fd, 0, &its, NULL);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = g.listen_fd};
    epoll_ctl(g.epfd, EPOLL_CTL_ADD, g.listen_fd, &ev);
    ev.data.fd = g.timer_fd;
    epoll_ctl(g.epfd, EPOLL_CTL_ADD, g.timer_fd, &ev);

    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    int64_t end = duration_s > 0 ? t0 + (int64_t)(duration_s * 1e9) : INT64_MAX;
    uint64_t sent = 0;
    struct epoll_event events[MAX_EVENTS];
    while (!g_stop && now_ns(CLOCK_MONOTONIC) < end) {
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, 100);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == g.listen_fd) {
                accept_all();
            } else if (fd == g.timer_fd) {
                uint64_t expirations;
                if (read(fd, &expirations, sizeof expirations) < 0)
                    continue;
                int64_t now = now_ns(CLOCK_MONOTONIC);
                uint64_t due_total = (uint64_t)((double)(now - t0) / 1e9 * rate);
                if (due_total > sent) {
                    tick(due_total - sent);
                    sent = due_total;
                }
            } else if (g.clients[fd].state != ST_FREE) {
                client_readable(fd);
            }
        }
    }
    printf("{\"accepted\":%llu,\"open\":%d,\"dropped\":%llu,\"closed\":%llu,\"events\":%llu,"
           "\"writes\":%llu,\"bytes\":%llu}\n",
           (unsigned long long)g.accepted, g.n_streams, (unsigned long long)g.dropped,
           (unsigned long long)g.closed, (unsigned long long)g.events,
           (unsigned long long)g.writes, (unsigned long long)g.bytes);
    for (int fd = 0; fd < g.max_fd; fd++)
        if (g.clients[fd].state != ST_FREE)
            close(fd);
    close(g.timer_fd);
    close(g.listen_fd);
    close(g.epfd);
    free(g.clients);
    free(g.streams);
    free(g.frame);
    free(g.batch);
    return 0;
}
