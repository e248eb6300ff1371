#!/usr/bin/env bash
# On the device: gather the pieces of Ray that this call carried (benchmarks/ray_pieces.py made them, under
# .raypieces/) in /tmp/raypieces, which persists between the calls of one warm machine; once every piece named in
# SHA256 is there, check them and unzip the site-packages tree into /tmp/site. Prints "ray ready" then, else how
# many pieces are still missing; exit 0 either way, 2 on a bad checksum. Later commands: export PYTHONPATH=/tmp/site.
set -uo pipefail
mkdir -p /tmp/raypieces
cp .raypieces/* /tmp/raypieces/ 2>/dev/null
cd /tmp/raypieces || exit 2
[ -f SHA256 ] || { echo "no SHA256 carried yet (carry .raypieces/SHA256)"; exit 0; }
whole=$(tail -n 1 SHA256 | awk '{print $2}')
missing=$(head -n -1 SHA256 | awk '{print $2}' | while read -r p; do [ -f "$p" ] || echo "$p"; done)
if [ -n "$missing" ]; then echo "ray pieces still missing: $(echo $missing)"; exit 0; fi
head -n -1 SHA256 | sha256sum -c --quiet || { echo "error: a Ray piece is damaged"; exit 2; }
cat $(head -n -1 SHA256 | awk '{print $2}') > "$whole"
tail -n 1 SHA256 | sha256sum -c --quiet || { echo "error: the joined $whole does not match SHA256"; exit 2; }
cd - > /dev/null && mkdir -p /tmp/site && python3 -c "import sys; from benchmarks.ray_pieces import extract
extract(sys.argv[1], '/tmp/site')" "/tmp/raypieces/$whole" || exit 2
PYTHONPATH=/tmp/site python3 -c "import ray; print('ray ready:', ray.__version__, ray.__file__)"
