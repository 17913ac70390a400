"""Serving throughput: the async server's dynamic batching over 2 replicas, against the same
clients one at a time, and against the server this project had before (a lock around
``DiffusionEngine.generate``: one HTTP request at a time, each its own batch).

    python scripts/bench_serve.py [--clients 16] [--rounds 2] [--steps 20] [--size 64]
    python scripts/bench_serve.py --mixed [--short 24]

``--mixed``: do short requests slow down while a long job holds the other replica? Two
servers of 2 replicas each: the tiny Wan model (short 1-frame requests on the native route,
one long video job on ``/v1/videos``) and the tiny UNet as an image-to-image pipeline (short
``/v1/images/edits``, one long edit). For each, ``--short`` short requests one after the other
alone, then the same while the long job runs (it is checked to run from before the first to
after the last); p50/p95 of the short ones and their ratio (the goal: <= 1.2).

One engine (the ``mp`` executor, ``--replicas`` CPU workers of one torch thread each) serves
all three, so the model, the workers and the machine are the same; each client sends
``--rounds`` single-image requests one after the other. Reports images/s, the ratio to
the serial run, and p50/p95 latency per request.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL, numpy)

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import threading
import time
import urllib.error
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

        def do_POST(self) -> None:
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
    body = {
        "requests": [
            {
                "prompt": f"benchmark prompt {index}",
                "request_id": f"q{index}-{time.monotonic_ns()}",
                "seed": index,
                "num_inference_steps": args.steps,
                "height": args.size,
                "width": args.size,
            }
        ]
    }
    request = urllib.request.Request(
        url + "/v1/diffusion/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
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
    return {
        "images_per_s": len(latencies) / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "wall_s": wall,
    }


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = f"bench{time.monotonic_ns()}"
    parts = []
    for name, value in fields.items():
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            ).encode()
        )
    for name, data in files.items():
        parts.append(
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(
        parts
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, data: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{url}: {error.code} {error.read().decode()}") from None


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def short_phase(send_short, count: int) -> list[float]:
    return [timed(lambda index=index: send_short(index)) for index in range(count)]


def mixed_row(
    name: str,
    config: OmniDiffusionConfig,
    send_short,
    start_long,
    long_running,
    stop_long,
    count: int,
) -> dict[str, float]:
    """Short requests alone, then beside a long job on the other replica."""
    engine = AsyncDiffusionEngine(config, max_wait_s=0.0)
    server = serve(engine, "127.0.0.1", 0).start()
    try:
        short_phase(
            lambda index: send_short(server.url, index), 4
        )  # warm both replicas' first calls
        short_phase(lambda index: send_short(server.url, 100 + index), 4)
        alone = short_phase(lambda index: send_short(server.url, 200 + index), count)
        handle = start_long(server.url)
        while not long_running(server, handle):
            time.sleep(0.02)
        beside = short_phase(lambda index: send_short(server.url, 300 + index), count)
        still = long_running(server, handle)
        stop_long(server.url, handle)
    finally:
        server.shutdown()
        server.server_close()
    if not still:
        raise SystemExit(
            f"{name}: the long job ended before the short requests did: make it longer"
        )
    (p50_alone, p95_alone), (p50_beside, p95_beside) = percentiles(alone), percentiles(beside)
    return {
        "p50_alone": p50_alone,
        "p95_alone": p95_alone,
        "p50_beside": p50_beside,
        "p95_beside": p95_beside,
    }


def video_row(args: argparse.Namespace) -> dict[str, float]:
    config = OmniDiffusionConfig(
        model="tiny-video", executor_class="mp", num_gpus=2, device="cpu", max_images_per_batch=1
    )

    def send_short(url: str, index: int) -> None:
        body = {
            "requests": [
                {
                    "prompt": f"short {index}",
                    "seed": index,
                    "num_inference_steps": args.steps,
                    "num_frames": 1,
                    "height": 64,
                    "width": 64,
                }
            ]
        }
        output = post(url + "/v1/diffusion/generate", json.dumps(body).encode(), "application/json")
        assert output["errors"] == [None], output["errors"]

    def start_long(url: str) -> str:
        body = {
            "prompt": "a long wave",
            "num_frames": 33,
            "num_inference_steps": 1000,
            "size": "64x64",
        }
        return post(url + "/v1/videos", json.dumps(body).encode(), "application/json")["id"]

    def running(server, video_id: str) -> bool:
        return server.async_engine.running == 1 and server.async_engine.queued == 0

    def stop(url: str, video_id: str) -> None:
        urllib.request.urlopen(
            urllib.request.Request(url + f"/v1/videos/{video_id}", method="DELETE"), timeout=60
        )

    return mixed_row("video", config, send_short, start_long, running, stop, args.short)


def edit_row(args: argparse.Namespace) -> dict[str, float]:

    import numpy as np
    from PIL import Image

    config = OmniDiffusionConfig(
        model="tiny-unet",
        model_class_name="StableDiffusionImg2ImgPipeline",
        executor_class="mp",
        num_gpus=2,
        device="cpu",
        max_images_per_batch=1,
    )
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).save(
        buffer, format="PNG"
    )
    picture = buffer.getvalue()

    def send_short(url: str, index: int) -> None:
        data, kind = multipart(
            {
                "prompt": f"short {index}",
                "num_inference_steps": str(args.steps),
                "seed": str(index),
            },
            {"image": picture},
        )
        assert len(post(url + "/v1/images/edits", data, kind)["data"]) == 1

    def start_long(url: str) -> http.client.HTTPConnection:
        data, kind = multipart(
            {
                "prompt": "a long edit",
                "num_inference_steps": "1000",
                "strength": "0.99",
                "size": "256x256",
            },
            {"image": picture},
        )
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        connection.request("POST", "/v1/images/edits", body=data, headers={"Content-Type": kind})
        return (
            connection  # its answer is never read: stop() leaves, and the server cancels the edit
        )

    def running(server, connection: http.client.HTTPConnection) -> bool:
        return server.async_engine.running == 1

    def stop(url: str, connection: http.client.HTTPConnection) -> None:
        connection.close()

    return mixed_row("edit", config, send_short, start_long, running, stop, args.short)


def main_mixed(args: argparse.Namespace) -> None:
    print(
        f"short requests one at a time: {args.short} alone, "
        f"then {args.short} beside one long job on the other replica; "
        f"{args.steps} steps, 64x64, 2 replicas (mp, CPU), batches of 1"
    )
    print(
        f"{'load':46s} {'p50 alone':>9s} {'p50 mixed':>9s} {'x':>5s} "
        f"{'p95 alone':>9s} {'p95 mixed':>9s} {'x':>5s}"
    )
    for name, row in (
        ("short 1-frame videos + one long video job", video_row(args)),
        ("short edits + one long edit", edit_row(args)),
    ):
        print(
            f"{name:46s} {row['p50_alone']:9.3f} {row['p50_beside']:9.3f} "
            f"{row['p50_beside'] / row['p50_alone']:5.2f} "
            f"{row['p95_alone']:9.3f} {row['p95_beside']:9.3f} "
            f"{row['p95_beside'] / row['p95_alone']:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="tiny-unet")
    parser.add_argument("--mixed", action="store_true", help="the mixed-load rows (see above)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="replicas send no step reports (and a running request cannot be stopped)",
    )
    parser.add_argument("--short", type=int, default=24, help="--mixed: short requests per phase")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mixed:
        main_mixed(args)
        return

    config = OmniDiffusionConfig(
        model=args.model,
        executor_class="mp",
        num_gpus=args.replicas,
        device="cpu",
        max_images_per_batch=args.batch_size,
    )
    engine = AsyncDiffusionEngine(config, progress_interval_s=None if args.no_progress else 0.25)
    server = serve(engine, "127.0.0.1", 0).start()
    old = lock_server(engine.engine)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    old_url = f"http://127.0.0.1:{old.server_address[1]}"
    try:
        drive(
            server.url, 2, argparse.Namespace(**{**vars(args), "rounds": 1})
        )  # warm both replicas
        results = {
            "serial (1 client at a time, new server)": drive(
                server.url,
                1,
                argparse.Namespace(**{**vars(args), "rounds": args.clients * args.rounds}),
            ),
            f"previous server (lock), {args.clients} clients": drive(old_url, args.clients, args),
            f"async server, {args.clients} clients": drive(server.url, args.clients, args),
        }
    finally:
        old.shutdown()
        server.shutdown()
        server.server_close()
    serial = results["serial (1 client at a time, new server)"]["images_per_s"]
    print(
        f"{args.clients} clients x {args.rounds} single-image requests, {args.size}x{args.size}, "
        f"{args.steps} steps, {args.replicas} replicas (mp, CPU), max batch {args.batch_size}, "
        f"progress {'off' if args.no_progress else 'on'}"
    )
    print(f"{'run':48s} {'images/s':>9s} {'x serial':>9s} {'p50 s':>7s} {'p95 s':>7s}")
    for name, result in results.items():
        print(
            f"{name:48s} {result['images_per_s']:9.2f} {result['images_per_s'] / serial:9.2f} "
            f"{result['p50_s']:7.2f} {result['p95_s']:7.2f}"
        )


if __name__ == "__main__":
    main()
