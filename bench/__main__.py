"""The whole benchmark suite: ``python -m bench [--quick] [--only NAME[,NAME]] [--out DIR]``.

Runs the modules in order (sizes, audit, append, readpath, propagation,
memory, sshrevoke), prints each one's figures, and writes ``DIR/benchmarks.json`` and
``DIR/BENCHMARKS.md`` (DIR defaults to ``docs/``; plots go there too). With
``--only`` the modules run are merged into the results already in DIR. The
default run is sized for a 2-core machine in under about 20 minutes;
``--quick`` takes a few minutes. A module that fails is reported as failed
(with its error) and the suite goes on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import DOCS, Config, cleanup, finish, loadavg, machine, module_result, print_result

MODULES = ("sizes", "audit", "append", "readpath", "propagation", "memory", "sshrevoke")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a few minutes)")
    ap.add_argument(
        "--only", action="append", default=[], metavar="NAME", help=f"one of {', '.join(MODULES)}"
    )
    ap.add_argument("--out", type=Path, default=DOCS, help="where the JSON, the report and the plots go")
    args = ap.parse_args(argv)
    only = [n.strip() for arg in args.only for n in arg.split(",") if n.strip()]
    unknown = [n for n in only if n not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    names = [n for n in MODULES if not only or n in only]
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = Config(quick=args.quick, out_dir=args.out)
    mode = "quick" if args.quick else "full"
    doc: dict[str, Any] = {"modules": {}}
    existing = args.out / "benchmarks.json"
    if only and existing.exists():
        try:
            doc = json.loads(existing.read_text(encoding="utf-8"))
        except ValueError:
            doc = {"modules": {}}
    t0 = time.monotonic()
    load0 = loadavg()
    failed = 0
    try:
        for name in names:
            print(f"-- bench.{name} ({mode})", flush=True)
            try:
                mod = importlib.import_module(f"bench.{name}")
                res = finish(mod.run(cfg))
            except Exception:
                failed += 1
                res = finish(module_result(name, f"{name} (failed)", f"python -m bench.{name}"))
                res["error"] = traceback.format_exc()[-3000:]
                print(res["error"], file=sys.stderr)
            res["mode"] = mode
            doc["modules"][name] = res
            print_result(res)
            sys.stdout.flush()
    finally:
        cleanup(cfg)
    doc.update(
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        mode=mode if not only else doc.get("mode", mode),
        machine=machine(),
        load=[load0, loadavg()],
    )
    if not only:
        doc["duration_s"] = round(time.monotonic() - t0)
    md = report.write(doc, args.out)
    print(f"wrote {md} and {args.out / 'benchmarks.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
