/*
 * loadgen: the compiled load generator and echo/sink server of the relay benchmark.
 *
 * bench/run.py compiles this file with the machine's gcc into a cache directory and drives
 * it; the generator is C so that the proxy, not Python, is what the benchmark measures.
 * Every client mode prints one JSON line on stdout, including its own CPU time.
 *
 *   loadgen serve    [--echo-port P] [--sink-port P] [--session-port P] [-s BYTES] [--lifetime S]
 *                    [--bind ADDR]
 *   loadgen sessions [--proxy A:P] --target SESSION-PORT [-c N] [-t SEC] [-n MAX] [-s BYTES]
 *   loadgen bulk     [--proxy A:P] --target A:P [--streams N] [--bytes N] [-t SEC]
 *   loadgen udp      [--proxy A:P] [--count N] [--size N] [--window N] [--rate N] [-t SEC]
 *   loadgen idle     [--proxy A:P] --target A:P [--conns N] [-t SEC]
 *
 * Without --proxy a client mode talks to the target directly (the "no proxy" ceiling).
 * The echo port echoes what it reads.  The session port echoes -s bytes and then closes,
 * like an HTTP/1.0 server: the server side closes first, so TIME_WAIT stays on the servers'
 * listening ports instead of filling the client's and the proxy's ephemeral port ranges
 * (15 s of sessions at 10,000/s would exhaust them).  The sink port reads an 8-byte
 * big-endian length, discards that many bytes and answers one byte 'K'.  IPv4 only, except
 * that serve --bind (default 127.0.0.1) also takes an IPv6 literal: "::" listens on both
 * families (IPV6_V6ONLY off), for a server in an IPv6-only network namespace.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 65536
#define BULK_CHUNK (256 * 1024)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit rl = {MAX_FDS, MAX_FDS};
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int parse_addr(const char *text, struct sockaddr_in *out) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void set_timeouts(int fd, double seconds) {
    struct timeval tv = {(time_t)seconds, (suseconds_t)((seconds - (time_t)seconds) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int read_exact(int fd, uint8_t *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, buf + got, len - got, 0);
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    return 0;
}

static int write_all(int fd, const uint8_t *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = send(fd, buf + done, len - done, MSG_NOSIGNAL);
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    return 0;
}

/* Length of a SOCKS5 reply whose first five bytes are in buf, or 0 if the ATYP is unknown. */
static size_t socks_reply_len(const uint8_t *buf) {
    switch (buf[3]) {
    case 1: return 4 + 4 + 2;
    case 4: return 4 + 16 + 2;
    case 3: return 4 + 1 + buf[4] + 2;
    default: return 0;
    }
}

static size_t socks_request(uint8_t *buf, uint8_t cmd, const struct sockaddr_in *dst) {
    buf[0] = 5;
    buf[1] = cmd;
    buf[2] = 0;
    buf[3] = 1;
    memcpy(buf + 4, &dst->sin_addr, 4);
    memcpy(buf + 8, &dst->sin_port, 2);
    return 10;
}

/* Blocking SOCKS5 handshake (method "none") and request.  Returns the REP code (0 = success),
 * -1 on a transport or protocol failure; the reply's BND goes to *bound when it is IPv4. */
static int socks_handshake(int fd, uint8_t cmd, const struct sockaddr_in *dst,
                           struct sockaddr_in *bound) {
    uint8_t buf[300];
    static const uint8_t greeting[3] = {5, 1, 0};
    if (write_all(fd, greeting, 3) || read_exact(fd, buf, 2)) return -1;
    if (buf[0] != 5 || buf[1] != 0) return -1;
    size_t len = socks_request(buf, cmd, dst);
    if (write_all(fd, buf, len) || read_exact(fd, buf, 5)) return -1;
    size_t total = socks_reply_len(buf);
    if (buf[0] != 5 || total == 0) return -1;
    if (read_exact(fd, buf + 5, total - 5)) return -1;
    if (buf[1] == 0 && buf[3] == 1 && bound) {
        memset(bound, 0, sizeof *bound);
        bound->sin_family = AF_INET;
        memcpy(&bound->sin_addr, buf + 4, 4);
        memcpy(&bound->sin_port, buf + 8, 2);
    }
    return buf[1];
}

