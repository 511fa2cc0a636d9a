/* fabric.dataplane._offload: the kernel's offloads met in C, for the edge.
 *
 * split(data): segmentation offload for packets read from the TUN (the native half
 * of fabric/dataplane/segment.py, which holds the pure-Python twin and the docs).
 * A TUN queue opened with IFF_VNET_HDR and TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 |
 * TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6) hands us, behind a struct virtio_net_hdr
 * (include/uapi/linux/virtio_net.h), either one packet whose transport checksum
 * may be left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM), or a TCP/UDP "super packet"
 * of up to 64 KB that we cut into gso_size segments, as a NIC would (TSO/USO;
 * net/ipv4/tcp_offload.c tcp_gso_segment, net/ipv4/udp_offload.c; wireguard-go
 * tun/offload_linux.go gsoSplit). Returns the IP packets, every checksum complete;
 * ValueError for anything malformed.
 *
 * recv_batch(fd, limit): up to `limit` datagrams from a non-blocking UDP socket with
 * recvmmsg(2) (64 a call), runs coalesced by UDP GRO cut by the size in their
 * (SOL_UDP, UDP_GRO) control message (the native half of fabric/dataplane/udp.py
 * `receive`, whose Python twin calls recvmsg once per datagram or run).
 *
 * coalesce(packets): TCP receive coalescing for TUN writes (the native half of
 * fabric/dataplane/gro.py, whose `coalesce_py` holds the rules and the docs).
 */
#define _GNU_SOURCE /* recvmmsg */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define VNET_HDR_LEN 10
#define F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_UDP 3 /* UFO: not asked for */
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define GSO_ECN 0x80
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

static uint16_t rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* RFC 1071: the one's complement sum of 16-bit big-endian words, unfolded. */
static uint64_t sum16(const uint8_t *p, size_t n, uint64_t acc)
{
    while (n >= 2) {
        acc += rd16(p);
        p += 2;
        n -= 2;
    }
    if (n)
        acc += (uint64_t)p[0] << 8;
    return acc;
}

static uint16_t fold(uint64_t acc)
{
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)acc;
}

/* The pseudo-header sum (RFC 793 / RFC 8200 section 8.1) of an IPv4 or IPv6 packet. */
static uint64_t pseudo(const uint8_t *ip, int v6, unsigned proto, size_t l4len)
{
    uint64_t acc = v6 ? sum16(ip + 8, 32, 0) : sum16(ip + 12, 8, 0);
    return acc + proto + (l4len & 0xFFFF) + (l4len >> 16);
}

static int finish_l4(uint8_t *ip, size_t ihl, size_t len, int v6, unsigned proto, size_t csum_at)
{
    /* csum_at: the checksum's offset from the transport header */
    uint8_t *l4 = ip + ihl;
    size_t l4len = len - ihl;
    wr16(l4 + csum_at, 0);
    uint16_t c = (uint16_t)~fold(sum16(l4, l4len, pseudo(ip, v6, proto, l4len)));
    if (proto == 17 && c == 0)
        c = 0xFFFF; /* RFC 768: zero means "no checksum" */
    wr16(l4 + csum_at, c);
    return 0;
}

