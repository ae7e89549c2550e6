"""Input-pipeline throughput: images per second from the sources into device memory.

    python -m fedfms_jax.data.bench_pipeline --federation nuclei_demo --image-size 1024 \
        --batch-size 4 --steps 24 --augment

Reports host-only throughput (read + augment + stack) and end-to-end throughput with
prefetch_to_device over a client-sharded mesh, counting valid images only. --reference also
times the original's input path (.npy files through a torch DataLoader) on the same images.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _loader(args, fed):
    from fedfms_jax.data.pipeline import AugmentConfig, FederatedLoader
    sites = [s for s in fed.sites if s != fed.unseen][: args.clients]
    aug = AugmentConfig(flip=True, rot90=True, intensity=0.1) if args.augment else None
    return FederatedLoader([fed.train(s) for s in sites], args.batch_size, seed=0, augment=aug,
                           mode="steps", steps=args.steps, num_workers=args.workers)


def measure(args) -> dict:
    import jax
    import numpy as np

    from fedfms_jax.data import get_federation
    from fedfms_jax.data.pipeline import client_sharding, prefetch_to_device

    kw = {"num_sites": args.clients, "images_per_site": 16} if args.federation == "synthetic" else {}
    fed = get_federation(args.federation, image_size=args.image_size, data_dir=args.data_dir, **kw)
    loader = _loader(args, fed)
    n_clients = loader.num_clients
    devices = jax.devices()
    n_dev = max(d for d in range(1, len(devices) + 1) if n_clients % d == 0)
    mesh = jax.make_mesh((n_dev,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n_dev])
    sharding = client_sharding(mesh)

    list(loader)  # warm-up round: file handles, thread pool, page cache
    t0 = time.perf_counter()
    images = sum(int(b["valid"].sum()) for b in loader)
    host_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    count = 0
    for b in prefetch_to_device(iter(loader), sharding, size=2):
        jax.block_until_ready(b)
        count += int(np.asarray(b["valid"]).sum())
    device_s = time.perf_counter() - t0
    loader.close()
    return {"federation": args.federation, "image_size": args.image_size, "clients": n_clients,
            "batch_size": args.batch_size, "steps": args.steps, "augment": bool(args.augment),
            "devices": n_dev, "platform": devices[0].platform, "workers": args.workers,
            "host_images_per_s": round(images / host_s, 1),
            "device_images_per_s": round(count / device_s, 1),
            "device_MB_per_s": round(count * (args.image_size ** 2 * 3) / device_s / 1e6, 1)}


def measure_reference(args) -> dict:
    """The original's input path at the same size: one .npy per image and per mask
    (its data_npy/label_npy folders) read by a torch DataLoader, batch B, shuffled."""
    import tempfile

    import numpy as np
    import torch

    from fedfms_jax.data import get_federation

    fed = get_federation(args.federation, image_size=args.image_size, data_dir=args.data_dir)
    sites = [s for s in fed.sites if s != fed.unseen][: args.clients]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for s in sites:
            src = fed.train(s)
            for i in range(len(src)):
                ex = src[i]
                stem = f"{tmp}/{s}_{i}"
                np.save(stem + "_img.npy", ex["image"])
                np.save(stem + "_lab.npy", ex["mask"])
                paths.append(stem)

        class NpyDataset(torch.utils.data.Dataset):
            def __len__(self):
                return len(paths)

            def __getitem__(self, i):
                return (torch.from_numpy(np.load(paths[i] + "_img.npy")),
                        torch.from_numpy(np.load(paths[i] + "_lab.npy")))

        loader = torch.utils.data.DataLoader(NpyDataset(), batch_size=args.batch_size, shuffle=True)
        for _ in loader:  # warm-up epoch (page cache)
            pass
        t0, count = time.perf_counter(), 0
        while count < args.steps * args.batch_size * len(sites):
            for img, _ in loader:
                count += img.shape[0]
        return {"reference": "torch DataLoader over .npy files", "images_per_s":
                round(count / (time.perf_counter() - t0), 1), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--federation", default="nuclei_demo")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--workers", type=int, default=min(16, 2 * (os.cpu_count() or 1)))
    p.add_argument("--augment", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--reference", action="store_true", help="also time the original's .npy + DataLoader path")
    args = p.parse_args(argv)
    print(json.dumps(measure(args)))
    if args.reference:
        print(json.dumps(measure_reference(args)))


if __name__ == "__main__":
    main()