/* Blocking connect to the proxy (then CONNECT to target) or straight to the target. */
static int open_relayed(const struct sockaddr_in *proxy, const struct sockaddr_in *target,
                        double timeout) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    set_timeouts(fd, timeout);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    const struct sockaddr_in *first = proxy ? proxy : target;
    if (connect(fd, (const struct sockaddr *)first, sizeof *first) != 0 ||
        (proxy && socks_handshake(fd, 1, target, NULL) != 0)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* ---------------------------------------------------------------- options */

struct options {
    struct sockaddr_in proxy, target;
    int has_proxy, has_target;
    int concurrency, streams, conns, size, echo_port, sink_port, session_port;
    long max_sessions, count, rate, window;
    long long bytes;
    double seconds, lifetime;
    const char *bind;
};

static void parse_options(int argc, char **argv, struct options *o) {
    memset(o, 0, sizeof *o);
    o->concurrency = 64;
    o->streams = 1;
    o->conns = 2000;
    o->size = 64;
    o->max_sessions = 2000000;
    o->count = 200000;
    o->bytes = 1LL << 31;
    o->seconds = 10;
    o->lifetime = 3600;
    o->bind = "127.0.0.1";
    for (int i = 2; i < argc; i++) {
        const char *key = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!val) {
            fprintf(stderr, "loadgen: %s needs a value\n", key);
            exit(2);
        }
        i++;
        if (!strcmp(key, "--proxy")) {
            o->has_proxy = parse_addr(val, &o->proxy) == 0;
            if (!o->has_proxy) goto bad;
        } else if (!strcmp(key, "--target")) {
            o->has_target = parse_addr(val, &o->target) == 0;
            if (!o->has_target) goto bad;
        } else if (!strcmp(key, "-c")) o->concurrency = atoi(val);
        else if (!strcmp(key, "-t")) o->seconds = atof(val);
        else if (!strcmp(key, "-n")) o->max_sessions = atol(val);
        else if (!strcmp(key, "-s") || !strcmp(key, "--size")) o->size = atoi(val);
        else if (!strcmp(key, "--streams")) o->streams = atoi(val);
        else if (!strcmp(key, "--bytes")) o->bytes = atoll(val);
        else if (!strcmp(key, "--count")) o->count = atol(val);
        else if (!strcmp(key, "--rate")) o->rate = atol(val);
        else if (!strcmp(key, "--window")) o->window = atol(val);
        else if (!strcmp(key, "--conns")) o->conns = atoi(val);
        else if (!strcmp(key, "--echo-port")) o->echo_port = atoi(val);
        else if (!strcmp(key, "--sink-port")) o->sink_port = atoi(val);
        else if (!strcmp(key, "--session-port")) o->session_port = atoi(val);
        else if (!strcmp(key, "--lifetime")) o->lifetime = atof(val);
        else if (!strcmp(key, "--bind")) o->bind = val;
        else goto bad;
        continue;
    bad:
        fprintf(stderr, "loadgen: bad option %s %s\n", key, val);
        exit(2);
    }
    if (o->size < 1 || o->size > 1400 || o->concurrency < 1 || o->streams < 1 || o->conns < 1) {
        fprintf(stderr, "loadgen: option out of range\n");
        exit(2);
    }
}

static void need_target(const struct options *o) {
    if (!o->has_target) {
        fprintf(stderr, "loadgen: --target is required\n");
        exit(2);
    }
}

/* ---------------------------------------------------------------- serve */

enum { FD_NONE, FD_ECHO_LISTEN, FD_SINK_LISTEN, FD_SESSION_LISTEN, FD_ECHO, FD_SINK, FD_SESSION };

struct fdinfo {
    uint8_t kind;
    uint8_t header_got;
    uint8_t header[8];
    uint64_t remaining;
};

static int listen_on(const char *host, int port) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    struct sockaddr_in6 sa6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    int v6 = strchr(host, ':') != NULL;
    if (v6 ? inet_pton(AF_INET6, host, &sa6.sin6_addr) != 1
           : inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad --bind address %s\n", host);
        exit(2);
    }
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (v6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    int bad = v6 ? bind(fd, (struct sockaddr *)&sa6, sizeof sa6)
                 : bind(fd, (struct sockaddr *)&sa, sizeof sa);
    if (bad || listen(fd, 4096)) die("listen");
    return fd;
}