static PyObject *split(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *d = view.buf;
    Py_ssize_t total = view.len;
    PyObject *out = NULL;
    const char *err = NULL;
    if (total < VNET_HDR_LEN) {
        err = "shorter than the vnet header";
        goto done;
    }
    unsigned flags = d[0], gso = d[1] & ~GSO_ECN;
    size_t gso_size = le16(d + 4), csum_start = le16(d + 6), csum_offset = le16(d + 8);
    const uint8_t *pkt = d + VNET_HDR_LEN;
    size_t len = (size_t)total - VNET_HDR_LEN;

    if (gso == GSO_NONE) {
        PyObject *one = PyBytes_FromStringAndSize((const char *)pkt, (Py_ssize_t)len);
        if (!one)
            goto done;
        if (flags & F_NEEDS_CSUM) {
            /* virtio 1.1 5.1.6.2: sum from csum_start to the end (the field holds the
             * pseudo-header sum), store the complement at csum_start + csum_offset */
            if (csum_start + csum_offset + 2 > len) {
                Py_DECREF(one);
                err = "checksum offsets beyond the packet";
                goto done;
            }
            uint8_t *p = (uint8_t *)PyBytes_AS_STRING(one);
            uint16_t c = (uint16_t)~fold(sum16(p + csum_start, len - csum_start, 0));
            wr16(p + csum_start + csum_offset, c ? c : (uint16_t)0xFFFF);
            /* a 0xFFFF for a TCP checksum of zero is the same number in one's complement */
        }
        out = PyList_New(1);
        if (!out) {
            Py_DECREF(one);
            goto done;
        }
        PyList_SET_ITEM(out, 0, one);
        goto done;
    }
    if (gso != GSO_TCPV4 && gso != GSO_TCPV6 && gso != GSO_UDP_L4) {
        err = "a GSO type we did not ask for";
        goto done;
    }
    if (len < 20) {
        err = "too short for an IP header";
        goto done;
    }
    int v6 = (pkt[0] >> 4) == 6;
    if (!v6 && (pkt[0] >> 4) != 4) {
        err = "not IPv4 or IPv6";
        goto done;
    }
    size_t ihl = v6 ? 40 : (size_t)(pkt[0] & 15) * 4;
    unsigned proto = v6 ? pkt[6] : pkt[9];
    int tcp = gso != GSO_UDP_L4;
    if (ihl < 20 || csum_start != ihl || proto != (tcp ? 6u : 17u) || (gso == GSO_TCPV4 && v6)
        || (gso == GSO_TCPV6 && !v6)) {
        err = "headers that do not match the GSO type (or IPv6 extension headers)";
        goto done;
    }
    size_t l4h = 8;
    if (tcp) {
        if (len < ihl + 20) {
            err = "too short for a TCP header";
            goto done;
        }
        l4h = (size_t)(pkt[ihl + 12] >> 4) * 4;
    }
    size_t head = ihl + l4h;
    if (l4h < 8 || head > len || gso_size == 0) {
        err = "a bad transport header length or segment size";
        goto done;
    }
    size_t payload = len - head;
    size_t count = payload ? (payload + gso_size - 1) / gso_size : 1;
    if (count > 1024) {
        err = "too many segments";
        goto done;
    }
    out = PyList_New((Py_ssize_t)count);
    if (!out)
        goto done;
    uint32_t seq0 = tcp ? ((uint32_t)rd16(pkt + ihl + 4) << 16 | rd16(pkt + ihl + 6)) : 0;
    uint16_t id0 = v6 ? 0 : rd16(pkt + 4);
    for (size_t i = 0; i < count; i++) {
        size_t off = i * gso_size;
        size_t n = payload - off < gso_size ? payload - off : gso_size;
        size_t slen = head + n;
        PyObject *seg = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)slen);
        if (!seg) {
            Py_CLEAR(out);
            goto done;
        }
        uint8_t *s = (uint8_t *)PyBytes_AS_STRING(seg);
        memcpy(s, pkt, head);
        memcpy(s + head, pkt + head + off, n);
        if (v6) {
            wr16(s + 4, (uint16_t)(slen - 40));
        } else {
            wr16(s + 2, (uint16_t)slen);
            wr16(s + 4, (uint16_t)(id0 + i));
            wr16(s + 10, 0);
            wr16(s + 10, (uint16_t)~fold(sum16(s, ihl, 0)));
        }
        if (tcp) {
            uint8_t *th = s + ihl;
            uint32_t seq = seq0 + (uint32_t)off;
            wr16(th + 4, (uint16_t)(seq >> 16));
            wr16(th + 6, (uint16_t)seq);
            if (i + 1 < count)
                th[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
            if (i > 0)
                th[13] &= (uint8_t)~TCP_CWR;
            finish_l4(s, ihl, slen, v6, 6, 16);
        } else {
            wr16(s + ihl + 4, (uint16_t)(slen - ihl));
            finish_l4(s, ihl, slen, v6, 17, 6);
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, seg);
    }
done:
    PyBuffer_Release(&view);
    if (err) {
        Py_XDECREF(out);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return out;
}

/* --- recv_batch ------------------------------------------------------------------ */

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104 /* include/uapi/linux/udp.h */
#endif
#define VLEN 64        /* datagrams (or coalesced runs) per recvmmsg */
#define RUN_MAX 65535  /* the largest UDP payload, and so the largest coalesced run */

/* One set of buffers for the process: the edge is one thread, and the GIL is held
 * throughout (the socket is non-blocking), so no two calls use them at once. */
