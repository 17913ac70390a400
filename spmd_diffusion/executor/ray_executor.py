"""RayDiffusionExecutor (``ray``): the same engine with its workers as Ray actors.

For teams that run a Ray cluster instead of Slurm/MPI. One actor per GPU (or per CPU worker
where there is none), placed together by a placement group (``PACK`` by default, so a
tensor-parallel replica shares a node; ``SPREAD`` selectable). The engine and its replica
scheduler stay on the driver; each actor runs the worker every other executor runs and
answers the same RPC tuples (see :mod:`spmd_diffusion.distributed.ray_worker`).

``executor_config`` (or ``OmniDiffusionConfig`` keyword arguments that the config does not
know, which land there):

- ``address``: the cluster to join (``ray.init(address=...)``); default ``$RAY_ADDRESS``,
  else a local cluster is started for this executor and stopped with it. A cluster the
  user started (or a ``ray.init`` the caller already made) is never shut down.
- ``placement_strategy``: ``PACK`` (default), ``SPREAD``, ``STRICT_PACK``, ``STRICT_SPREAD``.
- ``num_cpus_per_worker``: CPUs each actor reserves (default 1).
- ``placement_timeout``: seconds to wait for the cluster to fit the workers (default 60).

Tensor/CFG-parallel replicas meet in a file store when every actor is on the driver's node,
else in a TCP store on the driver (at its Ray node address, keys under a secret prefix),
and form gloo groups on CPUs and NCCL groups on GPUs.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (ray); project modules load where used
# (distributed.ray_worker): they pull in heavy modules or import back into this one

from __future__ import annotations

import logging
import os
import time
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.rendezvous import RendezvousServer
from spmd_diffusion.distributed.serve_loop import WorkerPlacement
from spmd_diffusion.executor.rpc_executor import RpcExecutor

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Passed on to the actors: a cluster started elsewhere does not have the driver's environment.
FORWARDED_ENV_PREFIXES = (
    "SPMD_DIFFUSION_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DIFFUSERS_",
    "OMP_NUM_THREADS",
    "GLOO_",
    "NCCL_",
)
INSTALL_HINT = "the ray executor needs Ray: pip install 'spmd_diffusion[ray]'"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


def forwarded_env() -> dict[str, str]:
    return {
        name: value for name, value in os.environ.items() if name.startswith(FORWARDED_ENV_PREFIXES)
    }


def placements(bundle_nodes: list[str], use_gpus: bool) -> list[WorkerPlacement]:
    """Each rank's place from the node its bundle landed on. A GPU actor sees only its own
    GPU (Ray sets CUDA_VISIBLE_DEVICES), so it is local rank 0 of 1; CPU actors count the
    ranks on their node. ``one_node`` keeps the groups of a one-node job on loopback."""
    size = len(bundle_nodes)
    one_node = len(set(bundle_nodes)) == 1
    result = []
    for rank, node in enumerate(bundle_nodes):
        if use_gpus:
            local_rank, local_size = 0, 1
        else:
            local_rank, local_size = bundle_nodes[:rank].count(node), bundle_nodes.count(node)
        result.append(WorkerPlacement(rank, size, local_rank, local_size, one_node))
    return result


class RayDiffusionExecutor(RpcExecutor):
    spmd = False
    writes_outputs = (
        True  # the actors write a batch job's images (a shared filesystem across nodes)
    )

    @classmethod
    def planned_world_size(cls, od_config: OmniDiffusionConfig) -> int:
        return od_config.num_gpus

    # -- start-up ----------------------------------------------------------------------------
    def _init_executor(self) -> None:
        self._open_calls()
        self.ray = import_ray()
        self.actors: list[Any] = []
        self.placement_group: Any = None
        self.rendezvous: RendezvousServer | None = None
        self._started_ray = False
        options = self.od_config.executor_config
        size = self.od_config.num_gpus
        layout = self.od_config.parallel_layout(size)
        strategy = str(options.get("placement_strategy", "PACK")).upper()
        if strategy not in STRATEGIES:
            raise ValueError(
                f"executor_config placement_strategy {strategy!r} is not one of "
                f"{', '.join(STRATEGIES)}"
            )
        try:
            self._connect(
                options.get("address"), size, float(options.get("num_cpus_per_worker", 1))
            )
            use_gpus = self._use_gpus()
            nodes = self._reserve(
                size,
                strategy,
                use_gpus,
                float(options.get("num_cpus_per_worker", 1)),
                float(options.get("placement_timeout", 60)),
            )
            self._start_actors(placements(nodes, use_gpus), use_gpus)
            if layout.replica_size > 1:
                on_driver = set(nodes) == {self.ray.get_runtime_context().get_node_id()}
                self.rendezvous = RendezvousServer(
                    size,
                    one_node=on_driver,
                    host=None if on_driver else self.ray.util.get_node_ip_address(),
                )
            self.start_workers(
                (self.od_config, self.rendezvous and self.rendezvous.rendezvous),
                self.od_config.startup_timeout,
            )
        except BaseException:
            self.is_failed = True
            self.shutdown()
            raise
        where = ", ".join(
            f"rank {rank}: pid {pid} on {node}"
            for rank, (pid, node) in enumerate(self.worker_places())
        )
        logger.info(
            "started %d Ray worker actor(s) (%s, %s): %s",
            size,
            strategy,
            "GPU" if use_gpus else "CPU",
            where,
        )

    def _connect(self, address: str | None, size: int, cpus_per_worker: float) -> None:
        """Join the cluster at ``address`` / ``$RAY_ADDRESS``, or the one this process already
        joined, or start a local one that fits the workers (it is ours to stop)."""
        ray = self.ray
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, configure_logging=False)
            return
        cpus = max(os.cpu_count() or 1, int(size * cpus_per_worker + 0.999))
        # "local": a new cluster even where `ray start` left one running on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False)
        self._started_ray = True

    def _use_gpus(self) -> bool:
        device = self.od_config.device
        gpus = self.ray.cluster_resources().get("GPU", 0)
        if device.startswith("cuda") and not gpus:
            raise RuntimeError(f"device {device!r} was asked for, but the Ray cluster has no GPU")
        return device != "cpu" and gpus > 0

    def _reserve(
        self, size: int, strategy: str, use_gpus: bool, cpus: float, timeout: float
    ) -> list[str]:
        """A placement group with a bundle per rank; the node id each bundle landed on."""
        from ray.util.placement_group import placement_group, placement_group_table

        bundle = {"CPU": cpus, **({"GPU": 1} if use_gpus else {})}
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(size)], strategy=strategy
        )
        ready, _ = self.ray.wait([self.placement_group.ready()], timeout=timeout)
        if not ready:
            raise RuntimeError(
                f"the Ray cluster could not place {size} worker(s) of {bundle} ({strategy}) "
                f"within {timeout:g} s; it has {self.ray.available_resources()} available: "
                "ask for fewer workers (--num-gpus) or add nodes"
            )
        table = placement_group_table(self.placement_group)
        return [table["bundles_to_node_id"][index] for index in range(size)]

    def _start_actors(self, places: list[WorkerPlacement], use_gpus: bool) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from spmd_diffusion.distributed.ray_worker import RayTransport, RayWorkerActor

        actor_class = self.ray.remote(RayWorkerActor)
        env = forwarded_env()
        for place in places:
            strategy = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=place.rank
            )
            bundle = self.placement_group.bundle_specs[place.rank]
            options = {
                "num_cpus": bundle["CPU"],
                "num_gpus": bundle.get("GPU", 0),
                "max_restarts": 0,
                "scheduling_strategy": strategy,
            }
            self.actors.append(actor_class.options(**options).remote(place, env))
        self.transport = RayTransport(self.actors)

    # -- the rest of the contract ----------------------------------------------------------------
    def worker_places(self) -> list[tuple[int, str]]:
        """Each rank's actor process id and node address (logged at start-up, so an operator
        knows which process is which rank)."""
        return self.ray.get(
            [actor.where.remote() for actor in self.actors], timeout=self.od_config.rpc_timeout
        )

    def shutdown(self) -> None:
        """Stop the workers, kill their actors, release the placement group, and stop the
        cluster only if this executor started it."""
        if getattr(self, "is_closed", True):
            return
        self.is_closed = True
        hurry = self.is_failed or self.interrupted
        if self.actors and not hurry:
            self.stop_workers(SHUTDOWN_GRACE_S)
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if getattr(self, "transport", None) is not None:
            self.transport.close()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass
        if self.rendezvous is not None:
            self.rendezvous.close()
        if self._started_ray:
            started = time.monotonic()
            self.ray.shutdown()
            logger.debug("stopped the local Ray cluster in %.1f s", time.monotonic() - started)
