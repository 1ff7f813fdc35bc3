/* The byte-relay floor: what forwarding bytes costs here with no HTTP work at all.
 *
 *   relay LISTEN_PORT BACKEND_PORT      (both on 127.0.0.1)
 *
 * One thread, one epoll (level-triggered), no fork. Each accepted connection gets a blocking
 * connect to the backend (instant on loopback), then both sockets go non-blocking with
 * TCP_NODELAY. Per readable event: one read() into a 64 KiB buffer and one write() to the peer;
 * a short write parks the rest and waits for EPOLLOUT (reading from that side pauses meanwhile).
 * EOF half-closes the peer (shutdown SHUT_WR); the pair is freed when both sides are done or
 * on any error. Built by bench/deps.py into bench/.cache/relay; not a proxy, a yardstick.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

struct end {
    int fd;
    int eof;                 /* read() returned 0 on this side */
    unsigned events;         /* what epoll watches now */
    size_t off, len;         /* bytes read here, not yet written to the peer */
    struct end *peer;
    char buf[BUF];
};

static int ep;
static struct end *dead[1024];
static int ndead;

static void watch(struct end *e) {
    unsigned want = 0;
    if (e->len == 0 && !e->eof) want |= EPOLLIN;   /* pause reading while data waits */
    if (e->peer->len > e->peer->off) want |= EPOLLOUT;
    if (want != e->events) {
        struct epoll_event ev = {.events = want, .data.ptr = e};
        epoll_ctl(ep, EPOLL_CTL_MOD, e->fd, &ev);
        e->events = want;
    }
}

static void kill_pair(struct end *e) {
    struct end *p = e->peer;
    if (e->fd < 0) return;
    close(e->fd);
    close(p->fd);
    e->fd = p->fd = -1;
    if (ndead < 1024) dead[ndead++] = e;  /* freed after this batch of events */
}

static void add(struct end *e) {
    int one = 1;
    setsockopt(e->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = e};
    e->events = EPOLLIN;
    epoll_ctl(ep, EPOLL_CTL_ADD, e->fd, &ev);
}

static void readable(struct end *e) {
    struct end *p = e->peer;
    ssize_t n = read(e->fd, e->buf, BUF);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) kill_pair(e);
        return;
    }
    if (n == 0) {
        e->eof = 1;
        if (p->eof) { kill_pair(e); return; }
        shutdown(p->fd, SHUT_WR);
        watch(e);
        return;
    }
    ssize_t w = write(p->fd, e->buf, (size_t)n);
    if (w == n) return;
    if (w < 0 && errno != EAGAIN) { kill_pair(e); return; }
    e->off = w < 0 ? 0 : (size_t)w;
    e->len = (size_t)n;
    watch(e);
    watch(p);
}

static void writable(struct end *p) { /* flush what the peer read */
    struct end *e = p->peer;
    ssize_t w = write(p->fd, e->buf + e->off, e->len - e->off);
    if (w < 0) {
        if (errno != EAGAIN) kill_pair(p);
        return;
    }
    e->off += (size_t)w;
    if (e->off == e->len) e->off = e->len = 0;
    watch(e);
    watch(p);
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    struct sockaddr_in ba = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &la.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &ba.sin_addr);
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&la, sizeof la) || listen(lfd, 4096)) return 1;
    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct end *e = evs[i].data.ptr;
            if (e == NULL) {  /* the listener */
                int cfd;
                while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int bfd = socket(AF_INET, SOCK_STREAM, 0);
                    if (bfd < 0 || connect(bfd, (struct sockaddr *)&ba, sizeof ba)) {
                        close(cfd);
                        if (bfd >= 0) close(bfd);
                        continue;
                    }
                    fcntl(bfd, F_SETFL, O_NONBLOCK);
                    struct end *c = calloc(1, sizeof *c), *b = calloc(1, sizeof *b);
                    c->fd = cfd; b->fd = bfd; c->peer = b; b->peer = c;
                    add(c);
                    add(b);
                }
                continue;
            }
            if (e->fd < 0) continue;  /* closed earlier in this batch */
            unsigned got = evs[i].events;
            if ((got & EPOLLERR) || ((got & EPOLLHUP) && e->len)) { kill_pair(e); continue; }
            if ((got & (EPOLLIN | EPOLLHUP)) && !e->len && !e->eof) readable(e);
            if (e->fd >= 0 && (got & EPOLLOUT)) writable(e);
        }
        for (int i = 0; i < ndead; i++) { free(dead[i]->peer); free(dead[i]); }
        ndead = 0;
    }
}