static struct mmsghdr msgs[VLEN];
static struct iovec iovs[VLEN];
static struct sockaddr_storage names[VLEN];
static char controls[VLEN][CMSG_SPACE(sizeof(int))];
static char *buffers;

/* The address as the socket module gives it: (host, port) or (host, port, flowinfo, scope_id). */
static PyObject *address(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        if (!inet_ntop(AF_INET, &a->sin_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (!inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), (unsigned)ntohl(a->sin6_flowinfo),
                             (unsigned)a->sin6_scope_id);
    }
    PyErr_Format(PyExc_OSError, "a datagram from address family %d", (int)ss->ss_family);
    return NULL;
}

static size_t gro_size(struct msghdr *h)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int v;
            memcpy(&v, CMSG_DATA(c), sizeof v);
            return v > 0 ? (size_t)v : 0;
        }
    }
    return 0;
}

static PyObject *recv_batch(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, limit;
    if (!PyArg_ParseTuple(args, "ii:recv_batch", &fd, &limit))
        return NULL;
    if (!buffers) {
        buffers = PyMem_RawMalloc((size_t)VLEN * RUN_MAX);
        if (!buffers)
            return PyErr_NoMemory();
    }
    PyObject *data = PyList_New(0), *sources = PyList_New(0), *last = NULL;
    struct sockaddr_storage last_name;
    socklen_t last_len = 0;
    long runs = 0;
    int total = 0;
    if (!data || !sources)
        goto fail;
    while (total < limit) {
        int want = limit - total < VLEN ? limit - total : VLEN;
        for (int i = 0; i < want; i++) {
            iovs[i].iov_base = buffers + (size_t)i * RUN_MAX;
            iovs[i].iov_len = RUN_MAX;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
            msgs[i].msg_hdr.msg_control = controls[i];
            msgs[i].msg_hdr.msg_controllen = sizeof controls[i];
        }
        int n = recvmmsg(fd, msgs, (unsigned)want, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || total)
                break; /* nothing more now (an error after datagrams: the next call says it) */
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        for (int i = 0; i < n; i++) {
            struct msghdr *h = &msgs[i].msg_hdr;
            size_t len = msgs[i].msg_len, seg = gro_size(h);
            /* consecutive datagrams mostly share a source: one address object for the run */
            if (!last || h->msg_namelen != last_len || memcmp(&names[i], &last_name, last_len)) {
                Py_XDECREF(last);
                last = address(&names[i]);
                if (!last)
                    goto fail;
                last_len = h->msg_namelen <= sizeof last_name ? h->msg_namelen : sizeof last_name;
                memcpy(&last_name, &names[i], last_len);
            }
            if (seg && seg < len)
                runs++;
            else
                seg = len; /* one datagram (an empty one too) */
            const char *p = iovs[i].iov_base;
            size_t off = 0;
            do {
                size_t k = len - off < seg ? len - off : seg;
                PyObject *b = PyBytes_FromStringAndSize(p + off, (Py_ssize_t)k);
                if (!b)
                    goto fail;
                int bad = PyList_Append(data, b) < 0 || PyList_Append(sources, last) < 0;
                Py_DECREF(b);
                if (bad)
                    goto fail;
                total++;
                off += k;
            } while (off < len);
        }
        if (n < want)
            break; /* the queue is empty: no call that would only say EAGAIN */
    }
    Py_XDECREF(last);
    return Py_BuildValue("(NNl)", data, sources, runs);
fail:
    Py_XDECREF(last);
    Py_XDECREF(data);
    Py_XDECREF(sources);
    return NULL;
}

/* --- coalesce -------------------------------------------------------------------- */

/* coalesce(packets): TCP receive coalescing for the TUN (the native half of
 * fabric/dataplane/gro.py, whose `coalesce_py` holds the docs and the same rules;
 * tests/test_gro.py fuzzes one against the other). Every output is (bytes, member
 * indexes). A flow has at most one open group at a time (a new key of a flow ends
 * its group first), so the open groups sit in a small hash table keyed by the flow
 * (addresses and ports), and the rest of the key is compared with the group's first
 * packet. */

#define MAX_SUPER 65535
#define TCP_ACK 0x10
#define FLOW_MAX 36 /* IPv6 addresses and ports; IPv4 has 12 bytes */

struct cand { /* a TCP segment that may merge (gro.py _candidate) */
    uint8_t flow[FLOW_MAX];
    size_t flow_len, ihl, thl, payload;
    uint32_t seq;
    unsigned flags;
    int v6;
};