static int bound_port(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &len);
    return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);
}

static void sink_readable(int fd, struct fdinfo *info, int *closed) {
    static uint8_t scratch[65536];
    for (;;) {
        ssize_t n;
        if (info->header_got < 8) {
            n = recv(fd, info->header + info->header_got, 8 - info->header_got, 0);
            if (n > 0) {
                info->header_got += (uint8_t)n;
                if (info->header_got == 8) {
                    uint64_t len = 0;
                    for (int i = 0; i < 8; i++) len = (len << 8) | info->header[i];
                    info->remaining = len;
                    if (len == 0) send(fd, "K", 1, MSG_NOSIGNAL);
                }
                continue;
            }
        } else if (info->remaining > 0) {
            size_t want = info->remaining < (1 << 20) ? info->remaining : (1 << 20);
            /* MSG_TRUNC on TCP discards without copying: the sink stays cheap. */
            n = recv(fd, scratch, want, MSG_TRUNC);
            if (n > 0) {
                info->remaining -= (uint64_t)n;
                if (info->remaining == 0) send(fd, "K", 1, MSG_NOSIGNAL);
                continue;
            }
        } else {
            n = recv(fd, scratch, sizeof scratch, 0);
            if (n > 0) continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) *closed = 1;
        return;
    }
}

/* Echo what arrives; a session connection (limit > 0) is closed once it echoed limit bytes. */
static void echo_readable(int fd, struct fdinfo *info, uint64_t limit, int *closed) {
    uint8_t buf[65536];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            info->remaining += (uint64_t)n; /* bytes echoed so far */
            ssize_t done = 0;
            while (done < n) {
                ssize_t w = send(fd, buf + done, (size_t)(n - done), MSG_NOSIGNAL);
                if (w > 0) done += w;
                else if (w < 0 && errno == EAGAIN) poll(&(struct pollfd){fd, POLLOUT, 0}, 1, 100);
                else {
                    *closed = 1;
                    return;
                }
            }
            if (limit && info->remaining >= limit) {
                *closed = 1;
                return;
            }
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) *closed = 1;
        return;
    }
}

