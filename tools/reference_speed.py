"""How fast the FP32 reference stage of a build runs on each device this machine has.

Times :func:`edgemix.verify.reference.reference_logits` (the function ``edgemix build`` uses) for a
zoo model on N Fashion-MNIST test images, on the CPU and, when torch sees one, on CUDA, after one
warm-up pass each; the median of --repeats runs. Writes one JSON object (host facts included).

    python tools/reference_speed.py --model s16 --images 2000 --out reference-speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from edgemix.models import build_model, resolve_spec
from edgemix.verify.reference import evaluation_set, reference_logits
from edgemix.verify.report import machine_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="s16")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--cpu-images", type=int, default=None, help="fewer images for the CPU (default: --images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    spec = resolve_spec(a.model, None, 10)
    model = build_model(spec).eval()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        n = a.cpu_images if (dev == "cpu" and a.cpu_images) else a.images
        data = evaluation_set(a.data, "test", n)
        reference_logits(model, data.subset(list(range(min(250, n)))), spec, device=dev)  # warm-up
        times = []
        for _ in range(a.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            reference_logits(model, data, spec, device=dev)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append({"device": dev, "device_name": torch.cuda.get_device_name() if dev == "cuda" else None,
                     "images": n, "threads": torch.get_num_threads(), "seconds": times, "median_s": med,
                     "images_per_s": n / med})
        print(f"{dev}: {n} images in {med:.2f} s ({n / med:.0f} images/s)", flush=True)
    result = {"command": "python tools/reference_speed.py " + " ".join(sys.argv[1:]), "model": spec.name, "params": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__, "machine": machine_facts(),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
