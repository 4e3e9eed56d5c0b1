"""The peer idc-infer is measured against: the onnxruntime + cv2 loop a user writes in ten minutes.

    python benchmarks/plain_loop.py COHORT_DIR MODEL.onnx OUT.csv [--batch-size 64] [--threads 2] [--pipelined]

imread, BGR->RGB, resize to the model's 48x48, scale to [0, 1], batch, sess.run, one CSV row per patch.
No error handling, no reports, no calibration: it is a speed reference, not a tool.

--pipelined does the same work in idc-infer's shape: --threads worker threads, each decoding a batch and
scoring it with a one-thread session in runs of 16, while the main thread writes the rows. It is what
pipelining alone gives on the machine, with none of idc-infer's checks or outputs: the ceiling of the ratio.
"""

import argparse
import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipelined", action="store_true")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if args.pipelined else args.threads
    if args.pipelined:  # as idc-infer: the workers are the parallelism; idle session threads must not spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    paths = sorted(args.root.rglob("*.png"))
    chunks = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]

    def score(chunk: list[Path], run: int) -> np.ndarray:
        images = [
            cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (48, 48), interpolation=cv2.INTER_NEAREST)
            for p in chunk
        ]
        batch = np.stack(images).astype(np.float32) / 255.0
        runs = [batch[i : i + run] for i in range(0, len(batch), run)]
        return np.concatenate([session.run(None, {name: part})[0][:, 1] for part in runs])

    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "prob_idc"])
        if args.pipelined:
            with ThreadPoolExecutor(args.threads) as pool:
                for chunk, probs in zip(chunks, pool.map(lambda chunk: score(chunk, 16), chunks)):
                    writer.writerows(zip(map(str, chunk), probs.tolist()))
        else:
            for chunk in chunks:
                writer.writerows(zip(map(str, chunk), score(chunk, len(chunk)).tolist()))


if __name__ == "__main__":
    main()