struct group { /* gro.py _Group */
    Py_ssize_t first, last, count; /* member indexes, chained through `chain` */
    size_t ihl, thl, size;
    uint64_t total;
    uint32_t next_seq;
    int v6, closed, psh;
};

struct slot { /* an open flow: its group */
    uint8_t flow[FLOW_MAX];
    uint8_t flow_len, state; /* SLOT_EMPTY, SLOT_LIVE, SLOT_GONE (a tombstone) */
    Py_ssize_t group;
};
#define SLOT_EMPTY 0
#define SLOT_LIVE 1
#define SLOT_GONE 2

/* An output: the input packet written as it is (kind OUT_PLAIN, OUT_EMPTY) or a group. */
struct out { int kind; Py_ssize_t index; };
#define OUT_EMPTY 0
#define OUT_PLAIN 1
#define OUT_GROUP 2

static int candidate(const uint8_t *p, size_t n, struct cand *c)
{
    if (n < 40)
        return 0;
    size_t ihl;
    if (p[0] >> 4 == 4) {
        ihl = (size_t)(p[0] & 15) * 4;
        if (p[9] != 6 || ihl < 20 || (rd16(p + 6) & 0x3FFF) || n < ihl + 20)
            return 0; /* not TCP, or a fragment (MF or offset) */
        memcpy(c->flow, p + 12, 8);
        memcpy(c->flow + 8, p + ihl, 4);
        c->flow_len = 12;
        c->v6 = 0;
    } else if (p[0] >> 4 == 6) {
        ihl = 40;
        if (p[6] != 6 || n < 60)
            return 0;
        memcpy(c->flow, p + 8, 36);
        c->flow_len = 36;
        c->v6 = 1;
    } else {
        return 0;
    }
    const uint8_t *th = p + ihl;
    size_t thl = (size_t)(th[12] >> 4) * 4;
    unsigned flags = th[13];
    if (thl < 20 || n <= ihl + thl || (flags & ~(unsigned)TCP_PSH) != TCP_ACK)
        return 0; /* no payload, or flags other than ACK, ACK|PSH */
    c->ihl = ihl;
    c->thl = thl;
    c->payload = n - ihl - thl;
    c->seq = (uint32_t)rd16(th + 4) << 16 | rd16(th + 6);
    c->flags = flags;
    return 1;
}

/* Whether candidate `p` (of the flow of the group whose first packet is `q`) has the
 * group's key: ToS, DF, TTL, ihl (IPv4) or version/class/label and hop limit (IPv6),
 * the ACK number and the TCP options. */
static int same_key(const uint8_t *p, const struct cand *c, const uint8_t *q, const struct group *g)
{
    if (c->v6 != g->v6 || c->ihl != g->ihl || c->thl != g->thl)
        return 0;
    if (c->v6) {
        if (memcmp(p, q, 4) || p[7] != q[7])
            return 0;
    } else if (p[1] != q[1] || (p[6] & 0x40) != (q[6] & 0x40) || p[8] != q[8]) {
        return 0;
    }
    size_t ihl = c->ihl;
    return !memcmp(p + ihl + 8, q + ihl + 8, 4) && !memcmp(p + ihl + 20, q + ihl + 20, c->thl - 20);
}

/* gro.py _flow_of: the addresses and ports of a TCP packet that is no candidate. */
static int flow_of(const uint8_t *p, size_t n, uint8_t *flow, size_t *flow_len)
{
    if (n >= 24 && p[0] >> 4 == 4 && p[9] == 6) {
        size_t ihl = (size_t)(p[0] & 15) * 4;
        if (n < ihl + 4)
            return 0;
        memcpy(flow, p + 12, 8);
        memcpy(flow + 8, p + ihl, 4);
        *flow_len = 12;
        return 1;
    }
    if (n >= 44 && p[0] >> 4 == 6 && p[6] == 6) {
        memcpy(flow, p + 8, 36);
        *flow_len = 36;
        return 1;
    }
    return 0;
}

/* The slot of `flow`: a live one, or else the empty one where a probe for it stopped
 * (the table always has an empty slot: at most one insert per packet, half full). */
static size_t find_slot(struct slot *t, size_t mask, const uint8_t *flow, size_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ flow[i]) * 16777619u;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        if (t[i].state == SLOT_EMPTY)
            return i;
        if (t[i].state == SLOT_LIVE && t[i].flow_len == len && !memcmp(t[i].flow, flow, len))
            return i;
    }
}

