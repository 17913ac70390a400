"""A worker that waits for an ExternalDiffusionExecutor to connect.

Started by another system (``omni-diffuse worker --listen HOST:PORT``); it loads the model
once and serves one client at a time, for as many clients as come, until one sends
``shutdown``. The shared ``authkey`` keeps strangers from running calls on it.
"""

from __future__ import annotations

import logging
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import MessageKind, WireEndpoint
from spmd_diffusion.distributed.serve_loop import serve_worker
from spmd_diffusion.distributed.shm_channel import ShmChannel
from spmd_diffusion.executor.external_executor import REMOTE, parse_address

logger = logging.getLogger(__name__)


def serve_external_worker(
    od_config: OmniDiffusionConfig, address: str, authkey: bytes, rank: int = 0, world_size: int = 1
) -> None:
    from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

    worker = DiffusionWorker(od_config, rank=rank, local_rank=rank, world_size=world_size)
    with Listener(parse_address(address), authkey=authkey) as listener:
        logger.info("worker rank %d listening on %s", rank, address)
        while True:
            try:
                connection = listener.accept()
            except AuthenticationError:
                logger.warning("refused a client with the wrong authkey")
                continue
            with connection:
                reason = serve_worker(worker, rank, WireEndpoint(ShmChannel(connection, threshold=REMOTE)))
            if reason is not None and reason.kind is MessageKind.SHUTDOWN:
                break
    worker.shutdown()
