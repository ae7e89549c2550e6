"""Command line: python -m weights_convert {convert,export,verify,inspect} ...

Errors print one line (plus the key list for a mismatch) to stderr and exit with 2;
nothing is written when a command fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weights_convert.detect import ENCODERS
from weights_convert.tensorfile import CheckpointError

EXIT_ERROR = 2


class _OneLineErrors(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem and pointing at --help, exit 2."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineErrors(prog="python -m weights_convert",
                                description="SAM-family PyTorch checkpoints to Flax weights and back.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="PyTorch .pth / .safetensors state dict -> weights directory")
    c.add_argument("--checkpoint", required=True, type=Path, help="input .pth or .safetensors")
    c.add_argument("--out", required=True, type=Path, help="output directory (model.json + params)")
    c.add_argument("--variant", default="auto", choices=("auto", *ENCODERS),
                   help="image encoder; auto = detect from keys and shapes")
    c.add_argument("--image-size", type=int, default=None,
                   help="input size; resizes pos_embed / rel_pos when it differs from the checkpoint's")
    c.add_argument("--adapters", action="store_true", help="add freshly initialised MSA adapters")
    c.add_argument("--adapter-zero-init", action="store_true",
                   help="with --adapters: zero the adapters' up-projection so outputs start unchanged")
    # Numerics default to what the detected family's own code does; each flag overrides it.
    c.add_argument("--prompt-free", action=argparse.BooleanOptionalAction, default=None,
                   help="FedFMS: the mask decoder ignores prompts (default: as detected)")
    c.add_argument("--pixel-norm", default=None, choices=("sam", "unit"),
                   help="sam: SAM's mean/std; unit: pixels / 255 only, as FedFMS trains (default: as detected)")
    c.add_argument("--pad-before-norm1", action=argparse.BooleanOptionalAction, default=None,
                   help="ViT: zero-pad attention windows before norm1, as the MSA/FedFMS originals do "
                        "(default: as detected)")
    c.add_argument("--seed", type=int, default=0, help="seed for added adapters")
    c.add_argument("--force", action="store_true", help="replace a non-empty output directory")

    e = sub.add_parser("export", help="weights directory -> PyTorch state dict .pth")
    e.add_argument("--weights", required=True, type=Path,
                   help="a directory written by convert / save_weights, or a training work dir (its final/ model)")
    e.add_argument("--round", type=int, default=None,
                   help="training work dir: the global model of this round's checkpoint instead of final/")
    e.add_argument("--out", required=True, type=Path, help="output .pth")
    e.add_argument("--writer", default="auto", choices=("auto", "torch", "native"),
                   help="torch.save, or the built-in writer that needs no torch (auto: torch if installed)")
    e.add_argument("--force", action="store_true", help="replace an existing file")

    v = sub.add_parser("verify", help="compare PyTorch and Flax outputs for a checkpoint (needs torch)")
    v.add_argument("--checkpoint", required=True, type=Path)
    v.add_argument("--variant", default="auto", choices=("auto", *ENCODERS))
    v.add_argument("--tolerance", type=float, default=1e-5, help="max relative error (fp32)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--weights", type=Path, default=None,
                   help="an existing conversion of this checkpoint to check (default: convert now)")

    i = sub.add_parser("inspect", help="describe a checkpoint or a weights directory")
    i.add_argument("path", type=Path)
    return p


def _convert(args) -> int:
    from weights_convert.convert import ConvertOptions, convert_checkpoint

    if args.adapter_zero_init and not args.adapters:
        raise CheckpointError("--adapter-zero-init only applies with --adapters")
    if args.image_size is not None and args.image_size <= 0:
        raise CheckpointError(f"--image-size must be positive, not {args.image_size}")
    opts = ConvertOptions(variant=args.variant, image_size=args.image_size, adapters=args.adapters,
                          adapter_zero_init=args.adapter_zero_init, prompt_free=args.prompt_free,
                          pixel_norm=args.pixel_norm, pad_before_norm1=args.pad_before_norm1, seed=args.seed)
    summary = convert_checkpoint(args.checkpoint, args.out, opts, force=args.force)
    print(summary["choice"])
    print(f"converted {args.checkpoint} ({summary['detected']}): {summary['keys_used']} keys -> "
          f"{summary['tensors_written']} tensors in {args.out}")
    return 0


def _export(args) -> int:
    from weights_convert.convert import exported_state_dict
    from weights_convert.export import write_pth

    if args.out.exists() and not args.force:
        raise CheckpointError(f"{args.out} exists; pass --force to replace it")
    state_dict = exported_state_dict(args.weights, args.round)
    writer = write_pth(state_dict, args.out, writer=args.writer, force=args.force)
    print(f"wrote {len(state_dict)} tensors to {args.out} ({writer} writer)")
    return 0


def _verify(args) -> int:
    from weights_convert.verify import verify_checkpoint

    report = verify_checkpoint(args.checkpoint, variant=args.variant, seed=args.seed, weights=args.weights)
    for name, err in report.items():
        print(f"{name}: relative error {err:.3e}")
    worst = max(report.values())
    if worst > args.tolerance:
        print(f"error: relative error {worst:.3e} is above {args.tolerance:g}", file=sys.stderr)
        return 1
    print(f"ok: all within {args.tolerance:g}")
    return 0


def _inspect(args) -> int:
    if args.path.is_dir():
        from weights_convert.store import read_meta

        doc = read_meta(args.path)
        doc.pop("torch_only", None)
        print(json.dumps(doc, indent=2))
        return 0
    import numpy as np

    from weights_convert.detect import detect, family_of
    from weights_convert.pth import load_checkpoint

    state_dict = load_checkpoint(args.path)
    n = sum(int(np.prod(v.shape)) for v in state_dict.values())
    print(f"{args.path}: {len(state_dict)} keys, {n:,} values")
    det = detect(state_dict)
    print(det.describe())
    print(family_of(det).describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"convert": _convert, "export": _export, "verify": _verify, "inspect": _inspect}[args.command]
    try:
        return handler(args)
    except (CheckpointError, ImportError, OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
