/*
 * loadclient — single-threaded epoll WebSocket load client for fxproxy benchmarks.
 *
 * Opens N WebSocket connections (rate-limited connects), sends one subscribe
 * frame per connection, then reads ticks and records publish->receive latency
 * (now(CLOCK_REALTIME) in µs minus the tick's "pt" field) into a log-linear
 * histogram. A fraction of the clients are "slow": they subscribe and then never
 * read again (small SO_RCVBUF), so the server has to deal with them.
 *
 * Progress events go to stderr as JSON lines:
 *   {"event":"ready",...}         every connection is subscribed (or failed)
 *   {"event":"window_start",...}  warmup over, measuring
 *   {"event":"window_end",...}    measuring over
 * The result is ONE JSON line on stdout.
 *
 * Build: gcc -O2 -Wall -Wextra -o loadclient loadclient.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (16u * 1024u * 1024u)
#define INIT_RBUF 16384u
#define MAX_CLOSE_CODES 64
#define MAX_EVENTS 1024

/* ---------- histogram: exact below 128 µs, then 64 linear sub-buckets per power of two (<1.6 % error) ---------- */
#define HIST_LINEAR 128u
#define HIST_HALF 64u
#define HIST_BUCKETS (HIST_HALF * 40u)

static uint64_t hist[HIST_BUCKETS];
static uint64_t hist_count, hist_max, hist_sum, hist_negative;

static inline unsigned msb64(uint64_t v) { return 63u - (unsigned)__builtin_clzll(v); }

static inline unsigned hist_index(uint64_t v) {
    if (v < HIST_LINEAR) return (unsigned)v;
    unsigned e = msb64(v) - 6u; /* (v >> e) is in [64, 128) */
    unsigned idx = HIST_HALF * e + (unsigned)(v >> e);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1u;
}

/* Representative value (middle of the bucket) for an index. */
static uint64_t hist_value(unsigned idx) {
    if (idx < HIST_LINEAR) return idx;
    unsigned e = idx / HIST_HALF - 1u;
    uint64_t lo = ((uint64_t)(idx % HIST_HALF) + HIST_HALF) << e;
    return lo + ((1ull << e) >> 1);
}

static void hist_record(int64_t v) {
    if (v < 0) {
        hist_negative++;
        v = 0;
    }
    uint64_t u = (uint64_t)v;
    hist[hist_index(u)]++;
    hist_count++;
    hist_sum += u;
    if (u > hist_max) hist_max = u;
}

static uint64_t hist_percentile(double p) {
    if (hist_count == 0) return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)hist_count + 0.5);
    if (rank < 1) rank = 1;
    if (rank > hist_count) rank = hist_count;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank) {
            uint64_t v = hist_value(i);
            return v > hist_max ? hist_max : v;
        }
    }
    return hist_max;
}

/* ---------- options ---------- */
static const char *opt_host = "127.0.0.1";
static int opt_port = 0;
static const char *opt_path = "/v1/stream";
static long opt_clients = 100;
static char *opt_symbols_arg = NULL;
static double opt_duration = 10.0;
static double opt_max_rate = 0.0; /* > 0: subscribe with "max_rate" (ticks/s per symbol) */
static double opt_warmup = 0.0;
static double opt_slow_fraction = 0.0;
static double opt_connect_rate = 1000.0;
static long opt_max_pending = 256;
static double opt_connect_timeout = 60.0;
static int opt_slow_rcvbuf = 4096;
static double opt_start_timeout = 15.0;
static double opt_drain_slow = 3.0;
static double opt_linger = 0.0;

/* ---------- symbols ---------- */
static char **symbols;
static size_t nsym;
static size_t *sym_table; /* open addressing: index+1, 0 = empty */
static size_t sym_table_mask;

