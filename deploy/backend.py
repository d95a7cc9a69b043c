#!/usr/bin/env python3
"""A test/demo backend that names itself.

  backend.py NAME [--http PORT]... [--udp PORT] [--tcp-echo PORT]

HTTP: GET / answers "backend NAME\n" (HTTP/1.0, one request per connection);
      GET /peer answers "peer ADDR:PORT\n", the client address this server sees.
UDP:  each datagram is answered with b"NAME:" + datagram; the datagram "?peer" with
      "NAME:peer ADDR:PORT". Answers come from the address the datagram was sent to
      (IP_PKTINFO): a DSR backend answers from the VIP.
TCP echo: each line received is answered with "NAME:" + line, until the peer closes;
      the line "?peer" with "NAME:peer ADDR:PORT".
The peer answers let tests check which source address NAT gave a flow.
"""
import argparse
import http.server
import socket
import socketserver
import sys
import threading


def http_server(name, port):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/peer":
                body = f"peer {self.client_address[0]}:{self.client_address[1]}\n".encode()
            else:
                body = f"backend {name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass

    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 256

    return S(("0.0.0.0", port), H).serve_forever


# Linux's IP_PKTINFO (python's socket module lacks the name before 3.13).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def udp_server(name, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind(("0.0.0.0", port))

    def serve():
        while True:
            data, anc, _, peer = s.recvmsg(65535, socket.CMSG_SPACE(12))
            if data == b"?peer":
                data = f"peer {peer[0]}:{peer[1]}".encode()
            # Answer from the address the datagram was sent to (struct in_pktinfo's
            # ipi_addr as ipi_spec_dst): a DSR backend's is the VIP, not eth0's.
            reply = []
            for level, kind, info in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    reply = [(level, kind, bytes(4) + info[8:12] + bytes(4))]
            s.sendmsg([name.encode() + b":" + data], reply, 0, peer)

    return serve


def tcp_echo(name, port):
    class H(socketserver.StreamRequestHandler):
        def handle(self):
            print(f"tcp-echo peer {self.client_address[0]}:{self.client_address[1]}", file=sys.stderr, flush=True)
            for line in self.rfile:
                if line.strip() == b"?peer":
                    line = f"peer {self.client_address[0]}:{self.client_address[1]}\n".encode()
                self.wfile.write(name.encode() + b":" + line)
                self.wfile.flush()

    class S(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    return S(("0.0.0.0", port), H).serve_forever


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--http", type=int, action="append", default=[], help="repeat for more ports")
    p.add_argument("--udp", type=int)
    p.add_argument("--tcp-echo", type=int)
    a = p.parse_args()
    threads = []
    servers = [(http_server, port) for port in a.http]
    servers += [(udp_server, a.udp), (tcp_echo, a.tcp_echo)]
    for fn, port in servers:
        if port:
            # Bound (and listening) here, before "ready": whoever waits for it can send.
            serve = fn(a.name, port)
            t = threading.Thread(target=serve, daemon=True)
            threads.append(t)
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
