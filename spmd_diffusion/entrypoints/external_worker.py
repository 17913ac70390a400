"""A worker that waits for an ExternalDiffusionExecutor to connect.

Started by another system (``omni-diffuse worker --listen HOST:PORT``); it loads the model
once and serves one client at a time, for as many clients as come, until one sends
``shutdown``. The shared ``authkey`` keeps strangers from running calls on it: nothing a
client sends is unpickled before it has proven it holds the key.

Every connection is authenticated on its own thread with a deadline, off the serving path:
a port scan (connect and close), a silent connection, an oversized or garbled handshake or
a wrong key costs that connection alone, never the worker and never another client.
"""

# ruff: noqa: PLC0415 - the worker (torch, diffusers) is imported when one starts serving

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import MessageKind, WireEndpoint
from spmd_diffusion.distributed.serve_loop import serve_worker
from spmd_diffusion.distributed.shm_channel import ShmChannel
from spmd_diffusion.executor.external_executor import REMOTE, parse_address

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
BACKLOG = 64


def authenticate(
    sock: socket.socket,
    peer: object,
    authkey: bytes,
    ready: queue.Queue,
    timeout: float = HANDSHAKE_TIMEOUT_S,
) -> None:
    """Run the shared-key handshake (both directions) on ``sock``; hand the connection to the
    serving loop if it passes. A client that says nothing is cut off after ``timeout``."""
    connection = Connection(os.dup(sock.fileno()))
    watchdog = threading.Timer(timeout, lambda: _cut(sock))
    watchdog.daemon = True
    watchdog.start()
    try:
        deliver_challenge(connection, authkey)
        answer_challenge(connection, authkey)
    except AuthenticationError:
        logger.warning("refused a client from %s: wrong authkey", peer)
        connection.close()
        return
    except Exception as exc:  # noqa: BLE001 - gone, silent past the deadline, or garbled
        logger.info(
            "dropped a client from %s during the handshake: %s", peer, exc or type(exc).__name__
        )
        connection.close()
        return
    finally:
        watchdog.cancel()
        sock.close()
    ready.put(connection)


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the handshake thread's blocked read
    except OSError:
        pass


def accept_clients(server: socket.socket, authkey: bytes, ready: queue.Queue) -> None:
    """Accept connections for as long as the server socket is open; each is authenticated on
    its own thread."""
    while True:
        try:
            sock, peer = server.accept()
        except OSError:
            return  # the server socket was closed: the worker is stopping
        threading.Thread(
            target=authenticate,
            args=(sock, peer, authkey, ready),
            daemon=True,
            name="spmd-diffusion-handshake",
        ).start()


def serve_external_worker(
    od_config: OmniDiffusionConfig, address: str, authkey: bytes, rank: int = 0, world_size: int = 1
) -> None:
    from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

    worker = DiffusionWorker(od_config, rank=rank, local_rank=rank, world_size=world_size)
    ready: queue.Queue[Connection] = queue.Queue()
    with socket.create_server(parse_address(address), backlog=BACKLOG) as server:
        threading.Thread(
            target=accept_clients,
            args=(server, authkey, ready),
            daemon=True,
            name="spmd-diffusion-accept",
        ).start()
        logger.info("worker rank %d listening on %s", rank, address)
        while True:
            connection = ready.get()
            with connection:
                reason = serve_worker(
                    worker, rank, WireEndpoint(ShmChannel(connection, threshold=REMOTE))
                )
            if reason is not None and reason.kind is MessageKind.SHUTDOWN:
                break
    worker.shutdown()
