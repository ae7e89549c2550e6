"""Segment images or volumes with a trained or converted model.

    python -m fedfms_jax.predict --weights DIR --input FILE_OR_FOLDER --out FILE_OR_FOLDER
        [--box x0,y0,x1,y1 | --point x,y] [--save-logits F.npy] [--round R]

DIR is a model directory (a `weights_convert` output, or a run's final/) or a training
work dir: its final/ model, or the global model of checkpoint --round R; no dataset is
built to load it. Inputs: PNG/JPEG/TIFF, NPY ([H,W], [H,W,3] or a [D,H,W]
stack) or NIfTI. A NIfTI volume is reoriented to its closest canonical orientation (as
viewers and the training data readers do) and cut into axial slices laid out as the model
was trained (`slice_orientation` in its model.json, "yx" by default); the label volume is
written back in the input's own orientation with its affine. Non-uint8 intensities are
clipped at the 99th percentile and scaled to 0-255 as in training. Prompts are in input
pixel coordinates and only for models that take prompts. Output: PNG (2-D), NIfTI or NPY
mask at the input resolution, plus a PNG overlay beside it; binary masks are 0/255 in PNG
and 0/1 elsewhere, two-class masks hold labels 0/1/2. With a folder as --input, every
supported file in it is segmented into the --out folder (one compiled program for all).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from fedfms_jax import config_cli
from fedfms_jax.cli_errors import UsageError, run_cli
from fedfms_jax.data import preprocess
from fedfms_jax.trained_model import load_trained
from weights_convert.workdir_model import final_dir, is_workdir

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
INPUT_EXT = IMAGE_EXT + (".npy", ".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


class Volume(NamedTuple):
    """Where a NIfTI input's slices came from, to write the labels back the same way."""
    image: object           # the nibabel image as stored
    orientation: str        # slice layout the model was trained with ("yx" | "xy")


def read_input(path: Path, orientation: str = "yx") -> tuple[np.ndarray, Volume | None]:
    """-> (uint8 slices [N,H,W,3], Volume for NIfTI inputs else None)."""
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist")
    name = path.name.lower()
    volume = None
    if _is_nifti(path):
        import nibabel as nib
        try:
            stored = nib.load(str(path))
        except Exception as exc:
            raise UsageError(f"{path}: not a readable NIfTI file ({' '.join(str(exc).split())[:200]})") from None
        if len(stored.shape) not in (2, 3):
            raise UsageError(f"{path}: expected a 2-D or 3-D NIfTI volume, got shape {stored.shape}")
        data = np.asarray(stored.dataobj) if len(stored.shape) == 2 else np.asarray(
            nib.as_closest_canonical(stored).dataobj)
        if data.ndim == 2:
            data = data[..., None]
        slices = preprocess.axial_slices(preprocess.to_uint8(data), orientation)
        volume = Volume(stored, orientation)
    elif name.endswith(".npy"):
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"{path}: not a plain numpy array ({exc})") from None
        if data.ndim == 2 or (data.ndim == 3 and data.shape[-1] in (1, 3)):
            slices = preprocess.to_uint8(data)[None]
        elif data.ndim == 3:
            slices = preprocess.to_uint8(data)
        else:
            raise UsageError(f"{path}: expected [H,W], [H,W,3] or [D,H,W], got shape {data.shape}")
    elif name.endswith(IMAGE_EXT):
        from PIL import Image
        with Image.open(path) as im:
            data = np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "LA", "CMYK") else im)
        slices = preprocess.to_uint8(data)[None]
    else:
        raise UsageError(f"unsupported input {path.name}: use PNG/JPEG/TIFF, .npy or .nii/.nii.gz")
    return np.stack([preprocess.to_rgb(s) for s in slices]), volume


def parse_numbers(text: str, n: int, what: str) -> np.ndarray:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise UsageError(f"--{what} needs {n} comma-separated numbers, got '{text}'")
    return np.asarray(vals, np.float32)


