"""The peer idc-infer is measured against: the onnxruntime + cv2 loop a user writes in ten minutes.

    python benchmarks/plain_loop.py COHORT_DIR MODEL.onnx OUT.csv [--batch-size 64] [--threads 2]

imread, BGR->RGB, resize to the model's 48x48, scale to [0, 1], batch, sess.run, one CSV row per patch.
No error handling, no reports, no calibration: it is a speed reference, not a tool.
"""

import argparse
import csv
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
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    paths = sorted(args.root.rglob("*.png"))
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "prob_idc"])
        for i in range(0, len(paths), args.batch_size):
            chunk = paths[i : i + args.batch_size]
            images = [
                cv2.resize(
                    cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (48, 48), interpolation=cv2.INTER_NEAREST
                )
                for p in chunk
            ]
            probs = session.run(None, {name: np.stack(images).astype(np.float32) / 255.0})[0][:, 1]
            writer.writerows(zip(map(str, chunk), probs.tolist()))


if __name__ == "__main__":
    main()