static int cmd_serve(const struct options *o) {
    static struct fdinfo infos[MAX_FDS];
    int ep = epoll_create1(0);
    int echo_fd = listen_on(o->bind, o->echo_port), sink_fd = listen_on(o->bind, o->sink_port);
    int session_fd = listen_on(o->bind, o->session_port);
    infos[echo_fd].kind = FD_ECHO_LISTEN;
    infos[sink_fd].kind = FD_SINK_LISTEN;
    infos[session_fd].kind = FD_SESSION_LISTEN;
    int listeners[3] = {echo_fd, sink_fd, session_fd};
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = listeners[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, listeners[i], &ev);
    }
    printf("echo %d\nsink %d\nsession %d\n", bound_port(echo_fd), bound_port(sink_fd),
           bound_port(session_fd));
    fflush(stdout);
    double end = now() + o->lifetime;
    struct epoll_event events[256];
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 1000);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            struct fdinfo *info = &infos[fd];
            if (info->kind <= FD_SESSION_LISTEN) {
                int c;
                while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAX_FDS) {
                        close(c);
                        continue;
                    }
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    memset(&infos[c], 0, sizeof infos[c]);
                    infos[c].kind = info->kind == FD_ECHO_LISTEN   ? FD_ECHO
                                    : info->kind == FD_SINK_LISTEN ? FD_SINK
                                                                   : FD_SESSION;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            int closed = 0;
            if (info->kind == FD_ECHO) echo_readable(fd, info, 0, &closed);
            else if (info->kind == FD_SESSION) echo_readable(fd, info, (uint64_t)o->size, &closed);
            else sink_readable(fd, info, &closed);
            if (closed || (events[i].events & (EPOLLERR | EPOLLHUP))) {
                info->kind = FD_NONE;
                close(fd);
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- sessions */

enum { S_CONNECT, S_GREET, S_REPLY, S_ECHO, S_EOF };

struct session {
    int fd, state;
    size_t got;
    double started;
    uint8_t buf[1500];
};

struct session_run {
    const struct options *o;
    int ep;
    long started, completed, errors;
    double *latencies;
    uint8_t payload[1500];
};

static int session_start(struct session_run *r, struct session *s) {
    const struct sockaddr_in *dst = r->o->has_proxy ? &r->o->proxy : &r->o->target;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) return -1;
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->started = now();
    s->state = S_CONNECT;
    s->got = 0;
    r->started++;
    if (connect(s->fd, (const struct sockaddr *)dst, sizeof *dst) != 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        r->errors++;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    epoll_ctl(r->ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

static void session_end(struct session_run *r, struct session *s, int ok) {
    if (ok) {
        if (r->completed < r->o->max_sessions) r->latencies[r->completed] = now() - s->started;
        r->completed++;
    } else {
        r->errors++;
    }
    close(s->fd);
    s->fd = -1;
}

static int session_send(int fd, const uint8_t *buf, size_t len) {
    return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}

/* Advance one session; returns 1 when it finished (either way). */
static int session_step(struct session_run *r, struct session *s) {
    const struct options *o = r->o;
    if (s->state == S_CONNECT) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) return session_end(r, s, 0), 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(r->ep, EPOLL_CTL_MOD, s->fd, &ev);
        static const uint8_t greeting[3] = {5, 1, 0};
        int bad = o->has_proxy ? session_send(s->fd, greeting, 3)
                               : session_send(s->fd, r->payload, (size_t)o->size);
        s->state = o->has_proxy ? S_GREET : S_ECHO;
        if (bad) return session_end(r, s, 0), 1;
        return 0;
    }
    if (s->state == S_EOF) { /* the server closes first: see the comment at the top */
        ssize_t n = recv(s->fd, s->buf, sizeof s->buf, 0);
        if (n < 0 && errno == EAGAIN) return 0;
        session_end(r, s, n == 0);
        return 1;
    }
    size_t want = s->state == S_GREET ? 2 : s->state == S_ECHO ? (size_t)o->size : 5;
    if (s->state == S_REPLY && s->got >= 5) want = socks_reply_len(s->buf);
    if (want == 0) return session_end(r, s, 0), 1;
    ssize_t n = recv(s->fd, s->buf + s->got, want - s->got, 0);
    if (n < 0 && errno == EAGAIN) return 0;
    if (n <= 0) return session_end(r, s, 0), 1;
    s->got += (size_t)n;
    if (s->state == S_REPLY && s->got == 5) want = socks_reply_len(s->buf);
    if (s->got < want) return 0;
    if (s->state == S_GREET) {
        if (s->buf[0] != 5 || s->buf[1] != 0) return session_end(r, s, 0), 1;
        uint8_t req[10];
        size_t len = socks_request(req, 1, &o->target);
        s->state = S_REPLY;
        s->got = 0;
        if (session_send(s->fd, req, len)) return session_end(r, s, 0), 1;
        return 0;
    }
    if (s->state == S_REPLY) {
        if (s->buf[1] != 0) return session_end(r, s, 0), 1;
        s->state = S_ECHO;
        s->got = 0;
        if (session_send(s->fd, r->payload, (size_t)o->size)) return session_end(r, s, 0), 1;
        return 0;
    }
    if (memcmp(s->buf, r->payload, (size_t)o->size) != 0) return session_end(r, s, 0), 1;
    s->state = S_EOF;
    return 0;
}

static int cmd_sessions(const struct options *o) {
    need_target(o);
    struct session_run r = {.o = o, .ep = epoll_create1(0)};
    r.latencies = calloc((size_t)o->max_sessions, sizeof(double));
    for (int i = 0; i < o->size; i++) r.payload[i] = (uint8_t)('a' + i % 26);
    struct session *sessions = calloc((size_t)o->concurrency, sizeof *sessions);
    double cpu0 = cpu_seconds(), t0 = now(), deadline = t0 + o->seconds;
    double hard_deadline = deadline + 5.0; /* in-flight sessions may finish, not hang us */
    int active = 0;
    for (int i = 0; i < o->concurrency && r.started < o->max_sessions; i++)
        if (session_start(&r, &sessions[i]) == 0) active++;
    struct epoll_event events[256];
    while (active > 0 && now() < hard_deadline) {
        int n = epoll_wait(r.ep, events, 256, 100);
        for (int i = 0; i < n; i++) {
            struct session *s = events[i].data.ptr;
            if (s->fd < 0 || !session_step(&r, s)) continue;
            active--;
            /* Keep the concurrency level until the count or the time runs out. */
            while (r.started < o->max_sessions && now() < deadline) {
                if (session_start(&r, s) == 0) {
                    active++;
                    break;
                }
            }
        }
    }
    double elapsed = now() - t0, cpu = cpu_seconds() - cpu0;
    long abandoned = active;
    long samples = r.completed < o->max_sessions ? r.completed : o->max_sessions;
    qsort(r.latencies, (size_t)samples, sizeof(double), cmp_double);
    double p50 = samples ? r.latencies[samples / 2] : 0;
    double p99 = samples ? r.latencies[(long)(samples * 0.99) < samples ? (long)(samples * 0.99)
                                                                       : samples - 1]
                         : 0;
    printf("{\"mode\":\"sessions\",\"completed\":%ld,\"errors\":%ld,\"abandoned\":%ld,"
           "\"elapsed\":%.4f,\"rate\":%.1f,\"p50_ms\":%.4f,\"p99_ms\":%.4f,"
           "\"cpu_seconds\":%.4f,\"concurrency\":%d,\"size\":%d}\n",
           r.completed, r.errors, abandoned, elapsed, r.completed / elapsed, p50 * 1e3,
           p99 * 1e3, cpu, o->concurrency, o->size);
    return 0;
}

/* ---------------------------------------------------------------- bulk */

struct stream {
    const struct options *o;
    pthread_barrier_t *ready;
    long long bytes, sent;
    int fd, acked;
    double finished;
};

static double bulk_deadline;

static void *stream_main(void *arg) {
    struct stream *st = arg;
    static uint8_t chunk[BULK_CHUNK];
    pthread_barrier_wait(st->ready);
    uint8_t header[8];
    for (int i = 0; i < 8; i++) header[i] = (uint8_t)((unsigned long long)st->bytes >> (56 - 8 * i));
    if (st->fd < 0 || write_all(st->fd, header, 8)) return NULL;
    /* The 1 s socket timeout makes blocking sends return to look at the deadline. */
    while (st->sent < st->bytes && now() < bulk_deadline) {
        long long left = st->bytes - st->sent;
        size_t len = left < BULK_CHUNK ? (size_t)left : BULK_CHUNK;
        ssize_t n = send(st->fd, chunk, len, MSG_NOSIGNAL);
        if (n > 0) st->sent += n;
        else if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        else return NULL;
    }
    uint8_t ack;
    while (st->sent == st->bytes && now() < bulk_deadline) {
        ssize_t n = recv(st->fd, &ack, 1, 0);
        if (n == 1) {
            st->acked = ack == 'K';
            break;
        }
        if (!(n < 0 && (errno == EAGAIN || errno == EINTR))) break;
    }
    st->finished = now();
    return NULL;
}

static int cmd_bulk(const struct options *o) {
    need_target(o);
    int n = o->streams;
    struct stream *streams = calloc((size_t)n, sizeof *streams);
    pthread_t *threads = calloc((size_t)n, sizeof *threads);
    pthread_barrier_t ready;
    pthread_barrier_init(&ready, NULL, (unsigned)n + 1);
    int connected = 0;
    for (int i = 0; i < n; i++) {
        streams[i].o = o;
        streams[i].ready = &ready;
        streams[i].bytes = o->bytes / n + (i < o->bytes % n ? 1 : 0);
        streams[i].fd = open_relayed(o->has_proxy ? &o->proxy : NULL, &o->target, 10.0);
        if (streams[i].fd >= 0) set_timeouts(streams[i].fd, 1.0);
        connected += streams[i].fd >= 0;
        pthread_create(&threads[i], NULL, stream_main, &streams[i]);
    }
    double cpu0 = cpu_seconds(), t0 = now();
    bulk_deadline = t0 + o->seconds;
    pthread_barrier_wait(&ready);
    long long sent = 0, acked_bytes = 0;
    int acked = 0;
    double last = t0;
    for (int i = 0; i < n; i++) {
        pthread_join(threads[i], NULL);
        sent += streams[i].sent;
        if (streams[i].acked) {
            acked++;
            acked_bytes += streams[i].bytes;
            if (streams[i].finished > last) last = streams[i].finished;
        }
        if (streams[i].fd >= 0) close(streams[i].fd);
    }
    double elapsed = (acked == n ? last : now()) - t0, cpu = cpu_seconds() - cpu0;
    printf("{\"mode\":\"bulk\",\"streams\":%d,\"connected\":%d,\"acked\":%d,\"bytes\":%lld,"
           "\"sent\":%lld,\"elapsed\":%.4f,\"mb_per_s\":%.2f,\"cpu_seconds\":%.4f,"
           "\"complete\":%s}\n",
           n, connected, acked, o->bytes, sent, elapsed, (acked == n ? acked_bytes : sent) / elapsed / 1e6,
           cpu, acked == n ? "true" : "false");
    return 0;
}

/* ---------------------------------------------------------------- udp */

struct udp_receiver {
    int fd, size;
    long expected, received;
    double first, last, stop_after_idle, deadline;
    volatile int sending_done;
    volatile double send_finished;
};

static void *udp_receive(void *arg) {
    struct udp_receiver *rx = arg;
    uint8_t buf[65536];
    set_timeouts(rx->fd, 0.1);
    while (rx->received < rx->expected && now() < rx->deadline) {
        ssize_t n = recv(rx->fd, buf, sizeof buf, 0);
        if (n == rx->size) {
            rx->last = now();
            long before = rx->received; /* the sender reads it to keep its window */
            __atomic_store_n(&rx->received, before + 1, __ATOMIC_RELAXED);
            if (before == 0) rx->first = rx->last;
        } else if (n < 0 && rx->sending_done) {
            double quiet_since = rx->last > rx->send_finished ? rx->last : rx->send_finished;
            if (now() - quiet_since > rx->stop_after_idle) break;
        }
    }
    return NULL;
}

static int udp_socket(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa)) die("udp socket");
    int big = 8 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    return fd;
}

