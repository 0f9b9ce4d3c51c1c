"""Audit throughput: records/s for a full audit vs raw Ed25519 verifies/s.

    python -m bench.audit [--records 100000] [--repeat 3]

The limit is the raw two-core PyNaCl verify rate measured in the same run
over the same signatures; the target ratio is >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import build_ledger, cores, median_spread, raw_verify_rate
from ledger import audit, crypto, records


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    root, raws = build_ledger(args.records)
    built = time.perf_counter() - t0
    envs = [records.parse(r) for r in raws]
    items = [(root.public_key, crypto.RECORD_DOMAIN, e.body_bytes, e.signature) for e in envs]
    n_cores = cores()

    raw1 = median_spread(lambda: raw_verify_rate(items, 1), args.repeat)
    rawn = median_spread(lambda: raw_verify_rate(items, n_cores), args.repeat)

    def run_audit() -> float:
        with ThreadPoolExecutor(n_cores) as pool:
            t = time.perf_counter()
            chunks = [raws[i : i + 4096] for i in range(0, len(raws), 4096)]
            st, rep = audit.audit(chunks, anchor=root.public_key, executor=pool)
            assert rep.size == len(raws)
            return len(raws) / (time.perf_counter() - t)

    aud = median_spread(run_audit, args.repeat)
    out = {
        "records": len(raws),
        "cores": n_cores,
        "build_s": round(built, 1),
        "raw_verify_1core_per_s": round(raw1[0]),
        "raw_verify_allcores_per_s": round(rawn[0]),
        "audit_records_per_s": round(aud[0]),
        "audit_spread": [round(aud[1]), round(aud[2])],
        "ratio_audit_over_raw_allcores": round(aud[0] / rawn[0], 3),
        "target_ratio": 0.8,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"records                 {out['records']}")
        print(f"raw verify, 1 core      {raw1[0]:10.0f}/s  (spread {raw1[1]:.0f}..{raw1[2]:.0f})")
        print(f"raw verify, {n_cores} cores     {rawn[0]:10.0f}/s  (spread {rawn[1]:.0f}..{rawn[2]:.0f})")
        print(f"audit                   {aud[0]:10.0f}/s  (spread {aud[1]:.0f}..{aud[2]:.0f})")
        print(f"ratio audit / raw       {aud[0] / rawn[0]:10.3f}   (target >= 0.8)")
    return out


if __name__ == "__main__":
    main()