/* gro.py fold: the one's complement sum mod 0xFFFF, with 0xFFFF standing for zero. */
static uint16_t fold_mod(uint64_t acc)
{
    uint64_t s = acc % 0xFFFF;
    return s ? (uint16_t)s : (uint16_t)0xFFFF;
}

static void le16_put(uint8_t *p, size_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* gro.py _Group.build for a group of two or more members. */
static PyObject *build(const struct group *g, const Py_buffer *views, const Py_ssize_t *chain)
{
    const uint8_t *first = views[g->first].buf;
    size_t ihl = g->ihl, hl = g->ihl + g->thl, total = (size_t)g->total;
    PyObject *res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(VNET_HDR_LEN + total));
    if (!res)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(res), *h = o + VNET_HDR_LEN;
    memcpy(h, first, hl);
    if (g->v6) {
        wr16(h + 4, (uint16_t)(total - 40));
    } else {
        wr16(h + 2, (uint16_t)total);
        wr16(h + 10, 0);
        wr16(h + 10, (uint16_t)~fold_mod(sum16(h, ihl, 0))); /* RFC 791 */
    }
    uint64_t ps = pseudo(h, g->v6, 6, total - ihl); /* ihl is 40 for IPv6 */
    if (g->psh)
        h[ihl + 13] |= TCP_PSH;
    /* CHECKSUM_PARTIAL: the pseudo-header sum, not complemented (virtio 5.1.6.2) */
    wr16(h + ihl + 16, fold_mod(ps));
    o[0] = F_NEEDS_CSUM;
    o[1] = g->v6 ? GSO_TCPV6 : GSO_TCPV4;
    le16_put(o + 2, hl);
    le16_put(o + 4, g->size);
    le16_put(o + 6, ihl);
    le16_put(o + 8, 16);
    uint8_t *w = h + hl;
    for (Py_ssize_t i = g->first; i >= 0; i = chain[i]) {
        size_t n = (size_t)views[i].len - hl;
        memcpy(w, (const uint8_t *)views[i].buf + hl, n);
        w += n;
    }
    return res;
}