static uint64_t fnv1a(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static long sym_lookup(const char *s, size_t n) {
    size_t i = (size_t)fnv1a(s, n) & sym_table_mask;
    for (;;) {
        size_t v = sym_table[i];
        if (v == 0) return -1;
        const char *c = symbols[v - 1];
        if (strlen(c) == n && memcmp(c, s, n) == 0) return (long)(v - 1);
        i = (i + 1) & sym_table_mask;
    }
}

static void parse_symbols(void) {
    size_t cap = 16;
    symbols = malloc(cap * sizeof(*symbols));
    char *save = NULL;
    for (char *tok = strtok_r(opt_symbols_arg, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (*tok == '\0') continue;
        if (nsym == cap) {
            cap *= 2;
            symbols = realloc(symbols, cap * sizeof(*symbols));
        }
        symbols[nsym++] = tok;
    }
    size_t tsize = 16;
    while (tsize < nsym * 4) tsize <<= 1;
    sym_table = calloc(tsize, sizeof(*sym_table));
    sym_table_mask = tsize - 1;
    for (size_t k = 0; k < nsym; k++) {
        size_t n = strlen(symbols[k]);
        if (sym_lookup(symbols[k], n) >= 0) continue;
        size_t i = (size_t)fnv1a(symbols[k], n) & sym_table_mask;
        while (sym_table[i]) i = (i + 1) & sym_table_mask;
        sym_table[i] = k + 1;
    }
}

/* ---------- connections ---------- */
enum cstate { C_IDLE = 0, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_SLOW_PARKED, C_DONE };

struct conn {
    int fd;
    unsigned char state;
    unsigned char slow;
    unsigned char subscribed; /* got {"type":"subscribed"} (or error) */
    unsigned char counted_ready;
    unsigned char want_out;
    unsigned char *rbuf;
    size_t rlen, rcap;
    unsigned char *wbuf;
    size_t wlen, wcap;
    int64_t *last_seq; /* per symbol, -1 = none yet (normal clients only) */
};

static struct conn *conns;
static int epfd = -1;
static struct sockaddr_storage server_addr;
static socklen_t server_addr_len;
static char *handshake_req;
static size_t handshake_len;
static unsigned char *subscribe_frame_payload;
static size_t subscribe_payload_len;

/* counters */
static long n_started, n_pending, n_connected, n_ready, n_failed_handshake, n_slow;
static long n_disconnects, n_slow_disconnects;
static uint64_t n_received; /* ticks in window (normal clients) */
static uint64_t n_frames_total, n_ticks_total, n_snapshots, n_other_text, n_pings;
static uint64_t n_seq_gaps, n_seq_missing, n_seq_back, n_subscribe_errors;
struct code_table {
    int code[MAX_CLOSE_CODES];
    uint64_t count[MAX_CLOSE_CODES];
    int n;
};
static struct code_table close_tab;      /* normal clients, until the window ends */
static struct code_table slow_close_tab; /* slow clients, seen while draining them at the end */
static long n_slow_drain_closed;
static int draining;
static int measuring;
static volatile sig_atomic_t stop_requested;

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rng32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline int64_t real_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadclient: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void count_close(struct code_table *t, int code) {
    for (int i = 0; i < t->n; i++) {
        if (t->code[i] == code) {
            t->count[i]++;
            return;
        }
    }
    if (t->n < MAX_CLOSE_CODES) {
        t->code[t->n] = code;
        t->count[t->n] = 1;
        t->n++;
    }
}

static void print_codes(const struct code_table *t) {
    printf("{");
    for (int i = 0; i < t->n; i++) printf("%s\"%d\":%" PRIu64, i ? "," : "", t->code[i], t->count[i]);
    printf("}");
}

static void mark_ready(struct conn *c) {
    if (!c->counted_ready) {
        c->counted_ready = 1;
        n_ready++;
    }
}

static void conn_close(struct conn *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    if (c->state == C_CONNECTING || c->state == C_HANDSHAKE) n_pending--;
    c->state = C_DONE;
    free(c->rbuf);
    c->rbuf = NULL;
    c->rlen = c->rcap = 0;
    free(c->wbuf);
    c->wbuf = NULL;
    c->wlen = c->wcap = 0;
    mark_ready(c);
}

static void handshake_failed(struct conn *c) {
    n_failed_handshake++;
    conn_close(c);
}

/* code: close code from a close frame, 1006 = EOF/reset without one, 0 = unknown (slow client) */
static void disconnected(struct conn *c, int code) {
    if (draining) {
        n_slow_drain_closed++;
        count_close(&slow_close_tab, code > 0 ? code : 1006);
    } else {
        n_disconnects++;
        if (c->slow) n_slow_disconnects++;
        else if (code > 0) count_close(&close_tab, code);
    }
    conn_close(c);
}

static void set_events(struct conn *c, uint32_t ev) {
    struct epoll_event e;
    memset(&e, 0, sizeof(e));
    e.events = ev;
    e.data.u64 = (uint64_t)(c - conns);
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
}

static uint32_t base_events(struct conn *c) {
    if (c->state == C_SLOW_PARKED) return EPOLLRDHUP;
    return EPOLLIN | EPOLLRDHUP;
}

/* Queue bytes for writing; try to write immediately. Returns -1 on fatal error. */
static int conn_write(struct conn *c, const void *data, size_t len) {
    const unsigned char *p = data;
    if (c->wlen == 0) {
        while (len > 0) {
            ssize_t w = send(c->fd, p, len, MSG_NOSIGNAL);
            if (w > 0) {
                p += w;
                len -= (size_t)w;
            } else if (w < 0 && errno == EINTR) {
                continue;
            } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                break;
            } else {
                return -1;
            }
        }
        if (len == 0) return 0;
    }
    if (c->wlen + len > c->wcap) {
        size_t ncap = c->wcap ? c->wcap : 1024;
        while (ncap < c->wlen + len) ncap *= 2;
        c->wbuf = realloc(c->wbuf, ncap);
        c->wcap = ncap;
    }
    memcpy(c->wbuf + c->wlen, p, len);
    c->wlen += len;
    if (!c->want_out) {
        c->want_out = 1;
        set_events(c, base_events(c) | EPOLLOUT);
    }
    return 0;
}

static int conn_flush(struct conn *c) {
    size_t off = 0;
    while (off < c->wlen) {
        ssize_t w = send(c->fd, c->wbuf + off, c->wlen - off, MSG_NOSIGNAL);
        if (w > 0) {
            off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            return -1;
        }
    }
    memmove(c->wbuf, c->wbuf + off, c->wlen - off);
    c->wlen -= off;
    if (c->wlen == 0 && c->want_out) {
        c->want_out = 0;
        set_events(c, base_events(c));
    }
    return 0;
}

/* Build a masked client frame. */
static int send_frame(struct conn *c, int opcode, const unsigned char *payload, size_t len) {
    unsigned char hdr[14];
    size_t h = 0;
    hdr[h++] = (unsigned char)(0x80 | (opcode & 0x0f));
    if (len < 126) {
        hdr[h++] = (unsigned char)(0x80 | len);
    } else if (len < 65536) {
        hdr[h++] = 0x80 | 126;
        hdr[h++] = (unsigned char)(len >> 8);
        hdr[h++] = (unsigned char)len;
    } else {
        hdr[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) hdr[h++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    uint32_t mk = rng32();
    unsigned char mask[4] = {(unsigned char)mk, (unsigned char)(mk >> 8), (unsigned char)(mk >> 16),
                             (unsigned char)(mk >> 24)};
    memcpy(hdr + h, mask, 4);
    h += 4;
    unsigned char stackbuf[512];
    unsigned char *buf = h + len <= sizeof(stackbuf) ? stackbuf : malloc(h + len);
    memcpy(buf, hdr, h);
    for (size_t i = 0; i < len; i++) buf[h + i] = payload[i] ^ mask[i & 3];
    int rc = conn_write(c, buf, h + len);
    if (buf != stackbuf) free(buf);
    return rc;
}

static void start_connection(struct conn *c, int slow) {
    int fd = socket(server_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "loadclient: socket: %s\n", strerror(errno));
        n_failed_handshake++;
        c->state = C_DONE;
        mark_ready(c);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (slow) {
        int sz = opt_slow_rcvbuf;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
    }
    c->fd = fd;
    c->slow = (unsigned char)slow;
    c->state = C_CONNECTING;
    n_pending++;
    struct epoll_event e;
    memset(&e, 0, sizeof(e));
    e.events = EPOLLOUT | EPOLLRDHUP;
    e.data.u64 = (uint64_t)(c - conns);
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) die("epoll_ctl add: %s", strerror(errno));
    int r = connect(fd, (struct sockaddr *)&server_addr, server_addr_len);
    if (r < 0 && errno != EINPROGRESS) {
        fprintf(stderr, "loadclient: connect: %s\n", strerror(errno));
        handshake_failed(c);
    }
}

static void on_connected(struct conn *c) {
    int err = 0;
    socklen_t el = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err != 0) {
        if (n_failed_handshake < 5) fprintf(stderr, "loadclient: connect failed: %s\n", strerror(err));
        handshake_failed(c);
        return;
    }
    c->state = C_HANDSHAKE;
    c->rcap = INIT_RBUF;
    c->rbuf = malloc(c->rcap);
    c->rlen = 0;
    set_events(c, EPOLLIN | EPOLLRDHUP);
    if (conn_write(c, handshake_req, handshake_len) < 0) handshake_failed(c);
}

/* Find "key" in [p, p+n) and parse the integer after it. */
static int find_int(const unsigned char *p, size_t n, const char *key, size_t klen, int64_t *out) {
    const unsigned char *k = memmem(p, n, key, klen);
    if (!k) return 0;
    const unsigned char *q = k + klen, *end = p + n;
    while (q < end && *q == ' ') q++;
    int neg = 0;
    if (q < end && *q == '-') {
        neg = 1;
        q++;
    }
    if (q >= end || *q < '0' || *q > '9') return 0;
    int64_t v = 0;
    while (q < end && *q >= '0' && *q <= '9') {
        v = v * 10 + (*q - '0');
        q++;
    }
    *out = neg ? -v : v;
    return 1;
}

static void on_text(struct conn *c, const unsigned char *p, size_t n) {
    if (c->slow) return;
    int64_t pt;
    if (find_int(p, n, "\"pt\":", 5, &pt)) {
        if (memmem(p, n, "\"snapshot\":true", 15)) {
            n_snapshots++;
            return;
        }
        n_ticks_total++;
        if (measuring) {
            n_received++;
            hist_record(real_now_us() - pt);
        }
        /* seq tracking per (client, symbol) */
        const unsigned char *s = memmem(p, n, "\"symbol\":\"", 10);
        int64_t seq;
        if (s && find_int(p, n, "\"seq\":", 6, &seq)) {
            s += 10;
            const unsigned char *e = memchr(s, '"', (size_t)(p + n - s));
            if (e) {
                long idx = sym_lookup((const char *)s, (size_t)(e - s));
                if (idx >= 0) {
                    int64_t last = c->last_seq[idx];
                    if (last >= 0 && seq != last + 1) {
                        n_seq_gaps++;
                        if (seq > last + 1)
                            n_seq_missing += (uint64_t)(seq - last - 1);
                        else
                            n_seq_back++;
                    }
                    if (last < 0 || seq > last) c->last_seq[idx] = seq;
                }
            }
        }
        return;
    }
    n_other_text++;
    if (!c->subscribed) {
        if (memmem(p, n, "\"subscribed\"", 12)) {
            c->subscribed = 1;
            mark_ready(c);
        } else if (memmem(p, n, "\"error\"", 7)) {
            c->subscribed = 1;
            n_subscribe_errors++;
            if (n_subscribe_errors <= 3) fprintf(stderr, "loadclient: subscribe error: %.*s\n", (int)n, p);
            mark_ready(c);
        }
    }
}

/* Parse complete frames in rbuf. Returns -1 if the connection was closed. */
static int process_frames(struct conn *c) {
    size_t off = 0;
    while (c->rlen - off >= 2) {
        unsigned char *f = c->rbuf + off;
        size_t avail = c->rlen - off;
        int opcode = f[0] & 0x0f;
        int masked = f[1] & 0x80;
        uint64_t len = f[1] & 0x7f;
        size_t h = 2;
        if (len == 126) {
            if (avail < 4) break;
            len = ((uint64_t)f[2] << 8) | f[3];
            h = 4;
        } else if (len == 127) {
            if (avail < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | f[2 + i];
            h = 10;
        }
        if (masked) h += 4;
        if (len > MAX_FRAME) {
            fprintf(stderr, "loadclient: frame too large (%" PRIu64 ")\n", len);
            disconnected(c, 1009);
            return -1;
        }
        if (avail < h + len) {
            if (h + len > c->rcap) {
                c->rcap = h + (size_t)len;
                if (off) {
                    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
                    c->rlen -= off;
                    off = 0;
                }
                c->rbuf = realloc(c->rbuf, c->rcap);
            }
            break;
        }
        unsigned char *payload = f + h;
        if (masked) {
            unsigned char *mk = f + h - 4;
            for (uint64_t i = 0; i < len; i++) payload[i] ^= mk[i & 3];
        }
        n_frames_total++;
        switch (opcode) {
        case 0x1: /* text */
        case 0x2: /* binary: parse the same way */
            on_text(c, payload, (size_t)len);
            break;
        case 0x0: /* continuation: not expected for ticks, ignored */
            break;
        case 0x8: { /* close */
            int code = len >= 2 ? (payload[0] << 8) | payload[1] : 1005;
            unsigned char reply[2] = {(unsigned char)(code >> 8), (unsigned char)code};
            if (len >= 2) send_frame(c, 0x8, reply, 2);
            else send_frame(c, 0x8, NULL, 0);
            disconnected(c, code);
            return -1;
        }
        case 0x9: /* ping -> pong */
            n_pings++;
            if (send_frame(c, 0xA, payload, (size_t)len) < 0) {
                disconnected(c, 1006);
                return -1;
            }
            break;
        default: /* pong or reserved: ignore */
            break;
        }
        off += h + (size_t)len;
    }
    if (off) {
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
    }
    return 0;
}

static void on_handshake_data(struct conn *c) {
    unsigned char *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (!end) {
        if (c->rlen >= c->rcap) handshake_failed(c);
        return;
    }
    size_t hlen = (size_t)(end - c->rbuf) + 4;
    if (c->rlen < 12 || memcmp(c->rbuf, "HTTP/1.1 101", 12) != 0) {
        if (n_failed_handshake < 5) {
            unsigned char *eol = memmem(c->rbuf, hlen, "\r\n", 2);
            size_t show = eol ? (size_t)(eol - c->rbuf) : hlen;
            if (show > 200) show = 200;
            fprintf(stderr, "loadclient: handshake refused: %.*s\n", (int)show, c->rbuf);
        }
        handshake_failed(c);
        return;
    }
    n_pending--;
    n_connected++;
    c->state = C_OPEN;
    memmove(c->rbuf, c->rbuf + hlen, c->rlen - hlen);
    c->rlen -= hlen;
    if (send_frame(c, 0x1, subscribe_frame_payload, subscribe_payload_len) < 0) {
        disconnected(c, 1006);
        return;
    }
    if (c->slow) {
        /* never read again; only watch for the server hanging up */
        c->state = C_SLOW_PARKED;
        set_events(c, EPOLLRDHUP | (c->want_out ? EPOLLOUT : 0));
        free(c->rbuf);
        c->rbuf = NULL;
        c->rlen = c->rcap = 0;
        mark_ready(c);
        return;
    }
    c->last_seq = malloc(nsym * sizeof(int64_t));
    for (size_t i = 0; i < nsym; i++) c->last_seq[i] = -1;
    process_frames(c);
}

static void on_readable(struct conn *c) {
    if (c->rlen == c->rcap) {
        c->rcap *= 2;
        c->rbuf = realloc(c->rbuf, c->rcap);
    }
    ssize_t r = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (r == 0) {
        if (c->state == C_HANDSHAKE) handshake_failed(c);
        else disconnected(c, 1006);
        return;
    }
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        if (c->state == C_HANDSHAKE) handshake_failed(c);
        else disconnected(c, 1006);
        return;
    }
    c->rlen += (size_t)r;
    if (c->state == C_HANDSHAKE) on_handshake_data(c);
    else process_frames(c);
}

static void on_event(struct conn *c, uint32_t ev) {
    if (c->state == C_DONE || c->fd < 0) return;
    if (c->state == C_CONNECTING) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
        return;
    }
    if (c->state == C_SLOW_PARKED) {
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            disconnected(c, 0);
            return;
        }
        if ((ev & EPOLLOUT) && conn_flush(c) < 0) disconnected(c, 0);
        return;
    }
    if (ev & EPOLLOUT) {
        if (conn_flush(c) < 0) {
            if (c->state == C_HANDSHAKE) handshake_failed(c);
            else disconnected(c, 1006);
            return;
        }
    }
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable(c);
}

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadclient --host 127.0.0.1 --port P --path '/v1/stream?api_key=K' --clients N\n"
            "                  --symbols EURUSD,GBPUSD --duration SECONDS [--warmup SECONDS]\n"
            "                  [--slow-fraction F] [--connect-rate R] [--max-pending M]\n"
            "                  [--connect-timeout SECONDS] [--slow-rcvbuf BYTES] [--start-timeout SECONDS]\n"
            "The warmup starts when all clients are ready AND the first live tick has arrived\n"
            "(or --start-timeout seconds after ready, whichever comes first).\n"
            "After the window, slow clients read what is queued for them for up to --drain-slow\n"
            "seconds (default 3) to see whether the server closed them (slow_close_codes).\n"
            "--linger SECONDS keeps the connections open (not read) after the window, so that\n"
            "the server can be inspected with all clients still connected.\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) usage();
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (strcmp(a, "--host") == 0) opt_host = v;
        else if (strcmp(a, "--port") == 0) opt_port = atoi(v);
        else if (strcmp(a, "--path") == 0) opt_path = v;
        else if (strcmp(a, "--clients") == 0) opt_clients = atol(v);
        else if (strcmp(a, "--symbols") == 0) opt_symbols_arg = strdup(v);
        else if (strcmp(a, "--duration") == 0) opt_duration = atof(v);
        else if (strcmp(a, "--warmup") == 0) opt_warmup = atof(v);
        else if (strcmp(a, "--slow-fraction") == 0) opt_slow_fraction = atof(v);
        else if (strcmp(a, "--connect-rate") == 0) opt_connect_rate = atof(v);
        else if (strcmp(a, "--max-pending") == 0) opt_max_pending = atol(v);
        else if (strcmp(a, "--connect-timeout") == 0) opt_connect_timeout = atof(v);
        else if (strcmp(a, "--slow-rcvbuf") == 0) opt_slow_rcvbuf = atoi(v);
        else if (strcmp(a, "--start-timeout") == 0) opt_start_timeout = atof(v);
        else if (strcmp(a, "--drain-slow") == 0) opt_drain_slow = atof(v);
        else if (strcmp(a, "--linger") == 0) opt_linger = atof(v);
        else if (strcmp(a, "--max-rate") == 0) opt_max_rate = atof(v);
        else {
            fprintf(stderr, "loadclient: unknown option %s\n", a);
            usage();
        }
    }
    if (opt_port <= 0 || opt_port > 65535 || opt_clients <= 0 || !opt_symbols_arg || opt_duration <= 0 ||
        opt_warmup < 0 || opt_slow_fraction < 0 || opt_slow_fraction > 1 || opt_connect_rate <= 0 ||
        opt_max_pending <= 0)
        usage();
}

