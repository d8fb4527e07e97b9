"""TCPStore servers that listen on 127.0.0.1 only, for runs on one machine (`kubeforge-train --local`).

torch's own store servers listen on every address: the elastic agent's rendezvous store and the store rank
0 hosts for the process group (`init_process_group`, env://). On a node of a cluster that is what lets the
other pods in; on one machine it opens ports to the network for nothing. torch creates both with
`multi_tenant=True`, which reuses a server this process already runs on that port: so a server started here
first, on a socket bound to 127.0.0.1 (`master_listen_fd`), is the one they use.
"""

from __future__ import annotations

import socket

from torch._C._distributed_c10d import TCPStore

LOOPBACK = "127.0.0.1"


def loopback_store(port: int = 0) -> TCPStore:
    """A multi-tenant TCPStore server on 127.0.0.1:`port` (0: a free one; the store's `.port` says which).
    Keep it referenced for the whole run: the server, which owns the listening socket from here on, closes
    it when the last store object on its port is gone."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(1024)
        # the socket closes here unless the store took it: a listener left on the port would keep torch's
        # own store (job.py's fallback) from binding it
        store = TCPStore(
            LOOPBACK,
            sock.getsockname()[1],
            is_master=True,
            multi_tenant=True,
            master_listen_fd=sock.fileno(),
            wait_for_workers=False,
        )
        sock.detach()  # the store's server owns the descriptor now
    return store
