"""A record of a training run, for the README's figures of the default run.

    python benchmarks/train_record.py --json PATH [-- TRAIN ARGS...]

Runs `python -m convbert_fast train --log-every 1 TRAIN ARGS...` in a temporary output directory and writes
its metrics.jsonl (every step's loss and tokens/s, every evaluation) with the device, versions, date, commit
and the training loop's wall time into one JSON record, which `python -m convbert_fast bench --markdown`
turns into the README's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from convbert_fast.bench import device_name, provenance, versions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", required=True)
    parser.add_argument("train_args", nargs="*", help="after --: arguments of `python -m convbert_fast train`")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        command = ["python", "-m", "convbert_fast", "train", *args.train_args]
        result = subprocess.run(
            [sys.executable, *command[1:], "--output-dir", out, "--log-every", "1"], capture_output=True, text=True
        )
        print(result.stdout[-2000:], result.stderr[-2000:], sep="\n")
        if result.returncode != 0:
            return result.returncode
        metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    wall = re.search(r"loss .* in (\d+) s", result.stdout)
    given = args.train_args[args.train_args.index("--device") + 1] if "--device" in args.train_args else None
    device = torch.device(given or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = {
        "kind": "train",
        "device": device_name(device),
        "versions": versions(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance(),
        "command": " ".join(command),
        "train_loop_s": int(wall[1]) if wall else None,
        "metrics": metrics,
    }
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
