"""Segment one image or volume with a trained or converted model.

    python -m fedfms_jax.predict --weights DIR --input FILE --out FILE
        [--box x0,y0,x1,y1 | --point x,y] [--save-logits F.npy] [--round R]

DIR is a training work dir (the global model of its latest checkpoint, or --round) or a
`weights_convert` output. Inputs: PNG/JPEG/TIFF, NPY ([H,W], [H,W,3] or a [D,H,W]
stack) or NIfTI (slices along the last axis). Non-uint8 intensities are clipped at the
99th percentile and scaled to 0-255 as in training. Prompts are in input pixel
coordinates. Output: PNG (2-D), NIfTI or NPY mask at the input resolution; binary
masks are 0/255 in PNG and 0/1 elsewhere, two-class masks hold labels 0/1/2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from fedfms_jax import config_cli
from fedfms_jax.cli_errors import UsageError, run_cli

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def to_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
    lo, hi = float(np.min(x)), float(np.percentile(x, 99))
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def read_input(path: Path) -> tuple[np.ndarray, object]:
    """-> (uint8 slices [N,H,W,3], NIfTI image or None)."""
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist")
    name = path.name.lower()
    nifti = None
    if _is_nifti(path):
        import nibabel as nib
        nifti = nib.load(str(path))
        data = np.asarray(nifti.dataobj)
        if data.ndim == 2:
            data = data[..., None]
        if data.ndim != 3:
            raise UsageError(f"{path}: expected a 2-D or 3-D NIfTI volume, got shape {data.shape}")
        slices = np.moveaxis(to_uint8(data), -1, 0)
    elif name.endswith(".npy"):
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"{path}: not a plain numpy array ({exc})") from None
        if data.ndim == 2:
            slices = to_uint8(data)[None]
        elif data.ndim == 3 and data.shape[-1] in (1, 3):
            slices = to_uint8(data)[None]
        elif data.ndim == 3:
            slices = to_uint8(data)
        else:
            raise UsageError(f"{path}: expected [H,W], [H,W,3] or [D,H,W], got shape {data.shape}")
    elif name.endswith(IMAGE_EXT):
        from PIL import Image
        with Image.open(path) as im:
            data = np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "LA", "CMYK") else im)
        slices = to_uint8(data)[None]
    else:
        raise UsageError(f"unsupported input {path.name}: use PNG/JPEG/TIFF, .npy or .nii/.nii.gz")
    if slices.ndim == 3:
        slices = np.repeat(slices[..., None], 3, axis=-1)
    elif slices.shape[-1] == 1:
        slices = np.repeat(slices, 3, axis=-1)
    return slices, nifti


def parse_numbers(text: str, n: int, what: str) -> np.ndarray:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise UsageError(f"--{what} needs {n} comma-separated numbers, got '{text}'")
    return np.asarray(vals, np.float32)


def load_predictor(weights: Path, round_: int | None = None):
    """-> (model, image_size, pixel_norm, prompt_free) from a work dir or converted weights."""
    if not weights.is_dir():
        raise UsageError(f"weights directory {weights} does not exist")
    if (weights / "model.json").is_file():
        from weights_convert.store import load_model
        try:
            scfg, model = load_model(weights)
        except Exception as exc:
            raise UsageError(f"cannot read weights in {weights}: {' '.join(str(exc).split())[:300]}") from None
        return model, scfg.image_size, scfg.pixel_norm, scfg.prompt_free
    if (weights / "config.json").is_file():
        from flax import nnx
        from fedfms_jax.run_state import restore_run
        run = restore_run(weights, round_)
        eng = run.engine
        model = nnx.merge(eng.graphdef, eng.partition.merge(run.global_trainable(), eng.frozen), eng.rest)
        m = run.cfg["model"]
        return model, run.cfg["image_size"], m["pixel_norm"], m["prompt_free"]
    raise UsageError(f"{weights} is neither a training work dir (config.json) nor converted weights (model.json)")


def predict_slices(model, slices: np.ndarray, size: int, pixel_norm: str, box=None, point=None,
                   batch_size: int = 4) -> np.ndarray:
    """uint8 [N,H,W,3] -> low-res logits [N,size/4,size/4,K] (float32)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from PIL import Image
    from fedfms_jax.model_init import make_forward
    n, h, w, _ = slices.shape
    resized = np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in slices])
    scale = np.asarray([size / w, size / h], np.float32)
    forward = make_forward(pixel_norm)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images, boxes, coords):
        m = nnx.merge(graphdef, state)
        pts = None if coords is None else (coords, jnp.ones(coords.shape[:2], jnp.int32))
        return forward(m, images, boxes=boxes, points=pts).astype(jnp.float32)

    out = []
    for i in range(0, n, batch_size):
        imgs = resized[i:i + batch_size]
        b = len(imgs)
        boxes = None if box is None else jnp.asarray(np.tile(box * np.tile(scale, 2), (b, 1)))
        coords = None if point is None else jnp.asarray(np.tile((point * scale)[None, None], (b, 1, 1)))
        out.append(np.asarray(run(state, jnp.asarray(imgs), boxes, coords)))
    return np.concatenate(out)


