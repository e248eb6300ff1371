"""Ray for the GPU machines, in pieces small enough to travel (issue 24: `sweep --workers N` on the device).

    python3 -m benchmarks.ray_pieces [--python 3.12] [--piece-mb 15] [--out .raypieces]

The device image has no Ray, and a call's working tree may hold 64 MiB, of which the tracked tree (the vendored
MiniLM) takes about 49 MB: Ray's wheel (79 MB for 2.60, cp312) cannot travel in one call. This downloads the wheel
of the Ray version installed here and the wheels of what Ray needs that the image lacks (jsonschema and its own
needs), leaves out what `sweep --workers` never imports (Ray's Java jars, the dashboard's web build, RLlib, Serve,
Tune, Train, Data, LLM), and writes the rest as one zip of a site-packages tree, cut into pieces of at most
`--piece-mb` MB, with a SHA256 file. Each device call carries a piece or two (`carry: [".raypieces/ray-site.zip.00",
".raypieces/SHA256"]`) and runs `bash benchmarks/device_ray_pieces.sh`, which gathers them in the machine's /tmp
(it persists between the calls of one warm machine) and, once all are there, checks them and unzips the tree into
/tmp/site (`export PYTHONPATH=/tmp/site`). Run here, not on the device; `--python 3.11 --site DIR` unzips a
build for this machine's Python instead, to try it (e.g. tests/test_ray_sweep.py with PYTHONPATH=DIR).
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Ray's own parts that `sweep --workers` / `sensitivity --workers` (eval/distributed.py: ray.init, tasks, the
# runtime_env agent for PYTHONPATH) never imports
LEFT_OUT = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/tune/", "ray/train/",
            "ray/data/", "ray/llm/")
# Ray's requirements missing from the device image (its package list in the device tool's KINDS.md)
MISSING = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download(names: list[str], python: str, folder: Path) -> list[Path]:
    """Binary wheels of `names` for CPython `python` on x86-64 Linux, without their requirements."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", str(folder)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + names, check=True)
    return sorted(folder.glob("*.whl"))


def site_zip(wheels: list[Path], out: Path) -> tuple[int, int]:
    """One zip of the wheels' contents as a site-packages tree, LEFT_OUT left out: (files kept, files left out).
    LZMA, not deflate: two pieces then hold what took three (about a minute to compress here)."""
    kept = dropped = 0
    with zipfile.ZipFile(out, "w") as site:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as w:
                for info in w.infolist():
                    if info.filename.startswith(LEFT_OUT):
                        dropped += 1
                        continue
                    site.writestr(info, w.read(info.filename), compress_type=zipfile.ZIP_LZMA)
                    kept += 1
    return kept, dropped


def cut(path: Path, piece_bytes: int, out: Path) -> list[Path]:
    """`path` as pieces NAME.00, NAME.01, ... in `out`, and out/SHA256 (each piece's, then the whole's)."""
    data = path.read_bytes()
    pieces = []
    for i in range(0, len(data), piece_bytes):
        piece = out / f"{path.name}.{len(pieces):02d}"
        piece.write_bytes(data[i:i + piece_bytes])
        pieces.append(piece)
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in pieces]
    lines.append(f"{hashlib.sha256(data).hexdigest()}  {path.name}")
    (out / "SHA256").write_text("\n".join(lines) + "\n")
    return pieces


def extract(zip_path: str | Path, site: str | Path) -> None:
    """Unzip `zip_path` into `site` with each file's mode as the wheel recorded it (zipfile drops it, and Ray's
    raylet and GCS server must stay executable)."""
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            path = Path(z.extract(info, site))
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                path.chmod(mode & 0o777)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default="3.12", help="the device image's Python (default 3.12)")
    ap.add_argument("--piece-mb", type=float, default=15.0, help="largest piece, MB (default 15: two pieces)")
    ap.add_argument("--out", default=".raypieces")
    ap.add_argument("--site", help="also unzip the tree here (to try it on this machine)")
    args = ap.parse_args(argv)
    import ray  # the version to ship: the one the CPU tests ran

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ray-site.zip.*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download([f"ray=={ray.__version__}", *MISSING], args.python, Path(tmp))
        whole = Path(tmp) / "ray-site.zip"
        kept, dropped = site_zip(wheels, whole)
        pieces = cut(whole, int(args.piece_mb * 1e6), out)
        if args.site:
            extract(whole, args.site)
        print(f"ray {ray.__version__} for Python {args.python} with {', '.join(MISSING)}: {kept} files "
              f"({dropped} left out), {whole.stat().st_size / 1e6:.1f} MB in {len(pieces)} pieces in {out}/")


if __name__ == "__main__":
    main()