static int cmd_udp(const struct options *o) {
    int sink = udp_socket(), sender = udp_socket(), control = -1;
    struct sockaddr_in sink_addr, sender_addr, relay;
    socklen_t len = sizeof sink_addr;
    getsockname(sink, (struct sockaddr *)&sink_addr, &len);
    len = sizeof sender_addr;
    getsockname(sender, (struct sockaddr *)&sender_addr, &len);
    size_t header = 0;
    if (o->has_proxy) {
        control = socket(AF_INET, SOCK_STREAM, 0);
        set_timeouts(control, 5.0);
        if (connect(control, (struct sockaddr *)&o->proxy, sizeof o->proxy)) die("connect proxy");
        memset(&relay, 0, sizeof relay);
        int rep = socks_handshake(control, 3, &sender_addr, &relay);
        if (rep != 0 || relay.sin_port == 0) {
            printf("{\"mode\":\"udp\",\"supported\":false,\"rep\":%d}\n", rep);
            return 0;
        }
        if (relay.sin_addr.s_addr == 0) relay.sin_addr = o->proxy.sin_addr;
        header = 10;
    } else {
        relay = sink_addr;
    }
    if (connect(sender, (struct sockaddr *)&relay, sizeof relay)) die("connect relay");
    uint8_t datagram[2048] = {0};
    if (header) {
        /* The UDP request header is RSV RSV FRAG ATYP ADDR PORT: socks_request's layout with
         * the first two bytes zeroed; FRAG (byte 2) is already 0. */
        socks_request(datagram, 0, &sink_addr);
        datagram[0] = datagram[1] = 0;
    }
    struct udp_receiver rx = {.fd = sink, .size = o->size, .expected = o->count,
                              .stop_after_idle = 1.0};
    double cpu0 = cpu_seconds(), t0 = now();
    rx.deadline = t0 + o->seconds;
    pthread_t thread;
    pthread_create(&thread, NULL, udp_receive, &rx);
    long sent = 0, send_errors = 0, written_off = 0;
    double last_progress = t0;
    long last_received = 0;
    for (long i = 0; i < o->count && now() < rx.deadline; i++) {
        /* Windowed: at most --window datagrams in flight, so the rate is what the relay
         * sustains rather than what a socket buffer absorbs; a window that makes no
         * progress for 20 ms is written off (counted as lost unless it arrives later). */
        while (o->window > 0) {
            long received = __atomic_load_n(&rx.received, __ATOMIC_RELAXED);
            if (sent - received - written_off < o->window) break;
            double t = now();
            if (received != last_received) {
                last_received = received;
                last_progress = t;
            } else if (t - last_progress > 0.02) {
                written_off = sent - received;
                last_progress = t;
                break;
            }
            if (t >= rx.deadline) break;
            usleep(50); /* sleeping, not spinning: the relay needs the CPU */
        }
        memcpy(datagram + header, &i, sizeof i);
        if (send(sender, datagram, header + (size_t)o->size, 0) > 0) sent++;
        else send_errors++;
        if (o->rate > 0 && (i & 63) == 63) {
            double ahead = t0 + (double)(i + 1) / o->rate - now();
            if (ahead > 0) usleep((useconds_t)(ahead * 1e6));
        }
    }
    double send_elapsed = now() - t0;
    rx.send_finished = now();
    rx.sending_done = 1;
    pthread_join(thread, NULL);
    double cpu = cpu_seconds() - cpu0;
    double span = rx.received ? rx.last - t0 : now() - t0;
    printf("{\"mode\":\"udp\",\"supported\":true,\"sent\":%ld,\"send_errors\":%ld,"
           "\"received\":%ld,\"loss\":%.5f,\"offered_rate\":%.1f,\"rate\":%.1f,"
           "\"elapsed\":%.4f,\"cpu_seconds\":%.4f,\"size\":%d,\"window\":%ld}\n",
           sent, send_errors, rx.received, sent ? 1.0 - (double)rx.received / sent : 1.0,
           sent / send_elapsed, rx.received / span, span, cpu, o->size, o->window);
    if (control >= 0) close(control);
    return 0;
}