def logits_to_mask(logits: np.ndarray, h: int, w: int) -> np.ndarray:
    """[N,h',w',K] -> labels uint8 [N,H,W]: 1 where class 0 is on, c+1 where class c is (later wins)."""
    import jax
    up = np.asarray(jax.image.resize(logits, (logits.shape[0], h, w, logits.shape[-1]), "bilinear"))
    labels = np.zeros(up.shape[:3], np.uint8)
    for k in range(up.shape[-1]):
        labels[up[..., k] > 0] = k + 1
    return labels


def write_mask(out: Path, labels: np.ndarray, nifti, num_classes: int) -> None:
    name = out.name.lower()
    if _is_nifti(out):
        import nibabel as nib
        vol = np.moveaxis(labels, 0, -1)
        affine = nifti.affine if nifti is not None else np.eye(4)
        header = nifti.header.copy() if nifti is not None else None
        if nifti is not None and len(nifti.shape) == 2:
            vol = vol[..., 0]
        img = nib.Nifti1Image(vol.astype(np.uint8), affine, header)
        img.set_data_dtype(np.uint8)
        nib.save(img, str(out))
    elif name.endswith(".npy"):
        np.save(out, labels[0] if labels.shape[0] == 1 else labels)
    elif name.endswith(".png"):
        if labels.shape[0] != 1:
            raise UsageError(f"the input has {labels.shape[0]} slices: write .nii.gz or .npy, not PNG")
        from PIL import Image
        img = labels[0] * (255 if num_classes == 1 else 1)
        Image.fromarray(img.astype(np.uint8)).save(out)
    else:
        raise UsageError(f"unsupported output {out.name}: use .png, .nii/.nii.gz or .npy")


FLAGS = {
    "weights": ("DIR", "a training work dir or a weights_convert output (required)"),
    "input": ("FILE", "PNG/JPEG/TIFF, .npy or NIfTI image or volume (required)"),
    "out": ("FILE", "the mask: .png (2-D), .nii/.nii.gz or .npy (required)"),
    "box": ("x0,y0,x1,y1", "a box prompt in input pixels"),
    "point": ("x,y", "a foreground point prompt in input pixels"),
    "save-logits": ("F.npy", "also save the raw logits"),
    "round": ("R", "work dir: the checkpoint of round R (default: the latest)"),
}


def main(argv: Sequence[str]) -> int:
    if config_cli.wants_help(argv):
        config_cli.raise_help("fedfms_jax.predict", __doc__, FLAGS)
    flags, overrides = config_cli.split_argv(argv, FLAGS)
    if overrides:
        raise UsageError("predict takes no --config overrides")
    for req in ("weights", "input", "out"):
        if req not in flags:
            raise UsageError(f"--{req} is required")
    if "box" in flags and "point" in flags:
        raise UsageError("give --box or --point, not both")
    box = parse_numbers(flags["box"], 4, "box") if "box" in flags else None
    point = parse_numbers(flags["point"], 2, "point") if "point" in flags else None
    if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
        raise UsageError(f"--box needs x0 < x1 and y0 < y1, got {flags['box']}")
    out = Path(flags["out"])
    if not out.name.lower().endswith((".png", ".npy", ".nii", ".nii.gz")):
        raise UsageError(f"unsupported output {out.name}: use .png, .nii/.nii.gz or .npy")
    if not out.parent.exists():
        raise UsageError(f"output folder {out.parent} does not exist")
    slices, nifti = read_input(Path(flags["input"]))
    model, size, pixel_norm, prompt_free = load_predictor(
        Path(flags["weights"]), int(flags["round"]) if "round" in flags else None)
    if prompt_free and (box is not None or point is not None):
        print("predict: note: this model is prompt-free; the prompt is ignored", file=sys.stderr)
    logits = predict_slices(model, slices, size, pixel_norm, box=box, point=point)
    labels = logits_to_mask(logits, slices.shape[1], slices.shape[2])
    write_mask(out, labels, nifti, logits.shape[-1])
    if "save-logits" in flags:
        np.save(flags["save-logits"], logits[0] if logits.shape[0] == 1 else logits)
    print(f"wrote {out} ({labels.shape[0]} slice(s), {int((labels > 0).sum())} foreground pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "predict"))
