/*
 * tcprr: TCP request/response rates, measured the way netperf's TCP_RR and TCP_CRR do.
 *
 *   tcprr -s -b ADDR -p PORT                       server: answer every 1-byte request
 *   tcprr -c ADDR -p PORT -m rr|crr [-t SECONDS]   client: print one JSON line of results
 *
 * rr:  one connection; send 1 byte, wait for the 1-byte answer, repeat until the time is up.
 * crr: a new connection per transaction: connect, send 1 byte, read the answer, read the
 *      server's close, close. The server closes first, so TIME_WAIT stays on the server side
 *      and the client never runs out of ephemeral ports however many transactions it makes.
 *
 * The request byte tells the server which: 'r' keeps the connection, 'c' closes it after the
 * answer. The server serves one connection at a time (one client per measurement).
 * Output: {"mode": "rr", "transactions": N, "seconds": S, "tps": N/S, "p50_us": .., "p99_us": ..}
 * (p50/p99: latency of one transaction, connection setup and close included in crr, from a
 * histogram of 1 us buckets; anything slower than HIST_US counts as HIST_US).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_US 100000
static long hist[HIST_US + 1];

static void record(double seconds) {
    long us = (long)(seconds * 1e6);
    hist[us < 0 ? 0 : (us > HIST_US ? HIST_US : us)]++;
}

/* Nearest-rank percentile of the recorded transactions, in microseconds. */
static long percentile_us(long total, double q) {
    long rank = (long)(q / 100.0 * (double)total + 0.999999), seen = 0;
    if (rank < 1) rank = 1;
    for (long us = 0; us <= HIST_US; us++) {
        seen += hist[us];
        if (seen >= rank) return us;
    }
    return HIST_US;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "tcprr: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: tcprr -s -b ADDR -p PORT | tcprr -c ADDR -p PORT -m rr|crr [-t SECONDS]\n");
    exit(2);
}

/* 1: got a byte, 0: orderly close, -1: error */
static int read_byte(int fd, char *c) {
    for (;;) {
        ssize_t n = read(fd, c, 1);
        if (n == 1) return 1;
        if (n == 0) return 0;
        if (errno != EINTR) return -1;
    }
}

static int write_byte(int fd, char c) {
    for (;;) {
        ssize_t n = write(fd, &c, 1);
        if (n == 1) return 0;
        if (n < 0 && errno != EINTR) return -1;
    }
}

static struct sockaddr_in address(const char *ip, int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
        fprintf(stderr, "tcprr: not an IPv4 address: %s\n", ip);
        exit(2);
    }
    return sa;
}

static void nodelay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

static _Noreturn void serve(const char *ip, int port) {
    struct sockaddr_in sa = address(ip, port);
    int one = 1;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0) die("socket");
    if (setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("SO_REUSEADDR");
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, 1024) < 0) die("listen");
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("accept");
        }
        nodelay(fd);
        char c;
        while (read_byte(fd, &c) == 1) {
            if (write_byte(fd, c) < 0 || c == 'c') break;
        }
        close(fd);
    }
}

static int connect_to(const struct sockaddr_in *sa) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    nodelay(fd);
    if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0) die("connect");
    return fd;
}

static int client(const char *ip, int port, const char *mode, double seconds) {
    struct sockaddr_in sa = address(ip, port);
    int crr = strcmp(mode, "crr") == 0;
    if (!crr && strcmp(mode, "rr") != 0) usage();
    long transactions = 0;
    char c;
    double start = now(), end = start + seconds, t = start;
    if (crr) {
        while (t < end) {
            int fd = connect_to(&sa);
            if (write_byte(fd, 'c') < 0) die("write");
            if (read_byte(fd, &c) != 1) die("read");
            if (read_byte(fd, &c) != 0) die("waiting for the server's close");
            close(fd);
            transactions++;
            double done = now();
            record(done - t);
            t = done;
        }
    } else {
        int fd = connect_to(&sa);
        while (t < end) {
            if (write_byte(fd, 'r') < 0) die("write");
            if (read_byte(fd, &c) != 1) die("read");
            transactions++;
            double done = now();
            record(done - t);
            t = done;
        }
        close(fd);
    }
    double elapsed = t - start;
    printf("{\"mode\": \"%s\", \"transactions\": %ld, \"seconds\": %.6f, \"tps\": %.1f, \"p50_us\": %ld, "
           "\"p99_us\": %ld}\n", mode, transactions, elapsed, (double)transactions / elapsed,
           percentile_us(transactions, 50), percentile_us(transactions, 99));
    return 0;
}

int main(int argc, char **argv) {
    int server = 0, port = 0, opt;
    const char *ip = NULL, *mode = "rr";
    double seconds = 3.0;
    while ((opt = getopt(argc, argv, "sb:c:p:m:t:")) != -1) {
        switch (opt) {
        case 's': server = 1; break;
        case 'b': ip = optarg; break;
        case 'c': ip = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'm': mode = optarg; break;
        case 't': seconds = atof(optarg); break;
        default: usage();
        }
    }
    if (!ip || port <= 0 || port > 65535 || seconds <= 0) usage();
    signal(SIGPIPE, SIG_IGN);
    if (server) serve(ip, port);
    return client(ip, port, mode, seconds);
}