/* ---------------------------------------------------------------- idle */

static int cmd_idle(const struct options *o) {
    need_target(o);
    int *fds = calloc((size_t)o->conns, sizeof *fds);
    uint8_t payload[64], echo[64];
    memset(payload, 'i', sizeof payload);
    double t0 = now(), deadline = t0 + o->seconds;
    int opened = 0, errors = 0;
    /* Open the connections one after another: each must relay one echo before it counts. */
    while (opened < o->conns && errors < o->conns && now() < deadline) {
        int fd = open_relayed(o->has_proxy ? &o->proxy : NULL, &o->target, 5.0);
        if (fd < 0 || write_all(fd, payload, sizeof payload) || read_exact(fd, echo, sizeof echo) ||
            memcmp(payload, echo, sizeof echo)) {
            if (fd >= 0) close(fd);
            errors++;
            continue;
        }
        fds[opened++] = fd;
    }
    double open_elapsed = now() - t0;
    printf("READY %d %d\n", opened, errors);
    fflush(stdout);
    /* Hold until the driver writes a line (or closes stdin), at most the remaining time. */
    double left = deadline + 60.0 - now();
    struct pollfd pfd = {STDIN_FILENO, POLLIN, 0};
    poll(&pfd, 1, (int)(left * 1000));
    for (int i = 0; i < opened; i++) close(fds[i]);
    printf("{\"mode\":\"idle\",\"opened\":%d,\"errors\":%d,\"open_elapsed\":%.4f,"
           "\"cpu_seconds\":%.4f}\n",
           opened, errors, open_elapsed, cpu_seconds());
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen serve|sessions|bulk|udp|idle [options]\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the benchmark driver */
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    struct options o;
    parse_options(argc, argv, &o);
    if (!strcmp(argv[1], "serve")) return cmd_serve(&o);
    if (!strcmp(argv[1], "sessions")) return cmd_sessions(&o);
    if (!strcmp(argv[1], "bulk")) return cmd_bulk(&o);
    if (!strcmp(argv[1], "udp")) return cmd_udp(&o);
    if (!strcmp(argv[1], "idle")) return cmd_idle(&o);
    fprintf(stderr, "loadgen: unknown mode %s\n", argv[1]);
    return 2;
}