def load_predictor(weights: Path, round_: int | None = None):
    """-> (model, image_size, pixel_norm, prompt_free) from a model directory or a work dir."""
    trained = load_trained(weights, round_)
    scfg = trained.config
    return trained.model, scfg.image_size, scfg.pixel_norm, scfg.prompt_free


def slice_orientation(weights: Path) -> str:
    """The slice layout a model was trained with: its model.json's, else "yx"."""
    meta = (final_dir(weights) if is_workdir(weights) else weights) / "model.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("slice_orientation", "yx")
        except ValueError:
            pass
    return "yx"


class Predictor:
    """One jitted program for every input: batches are padded to `batch_size`."""

    def __init__(self, model, size: int, pixel_norm: str, batch_size: int = 4):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from fedfms_jax.model_init import make_forward
        self.size, self.batch_size = size, batch_size
        forward = make_forward(pixel_norm)
        graphdef, self.state = nnx.split(model)

        @jax.jit
        def run(state, images, boxes, coords):
            m = nnx.merge(graphdef, state)
            pts = None if coords is None else (coords, jnp.ones(coords.shape[:2], jnp.int32))
            return forward(m, images, boxes=boxes, points=pts).astype(jnp.float32)

        self._run = run

    def __call__(self, slices: np.ndarray, box=None, point=None) -> np.ndarray:
        """uint8 [N,H,W,3] -> low-res logits [N,size/4,size/4,K] (float32)."""
        n, h, w, _ = slices.shape
        size, bs = self.size, self.batch_size
        resized = np.stack([preprocess.resize_image(s, size) for s in slices])
        scale = np.asarray([size / w, size / h], np.float32)
        boxes = None if box is None else np.tile(box * np.tile(scale, 2), (bs, 1))
        coords = None if point is None else np.tile((point * scale)[None, None], (bs, 1, 1))
        out = []
        for i in range(0, n, bs):
            imgs = resized[i:i + bs]
            pad = bs - len(imgs)
            if pad:
                imgs = np.concatenate([imgs, np.zeros((pad, *imgs.shape[1:]), imgs.dtype)])
            out.append(np.asarray(self._run(self.state, imgs, boxes, coords))[:bs - pad])
        return np.concatenate(out)


def logits_to_mask(logits: np.ndarray, h: int, w: int) -> np.ndarray:
    """[N,h',w',K] -> labels uint8 [N,H,W]: 1 where class 0 is on, c+1 where class c is (later wins)."""
    import jax
    up = np.asarray(jax.image.resize(logits, (logits.shape[0], h, w, logits.shape[-1]), "bilinear"))
    labels = np.zeros(up.shape[:3], np.uint8)
    for k in range(up.shape[-1]):
        labels[up[..., k] > 0] = k + 1
    return labels


def write_mask(out: Path, labels: np.ndarray, volume: Volume | None, num_classes: int) -> None:
    name = out.name.lower()
    if _is_nifti(out):
        import nibabel as nib
        if volume is None:
            vol, affine, header = np.moveaxis(labels, 0, -1), np.eye(4), None
        else:
            stored = volume.image
            vol = preprocess.volume_of_slices(labels, volume.orientation)
            if len(stored.shape) == 2:
                vol = vol[..., 0]
            else:  # from the canonical orientation back to the file's own
                to_file = nib.orientations.ornt_transform(
                    nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.io_orientation(stored.affine))
                vol = nib.orientations.apply_orientation(vol, to_file)
            affine, header = stored.affine, stored.header.copy()
        img = nib.Nifti1Image(np.ascontiguousarray(vol).astype(np.uint8), affine, header)
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


def overlay_path(out: Path) -> Path:
    stem = out.name[:-len(".nii.gz")] if out.name.lower().endswith(".nii.gz") else out.stem
    return out.with_name(f"{stem}_overlay.png")


