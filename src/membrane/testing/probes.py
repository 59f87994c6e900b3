"""Small programs tests run inside pods (``pod exec … python -c SCRIPT``), shared so that every test
probes the same way.

Primitives: :data:`CONNECT` (argv: address, port; prints ``ok``, or ``blocked`` when the connection
times out or is refused within 1 s — a dropped SYN), :data:`TCP_ECHO` (argv: port; echoes every
connection until it closes).
"""

from __future__ import annotations

import textwrap

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close(); print("ok")
    except OSError:
        print("blocked")
""")

TCP_ECHO = textwrap.dedent("""
    import socket, sys, threading
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(16)
    def echo(conn):
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)
    while True:
        threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
""")
