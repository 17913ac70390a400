"""Serving throughput: the async server's dynamic batching over 2 replicas, against the same
clients one at a time, and against the server this project had before (a lock around
``DiffusionEngine.generate``: one HTTP request at a time, each its own batch).

    python scripts/bench_serve.py [--clients 16] [--rounds 2] [--steps 20] [--size 64]

One engine (the ``mp`` executor, ``--replicas`` CPU workers of one torch thread each) serves
all three, so the model, the workers and the machine are the same; each client sends
``--rounds`` single-image requests one after the other. Reports images/s, the ratio to
the serial run, and p50/p95 latency per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.server import merge_outputs, serve
from spmd_diffusion.request import OmniDiffusionRequest


def lock_server(engine, port: int = 0) -> ThreadingHTTPServer:
    """The previous server's behaviour: threaded HTTP, one engine call at a time."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests = [OmniDiffusionRequest.from_dict(item) for item in body["requests"]]
            with lock:
                outputs = engine.generate(requests)
            data = json.dumps(merge_outputs(outputs).to_dict()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def one_request(url: str, index: int, args: argparse.Namespace) -> float:
    body = {"requests": [{"prompt": f"benchmark prompt {index}", "request_id": f"q{index}-{time.monotonic_ns()}",
                          "seed": index, "num_inference_steps": args.steps, "height": args.size,
                          "width": args.size}]}
    request = urllib.request.Request(url + "/v1/diffusion/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        output = DiffusionOutput.from_dict(json.loads(response.read()))
    assert output.errors == [None], output.errors
    return time.perf_counter() - start


def drive(url: str, clients: int, args: argparse.Namespace) -> dict[str, float]:
    """``clients`` concurrent clients, each sending ``args.rounds`` requests in turn."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        for round_ in range(args.rounds):
            seconds = one_request(url, number * args.rounds + round_, args)
            with lock:
                latencies.append(seconds)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"images_per_s": len(latencies) / wall, "p50_s": statistics.median(ordered),
            "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="tiny-unet")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    config = OmniDiffusionConfig(model=args.model, executor_class="mp", num_gpus=args.replicas, device="cpu",
                                 max_batch_size=args.batch_size)
    engine = AsyncDiffusionEngine(config)
    server = serve(engine, "127.0.0.1", 0).start()
    old = lock_server(engine.engine)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    old_url = f"http://127.0.0.1:{old.server_address[1]}"
    try:
        drive(server.url, 2, argparse.Namespace(**{**vars(args), "rounds": 1}))  # warm both replicas
        results = {
            "serial (1 client at a time, new server)": drive(server.url, 1,
                                                             argparse.Namespace(**{**vars(args), "rounds":
                                                                                   args.clients * args.rounds})),
            f"previous server (lock), {args.clients} clients": drive(old_url, args.clients, args),
            f"async server, {args.clients} clients": drive(server.url, args.clients, args),
        }
    finally:
        old.shutdown()
        server.shutdown()
        server.server_close()
    serial = results["serial (1 client at a time, new server)"]["images_per_s"]
    print(f"{args.clients} clients x {args.rounds} single-image requests, {args.size}x{args.size}, "
          f"{args.steps} steps, {args.replicas} replicas (mp, CPU), max batch {args.batch_size}")
    print(f"{'run':48s} {'images/s':>9s} {'x serial':>9s} {'p50 s':>7s} {'p95 s':>7s}")
    for name, result in results.items():
        print(f"{name:48s} {result['images_per_s']:9.2f} {result['images_per_s'] / serial:9.2f} "
              f"{result['p50_s']:7.2f} {result['p95_s']:7.2f}")


if __name__ == "__main__":
    main()
