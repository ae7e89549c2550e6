"""The one JSON of benchmarks/gpu.sh: environment, parity and every round, with a headline
per round (images/s, PyTorch images/s, ratio, compile s, MFU, peak memory).

    python benchmarks/gpu_collect.py OUT_DIR [ELAPSED_S] > OUT_DIR/gpu.json

A part that failed or timed out is listed under "missing" (its log is in OUT_DIR).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PARTS = ("parity", "fedmsa_vit_b_1024_bf16", "fedsam_vit_b_1024_bf16",
         "encoder_vit_b_1024_fp32", "encoder_vit_b_1024_bf16")
OPTIONAL = ("encoder_vit_b_1024_fp32", "encoder_vit_b_1024_bf16", "fedsam_vit_b_1024_bf16")


def headline(result: dict) -> dict:
    """The figures a reader wants first from one round result of fedfms_jax.benchmark."""
    keys = ("jax_images_per_s", "torch_images_per_s", "speedup", "compile_s", "mfu", "torch_mfu",
            "peak_memory_bytes", "flops_per_image", "backend", "device")
    return {k: result.get(k) for k in keys}


def collect(out: Path, elapsed_s: float | None = None) -> dict:
    doc = {"elapsed_s": elapsed_s, "environment": (out / "machine.txt").read_text()
           if (out / "machine.txt").exists() else None, "missing": []}
    for part in PARTS:
        path = out / f"{part}.json"
        if not path.exists():
            if part not in OPTIONAL or (out / f"{part}.log").exists():
                doc["missing"].append(part)
            continue
        result = json.loads(path.read_text())
        doc[part] = result
        if part.startswith(("fedmsa", "fedsam")):
            doc.setdefault("headline", {})[part] = headline(result)
    return doc


def main(argv) -> int:
    elapsed = float(argv[1]) if len(argv) > 1 else None
    doc = collect(Path(argv[0]), elapsed)
    print(json.dumps(doc, indent=1))
    return 1 if doc["missing"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