static void build_requests(void) {
    char hostport[300];
    snprintf(hostport, sizeof(hostport), "%s:%d", opt_host, opt_port);
    size_t cap = strlen(opt_path) + strlen(hostport) + 512;
    handshake_req = malloc(cap);
    int n = snprintf(handshake_req, cap,
                     "GET %s HTTP/1.1\r\n"
                     "Host: %s\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "User-Agent: fxproxy-loadclient\r\n"
                     "\r\n",
                     opt_path, hostport);
    handshake_len = (size_t)n;
    size_t pcap = 96;
    for (size_t i = 0; i < nsym; i++) pcap += strlen(symbols[i]) + 3;
    char *p = malloc(pcap);
    size_t off = (size_t)snprintf(p, pcap, "{\"op\":\"subscribe\",\"symbols\":[");
    for (size_t i = 0; i < nsym; i++)
        off += (size_t)snprintf(p + off, pcap - off, "%s\"%s\"", i ? "," : "", symbols[i]);
    if (opt_max_rate > 0)
        off += (size_t)snprintf(p + off, pcap - off, "],\"max_rate\":%g,\"id\":1}", opt_max_rate);
    else
        off += (size_t)snprintf(p + off, pcap - off, "],\"id\":1}");
    subscribe_frame_payload = (unsigned char *)p;
    subscribe_payload_len = off;
}

