"""Load for tests/bench/mirror.sh: new TLS connections, each `GET /v2/` once, as
containers/image makes them (a CONNECT per request when there is a proxy).

  handshakes.py rate PROXY|- HOST:PORT CA SECONDS CLIENTS   connections/s
  handshakes.py mint PROXY HOSTS CA                         ms: first CONNECT+handshake
                                                            per host, then a second one
  handshakes.py hold PROXY HOST CA N PIDFILE                opens N intercepted connections,
                                                            prints the proxy's peak RSS (MiB)
"""
import multiprocessing
import socket
import ssl
import statistics
import sys
import time


def connect(proxy, host, port, context):
    """A TLS connection to host:port, through `proxy` (host:port) with CONNECT if given."""
    if proxy:
        phost, pport = proxy.rsplit(":", 1)
        raw = socket.create_connection((phost, int(pport)))
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise OSError("proxy closed")
            head += chunk
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise OSError(head.split(b"\r\n", 1)[0].decode())
    else:
        raw = socket.create_connection(("127.0.0.1", int(port)))
    return context.wrap_socket(raw, server_hostname=host)


def get_base(tls, host):
    tls.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    if b" 200 " not in data.split(b"\r\n", 1)[0]:
        raise OSError(data[:80])


def context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def worker(args):
    proxy, target, ca, seconds = args
    host, port = target.rsplit(":", 1)
    ctx = context(ca)
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        with connect(proxy, host, port, ctx) as tls:
            get_base(tls, host)
        done += 1
    return done


def rate(proxy, target, ca, seconds, clients):
    proxy = None if proxy == "-" else proxy
    with multiprocessing.Pool(clients) as pool:
        counts = pool.map(worker, [(proxy, target, ca, seconds)] * clients)
    print(f"{sum(counts) / seconds:.0f}")


def mint(proxy, hosts, ca):
    ctx = context(ca)
    first, second = [], []
    for host in hosts.split(","):
        for times in (first, second):
            start = time.perf_counter()
            with connect(proxy, host, 443, ctx) as tls:
                times.append((time.perf_counter() - start) * 1000)
                get_base(tls, host)
    print(f"{statistics.median(first):.2f} {statistics.median(second):.2f}")


def hold(proxy, host, ca, n, pidfile):
    ctx = context(ca)
    held = []
    for _ in range(n):
        tls = connect(proxy, host, 443, ctx)
        tls.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        tls.recv(65536)
        held.append(tls)
    pid = open(pidfile).read().strip()
    status = open(f"/proc/{pid}/status").read()
    rss = {l.split(":")[0]: int(l.split()[1]) for l in status.splitlines() if l.startswith("Vm")}
    print(f"{rss['VmRSS'] / 1024:.0f} {rss['VmHWM'] / 1024:.0f}")


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "rate":
        rate(args[0], args[1], args[2], float(args[3]), int(args[4]))
    elif mode == "mint":
        mint(args[0], args[1], args[2])
    else:
        hold(args[0], args[1], args[2], int(args[3]), args[4])
