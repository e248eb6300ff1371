#!/usr/bin/env python3
"""Re-create assets/ from ../shared (the inputs every developer has): what `cli.py sweep` runs on by default.

    python assets/vendor.py [--shared ../shared] [--check]

Copies the MiniLM QA model byte for byte, gzips the official SQuAD v1.1 dev set (gzip level 9, no name, mtime 0, so
the output is reproducible), and writes the calibration subset of the train file: the first paragraph of each of
its 442 articles with all their questions, in file order. Each source's sha256 is checked first; `--check` only
verifies that assets/ holds what this script makes. assets/README.md records the digests.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "minilm-l6-h384-squad11"
DEV_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
TRAIN_SHA256 = "e67626ac8ad84d3d95753573b04cac14dcde76c81c1c7fa3aa5c9e33155f33d1"
DEV_OUT = Path("squad/dev-v1.1.json.gz")
CALIB_OUT = Path("squad/train-v1.1-calib-first-paragraphs.json.gz")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def calibration_subset(train: bytes) -> bytes:
    doc = json.loads(train)
    data = [{"title": a["title"], "paragraphs": a["paragraphs"][:1]} for a in doc["data"]]
    return json.dumps({"version": doc.get("version", "1.1"), "data": data}, ensure_ascii=False).encode("utf-8")


def outputs(shared: Path) -> dict[Path, bytes]:
    dev = (shared / "data/squad/dev-v1.1.json").read_bytes()
    train = (shared / "data/squad/train-v1.1-explorer-reconstruction.json").read_bytes()
    for name, data, want in (("dev", dev, DEV_SHA256), ("train", train, TRAIN_SHA256)):
        if sha256(data) != want:
            sys.exit(f"{name} file in {shared} is not the expected one (sha256 {sha256(data)})")
    out = {DEV_OUT: gz(dev), CALIB_OUT: gz(calibration_subset(train))}
    for f in sorted((shared / "models" / MODEL).iterdir()):
        out[Path(MODEL) / f.name] = f.read_bytes()
    return out


def _plain(data: bytes, rel: Path) -> bytes:
    return gzip.decompress(data) if rel.suffix == ".gz" else data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--check", action="store_true", help="verify assets/ instead of writing it")
    args = ap.parse_args()
    bad = 0
    for rel, data in outputs(args.shared).items():
        target = HERE / rel
        if args.check:
            # .gz files are compared by content: another zlib may compress the same bytes differently.
            ok = target.exists() and _plain(target.read_bytes(), rel) == _plain(data, rel)
            bad += not ok
            print(f"{'ok  ' if ok else 'DIFF'} {rel}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        plain = _plain(data, rel)
        print(f"{rel}: {len(data):,} bytes, sha256 {sha256(data)}"
              + (f"; inside {len(plain):,} bytes, sha256 {sha256(plain)}" if rel.suffix == ".gz" else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
