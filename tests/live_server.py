"""A live MPEG-TS source for the streaming tests: PyAV writes frames to TCP or UDP on 127.0.0.1 in real time.

Run as a subprocess: ``python live_server.py tcp PORT --frames 16 --fps 16 --seed 0``. TCP listens and
serves each of ``--connections`` clients in turn (``--pause`` seconds between them, port closed
meanwhile: a server that goes away and comes back). UDP sends to the port after ``--delay``
seconds, the frames over and over until killed, as a camera would. ``--silent`` accepts a TCP
client and sends nothing (a stalled source). The frames are :func:`frames` of the seed.
"""

import argparse
import time

import av
import numpy as np


def frames(count: int, seed: int, size: int = 48) -> np.ndarray:
    """``(count, size, size, 3)`` uint8: a smooth colour field that changes with time (compresses well)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, (3,))
    y, x = np.mgrid[0:size, 0:size]
    out = np.empty((count, size, size, 3), np.uint8)
    for t in range(count):
        for c in range(3):
            out[t, :, :, c] = (base[c] + 30 * np.sin((x + 3 * t * (c + 1)) / 6) + 20 * np.cos(y / 5)).clip(0, 255)
    return out


def serve(url: str, video: np.ndarray, fps: float, repeat: int = 1) -> None:
    print("ready", flush=True)  # the test waits for this line (a probing connection would take the listen)
    with av.open(url, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.gop_size, stream.max_b_frames = 1, 0
        stream.options = {"qscale": "2"}
        stream.codec_context.qmin = 1
        start = time.perf_counter()
        for t, image in enumerate(list(video) * repeat):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
            time.sleep(max(0.0, start + (t + 1) / fps - time.perf_counter()))
        for packet in stream.encode(None):
            container.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("proto", choices=("tcp", "udp"))
    parser.add_argument("port", type=int)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--fps", type=float, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args()
    video = frames(args.frames, args.seed, args.size)
    if args.proto == "udp":
        time.sleep(args.delay)
        serve(f"udp://127.0.0.1:{args.port}?pkt_size=1316", video, args.fps, repeat=1000)  # until killed
        return
    if args.silent:
        import socket

        with socket.create_server(("127.0.0.1", args.port)) as server:
            print("ready", flush=True)
            client, _ = server.accept()
            time.sleep(60)
            client.close()
        return
    for i in range(args.connections):
        if i:
            time.sleep(args.pause)
        serve(f"tcp://127.0.0.1:{args.port}?listen=1", video, args.fps)


if __name__ == "__main__":
    main()