def write_overlay(out: Path, slices: np.ndarray, logits: np.ndarray) -> Path:
    """The slice with the most predicted foreground, prediction tinted over the image."""
    from PIL import Image
    from fedfms_jax.overlays import render
    best = int(np.argmax((logits > 0).reshape(len(logits), -1).sum(1)))
    path = overlay_path(out)
    Image.fromarray(render(slices[best], None, logits[best])).save(path)
    return path


def output_name(src: Path) -> str:
    """A folder input's output file name: the input's, images as PNG."""
    return src.stem + ".png" if src.name.lower().endswith(IMAGE_EXT) else src.name


def segment_file(predictor: Predictor, src: Path, out: Path, orientation: str, box=None, point=None):
    """Predict one file, write its mask and overlay; returns (labels, logits)."""
    slices, volume = read_input(src, orientation)
    logits = predictor(slices, box, point)
    labels = logits_to_mask(logits, slices.shape[1], slices.shape[2])
    write_mask(out, labels, volume, logits.shape[-1])
    write_overlay(out, slices, logits)
    return labels, logits


FLAGS = {
    "weights": ("DIR", "a training work dir or a weights_convert output (required)"),
    "input": ("FILE_OR_FOLDER", "PNG/JPEG/TIFF, .npy or NIfTI image or volume, or a folder of them (required)"),
    "out": ("FILE_OR_FOLDER", "the mask: .png (2-D), .nii/.nii.gz or .npy; a folder for a folder input (required)"),
    "box": ("x0,y0,x1,y1", "a box prompt in input pixels"),
    "point": ("x,y", "a foreground point prompt in input pixels"),
    "save-logits": ("F.npy", "also save the raw logits"),
    "round": ("R", "work dir: the global model of checkpoint R (default: its final/ model)"),
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
    src, out = Path(flags["input"]), Path(flags["out"])
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(INPUT_EXT))
        if not files:
            raise UsageError(f"input folder {src} holds no PNG/JPEG/TIFF, .npy or NIfTI file")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} must be a folder when --input is a folder")
        if "save-logits" in flags:
            raise UsageError("--save-logits takes one input file, not a folder")
        targets = [(f, out / output_name(f)) for f in files]
        taken = [str(t) for _, t in targets if t.exists()]
        if taken:
            raise UsageError(f"{len(taken)} output file(s) exist already, e.g. {taken[0]}: choose another --out folder")
    else:
        if not out.name.lower().endswith((".png", ".npy", ".nii", ".nii.gz")):
            raise UsageError(f"unsupported output {out.name}: use .png, .nii/.nii.gz or .npy")
        if not out.parent.exists():
            raise UsageError(f"output folder {out.parent} does not exist")
        if not src.is_file():
            raise UsageError(f"input file {src} does not exist")
        if not src.name.lower().endswith(INPUT_EXT):
            raise UsageError(f"unsupported input {src.name}: use PNG/JPEG/TIFF, .npy or .nii/.nii.gz")
        targets = [(src, out)]
    weights = Path(flags["weights"])
    model, size, pixel_norm, prompt_free = load_predictor(
        weights, int(flags["round"]) if "round" in flags else None)
    if prompt_free and (box is not None or point is not None):
        raise UsageError("this model is prompt-free (trained without prompts): drop --box/--point")
    orientation = slice_orientation(weights)
    predictor = Predictor(model, size, pixel_norm)
    if src.is_dir():
        out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    for f, target in tqdm(targets, desc="predict", unit="file", disable=len(targets) == 1):
        labels, logits = segment_file(predictor, f, target, orientation, box, point)
        if len(targets) == 1:
            print(f"wrote {target} and {overlay_path(target).name} ({labels.shape[0]} slice(s), "
                  f"{int((labels > 0).sum())} foreground pixels)")
    if "save-logits" in flags:
        np.save(flags["save-logits"], logits[0] if logits.shape[0] == 1 else logits)
    if len(targets) > 1:
        print(f"wrote {len(targets)} masks and overlays to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "predict"))