static void resolve(void) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof(port), "%d", opt_port);
    int rc = getaddrinfo(opt_host, port, &hints, &res);
    if (rc != 0 || !res) die("cannot resolve %s: %s", opt_host, gai_strerror(rc));
    memcpy(&server_addr, res->ai_addr, res->ai_addrlen);
    server_addr_len = res->ai_addrlen;
    freeaddrinfo(res);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    rlim_t want = (rlim_t)opt_clients + 64;
    if (rl.rlim_cur >= want) return;
    if (rl.rlim_max < want) {
        rl.rlim_max = want; /* works as root */
    }
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        fprintf(stderr, "loadclient: warning: RLIMIT_NOFILE limited to %llu\n", (unsigned long long)rl.rlim_cur);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    parse_symbols();
    if (nsym == 0) die("no symbols");
    resolve();
    raise_nofile();
    build_requests();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    rng_state ^= (uint64_t)real_now_us() ^ ((uint64_t)getpid() << 32);

    conns = calloc((size_t)opt_clients, sizeof(*conns));
    for (long i = 0; i < opt_clients; i++) conns[i].fd = -1;
    long n_slow_target = (long)(opt_slow_fraction * (double)opt_clients + 0.5);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));

    struct epoll_event events[MAX_EVENTS];
    double t0 = mono_now();
    double t_ready = 0, t_warm_start = 0, t_window_start = 0, t_window_end = 0;
    int phase = 0; /* 0 connecting, 1 waiting for traffic / warmup, 2 measuring, 3 done */
    long slow_assigned = 0;

    while (phase < 3) {
        double now = mono_now();
        if (stop_requested) {
            if (phase == 2) t_window_end = now;
            break;
        }
        if (phase == 0) {
            /* start new connections: rate limit + bounded number in flight */
            long allowed = (long)((now - t0) * opt_connect_rate) + 1;
            while (n_started < opt_clients && n_started < allowed && n_pending < opt_max_pending) {
                /* spread slow clients evenly over the connection order */
                long want_slow = (long)((double)(n_started + 1) * (double)n_slow_target / (double)opt_clients + 0.5);
                int slow = want_slow > slow_assigned;
                if (slow) {
                    slow_assigned++;
                    n_slow++;
                }
                start_connection(&conns[n_started], slow);
                n_started++;
            }
            int timed_out = now - t0 > opt_connect_timeout;
            if ((n_started == opt_clients && n_ready >= opt_clients) || timed_out) {
                if (timed_out) {
                    /* give up on stragglers still handshaking */
                    for (long i = 0; i < n_started; i++) {
                        struct conn *c = &conns[i];
                        if (c->state == C_CONNECTING || c->state == C_HANDSHAKE) handshake_failed(c);
                    }
                }
                t_ready = now;
                phase = 1;
                fprintf(stderr,
                        "{\"event\":\"ready\",\"t\":%.6f,\"connected\":%ld,\"handshake_failures\":%ld,"
                        "\"slow\":%ld,\"connect_s\":%.3f,\"timed_out\":%s}\n",
                        (double)real_now_us() / 1e6, n_connected, n_failed_handshake, n_slow, now - t0,
                        timed_out ? "true" : "false");
                fflush(stderr);
            }
        } else if (phase == 1 && t_warm_start == 0) {
            if (n_ticks_total > 0 || now - t_ready >= opt_start_timeout) {
                t_warm_start = now;
                fprintf(stderr, "{\"event\":\"traffic\",\"t\":%.6f,\"ticks\":%" PRIu64 "}\n",
                        (double)real_now_us() / 1e6, n_ticks_total);
                fflush(stderr);
                continue;
            }
        } else if (phase == 1 && now - t_warm_start >= opt_warmup) {
            phase = 2;
            t_window_start = now;
            measuring = 1;
            fprintf(stderr, "{\"event\":\"window_start\",\"t\":%.6f}\n", (double)real_now_us() / 1e6);
            fflush(stderr);
        } else if (phase == 2 && now - t_window_start >= opt_duration) {
            t_window_end = now;
            measuring = 0;
            phase = 3;
            fprintf(stderr, "{\"event\":\"window_end\",\"t\":%.6f}\n", (double)real_now_us() / 1e6);
            fflush(stderr);
            break;
        }
        int timeout_ms = 50;
        if (phase == 0 && n_started < opt_clients) timeout_ms = 1;
        int n = epoll_wait(epfd, events, MAX_EVENTS, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) on_event(&conns[events[i].data.u64], events[i].events);
    }
    if (t_window_start == 0) t_window_start = t_window_end = mono_now();
    if (t_window_end < t_window_start) t_window_end = mono_now();
    double measured = t_window_end - t_window_start;

    long open_at_end = 0;
    for (long i = 0; i < n_started; i++)
        if (conns[i].state == C_OPEN || conns[i].state == C_SLOW_PARKED) open_at_end++;

    /* Slow clients never read, so a close from the server is stuck behind the data queued
     * for them: read it all now and see how each one ended. Normal clients are left alone. */
    long slow_open = 0;
    double drain_s = 0;
    double t_linger = mono_now();
    if (!stop_requested && opt_drain_slow > 0) {
        for (long i = 0; i < n_started; i++) {
            struct conn *c = &conns[i];
            if (c->state == C_OPEN) {
                epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            } else if (c->state == C_SLOW_PARKED) {
                c->state = C_OPEN;
                c->rcap = INIT_RBUF;
                c->rbuf = malloc(c->rcap);
                c->rlen = 0;
                set_events(c, EPOLLIN | EPOLLRDHUP | (c->want_out ? EPOLLOUT : 0));
                slow_open++;
            }
        }
        draining = 1;
        double t_drain = mono_now();
        while (slow_open > n_slow_drain_closed && !stop_requested && mono_now() - t_drain < opt_drain_slow) {
            int n = epoll_wait(epfd, events, MAX_EVENTS, 50);
            if (n < 0) {
                if (errno == EINTR) continue;
                break;
            }
            for (int i = 0; i < n; i++) on_event(&conns[events[i].data.u64], events[i].events);
        }
        drain_s = mono_now() - t_drain;
        draining = 0;
    }
    while (!stop_requested && mono_now() - t_linger < opt_linger) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }

    printf("{\"clients\":%ld,\"connected\":%ld,\"slow\":%ld,\"received\":%" PRIu64 ",\"duration_s\":%.6f,"
           "\"rate\":%.3f,\"lat_us\":{\"p50\":%" PRIu64 ",\"p90\":%" PRIu64 ",\"p99\":%" PRIu64
           ",\"p999\":%" PRIu64 ",\"max\":%" PRIu64 ",\"mean\":%.1f},\"disconnects\":%ld,"
           "\"slow_disconnects\":%ld,\"close_codes\":",
           opt_clients, n_connected, n_slow, n_received, measured, measured > 0 ? (double)n_received / measured : 0.0,
           hist_percentile(50), hist_percentile(90), hist_percentile(99), hist_percentile(99.9), hist_max,
           hist_count ? (double)hist_sum / (double)hist_count : 0.0, n_disconnects, n_slow_disconnects);
    print_codes(&close_tab);
    printf(",\"slow_drain\":{\"seconds\":%.3f,\"slow_open\":%ld,\"closed\":%ld,\"close_codes\":", drain_s,
           slow_open, n_slow_drain_closed);
    print_codes(&slow_close_tab);
    printf("},\"handshake_failures\":%ld,\"seq_gaps\":%" PRIu64 ",\"seq_missing\":%" PRIu64
           ",\"seq_backwards\":%" PRIu64 ",\"ticks_total\":%" PRIu64 ",\"snapshots\":%" PRIu64
           ",\"frames_total\":%" PRIu64 ",\"pings\":%" PRIu64 ",\"subscribe_errors\":%" PRIu64
           ",\"negative_latency\":%" PRIu64 ",\"open_at_end\":%ld,\"connect_s\":%.3f}\n",
           n_failed_handshake, n_seq_gaps, n_seq_missing, n_seq_back, n_ticks_total, n_snapshots, n_frames_total,
           n_pings, n_subscribe_errors, hist_negative, open_at_end, t_ready > 0 ? t_ready - t0 : -1.0);
    fflush(stdout);
    return 0;
}