static PyObject *coalesce(PyObject *self, PyObject *arg)
{
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "coalesce() takes a sequence of bytes");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0, ngroups = 0, nout = 0;
    size_t cap = 8;
    while (cap < 2 * (size_t)n)
        cap <<= 1;
    Py_buffer *views = PyMem_Calloc((size_t)n + 1, sizeof *views);
    Py_ssize_t *chain = PyMem_Calloc((size_t)n + 1, sizeof *chain);
    struct group *groups = PyMem_Calloc((size_t)n + 1, sizeof *groups);
    struct out *outs = PyMem_Calloc((size_t)n + 1, sizeof *outs);
    struct slot *table = PyMem_Calloc(cap, sizeof *table);
    PyObject *result = NULL;
    if (!views || !chain || !groups || !outs || !table) {
        PyErr_NoMemory();
        goto done;
    }
    /* the views keep their objects (and so the bytes) alive whatever the list does */
    for (; got < n; got++) {
        if (got >= PySequence_Fast_GET_SIZE(seq)) {
            PyErr_SetString(PyExc_RuntimeError, "coalesce(): the list changed size");
            goto done;
        }
        PyObject *item = PySequence_Fast_GET_ITEM(seq, got);
        Py_INCREF(item);
        int bad = PyObject_GetBuffer(item, &views[got], PyBUF_SIMPLE) < 0;
        Py_DECREF(item);
        if (bad)
            goto done;
    }
    size_t live = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = views[i].buf;
        size_t len = (size_t)views[i].len;
        struct cand c;
        chain[i] = -1;
        if (!len) {
            outs[nout++] = (struct out){OUT_EMPTY, i};
            continue;
        }
        if (!candidate(p, len, &c)) {
            /* a packet of an open flow that cannot merge (a pure ACK, FIN...) ends that
             * flow's group, so it is written after the data before it */
            if (live && flow_of(p, len, c.flow, &c.flow_len)) {
                size_t s = find_slot(table, cap - 1, c.flow, c.flow_len);
                if (table[s].state == SLOT_LIVE) {
                    table[s].state = SLOT_GONE;
                    live--;
                }
            }
            outs[nout++] = (struct out){OUT_PLAIN, i};
            continue;
        }
        size_t s = find_slot(table, cap - 1, c.flow, c.flow_len);
        if (table[s].state == SLOT_LIVE) {
            struct group *g = &groups[table[s].group];
            if (same_key(p, &c, views[g->first].buf, g) && !g->closed && c.payload <= g->size
                && c.seq == g->next_seq && g->total + c.payload <= (g->v6 ? MAX_SUPER + 40 : MAX_SUPER)) {
                chain[g->last] = i;
                g->last = i;
                g->count++;
                g->total += c.payload;
                g->next_seq = c.seq + (uint32_t)c.payload;
                if (c.payload < g->size || (c.flags & TCP_PSH)) {
                    g->closed = 1; /* a short segment or PSH ends the run */
                    g->psh = (c.flags & TCP_PSH) != 0;
                }
                continue;
            }
            /* the same key but no fit: the group is replaced; a new key of the flow
             * (a new ACK number...) ends the flow's group: either way the slot now
             * holds the new group */
        } else {
            memcpy(table[s].flow, c.flow, c.flow_len);
            table[s].flow_len = (uint8_t)c.flow_len;
            table[s].state = SLOT_LIVE;
            live++;
        }
        struct group *g = &groups[ngroups];
        *g = (struct group){
            .first = i, .last = i, .count = 1, .ihl = c.ihl, .thl = c.thl, .size = c.payload,
            .total = len, .next_seq = c.seq + (uint32_t)c.payload, .v6 = c.v6,
            .closed = (c.flags & TCP_PSH) != 0, .psh = 0,
        };
        table[s].group = ngroups;
        outs[nout++] = (struct out){OUT_GROUP, ngroups++};
    }
    result = PyList_New(nout);
    if (!result)
        goto done;
    for (Py_ssize_t k = 0; k < nout; k++) {
        const struct out *o = &outs[k];
        Py_ssize_t first = o->kind == OUT_GROUP ? groups[o->index].first : o->index;
        Py_ssize_t count = o->kind == OUT_GROUP ? groups[o->index].count : 1;
        PyObject *data, *members = PyList_New(count), *pair;
        if (!members)
            goto fail;
        for (Py_ssize_t i = first, j = 0; i >= 0; i = chain[i], j++) {
            PyObject *x = PyLong_FromSsize_t(i);
            if (!x) {
                Py_DECREF(members);
                goto fail;
            }
            PyList_SET_ITEM(members, j, x);
        }
        if (count > 1) {
            data = build(&groups[o->index], views, chain);
        } else if (o->kind == OUT_EMPTY) {
            data = PyBytes_FromStringAndSize(NULL, 0);
        } else { /* no offload: a zero vnet header and the packet as it is */
            data = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN + views[first].len);
            if (data) {
                memset(PyBytes_AS_STRING(data), 0, VNET_HDR_LEN);
                memcpy(PyBytes_AS_STRING(data) + VNET_HDR_LEN, views[first].buf, (size_t)views[first].len);
            }
        }
        pair = data ? PyTuple_New(2) : NULL;
        if (!pair) {
            Py_XDECREF(data);
            Py_DECREF(members);
            goto fail;
        }
        PyTuple_SET_ITEM(pair, 0, data);
        PyTuple_SET_ITEM(pair, 1, members);
        PyList_SET_ITEM(result, k, pair);
    }
    goto done;
fail:
    Py_CLEAR(result);
done:
    if (views)
        for (Py_ssize_t i = 0; i < got; i++)
            PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(chain);
    PyMem_Free(groups);
    PyMem_Free(outs);
    PyMem_Free(table);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"split", split, METH_O,
     "split(data) -> list[bytes]: the IP packets of a vnet-header packet read from the TUN"},
    {"recv_batch", recv_batch, METH_VARARGS,
     "recv_batch(fd, limit) -> (datagrams, sources, coalesced runs): a non-blocking UDP socket's datagrams"},
    {"coalesce", coalesce, METH_O,
     "coalesce(packets) -> list[(bytes, list[int])]: TCP segments joined into vnet-header super packets"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fabric.dataplane._offload",
    "The kernel's offloads met in C: TSO/USO segmentation, TCP coalescing, UDP GRO and recvmmsg "
    "(fabric/dataplane/segment.py, gro.py, udp.py)",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__offload(void) { return PyModule_Create(&module); }
