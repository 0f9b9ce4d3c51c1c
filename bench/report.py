"""Render ``docs/BENCHMARKS.md`` from the suite's JSON results (``docs/benchmarks.json``).

python -m bench.report [--json docs/benchmarks.json] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.harness import DOCS, WIDE

ORDER = ("sizes", "audit", "append", "readpath", "propagation", "memory", "sshrevoke")


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | float):
        a = abs(float(v))
        if a >= 100 or (a.is_integer() and unit in ("bytes", "")):
            s = f"{v:,.0f}"
        elif a >= 10:
            s = f"{v:.1f}"
        elif a >= 0.1:
            s = f"{v:.2f}"
        else:
            s = f"{v:.3g}"
        return f"{s} {unit}".strip()
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(f: dict[str, Any]) -> str:
    out = f"**{fmt(f['median'], f['unit'])}**"
    if f.get("runs", 0) > 1:
        out += f" ({fmt(f['min'])}–{fmt(f['max'])}, {f['runs']} runs)"
    if f.get("wide"):
        out += " ⚠ wide spread"
    return out


def _ref(r: dict[str, Any] | None, median: Any = None) -> str:
    if not r:
        return "—"
    val = fmt(r.get("value"), r.get("unit", ""))
    ratio_v = r.get("ratio")
    if isinstance(median, int | float) and isinstance(r.get("value"), int | float) and r["value"]:
        ratio_v = median / r["value"]
    ratio = f"; ratio **{ratio_v:.3g}**" if ratio_v is not None else ""
    src = "" if r.get("source", "measured in this run") == "measured in this run" else f" [{r['source']}]"
    return f"{r['label']}: {val}{ratio}{src}"


def _target(f: dict[str, Any]) -> str:
    t = f.get("target")
    if not t:
        return "—"
    verdict = "met" if t["met"] else ("**missed**" if t["met"] is False else "?")
    return f"{t['text']}: {verdict}"


def render_module(m: dict[str, Any]) -> list[str]:
    out = [f"## {m.get('title', m['name'])}", ""]
    meta = f"`{m.get('command', '')}`"
    if "duration_s" in m:
        meta += f" — {m['duration_s']:.0f} s"
    if m.get("load_before"):
        meta += f", load average {m['load_before'][0]:g} → {m.get('load_after', ['?'])[0]}"
    if m.get("mode"):
        meta += f", {m['mode']} run"
    out += [meta, ""]
    if m.get("error"):
        out += ["**This module failed:**", "", "```", m["error"].strip(), "```", ""]
    figs = m.get("figures", [])
    if figs:
        out += [
            "| figure | median (spread) | limit, same run | established system | target |",
            "|---|---|---|---|---|",
        ]
        for f in figs:
            out.append(
                "| "
                + " | ".join(
                    _cell(x)
                    for x in (
                        f["label"],
                        _value(f),
                        _ref(f.get("limit"), f["median"]),
                        _ref(f.get("comparable"), f["median"]),
                        _target(f),
                    )
                )
                + " |"
            )
        out.append("")
        notes = [f for f in figs if f.get("note")]
        for f in notes:
            out.append(f"- *{f['label']}*: {f['note']}.")
        if notes:
            out.append("")
        cmds = sorted({f["command"] for f in figs if f.get("command")})
        out += ["Reproduce:", "", "```sh", *cmds, "```", ""]
    for t in m.get("tables", []):
        out += [f"**{t['title']}**", ""]
        out.append("| " + " | ".join(t["columns"]) + " |")
        out.append("|" + "---|" * len(t["columns"]))
        for row in t["rows"]:
            out.append("| " + " | ".join(_cell(fmt(x)) for x in row) + " |")
        out.append("")
        if t.get("note"):
            out += [t["note"], ""]
    for img in m.get("images", []):
        out += [f"![{img['caption']}]({img['file']})", ""]
    for p in m.get("profiles", []):
        out += [f"**Profile: {p['title']}** ({p['samples']} samples; {p['how']})", ""]
        if p.get("roles"):
            out += ["| where | share of samples |", "|---|---|"]
            out += [f"| {_cell(a)} | {b} |" for a, b in p["roles"]]
            out.append("")
        out += [
            "| top functions, self time | share | top functions, inclusive | share |",
            "|---|---|---|---|",
        ]
        for i in range(max(len(p["self"]), len(p["inclusive"]))):
            a = p["self"][i] if i < len(p["self"]) else ["", ""]
            b = p["inclusive"][i] if i < len(p["inclusive"]) else ["", ""]
            out.append(f"| {_cell(a[0])} | {a[1]} | {_cell(b[0])} | {b[1]} |")
        out.append("")
    for n in m.get("notes", []):
        out.append(f"- {n}")
    if m.get("notes"):
        out.append("")
    if m.get("findings"):
        out += [m["findings"], ""]
    return out


def render(doc: dict[str, Any]) -> str:
    mods = doc.get("modules", {})
    names = [n for n in ORDER if n in mods] + [n for n in mods if n not in ORDER]
    mach = doc.get("machine", {})
    out = [
        "# Writ benchmarks",
        "",
        "Generated by `python -m bench"
        + (" --quick" if doc.get("mode") == "quick" else "")
        + f"` on {doc.get('generated', '?')}"
        + (f" in {fmt(doc['duration_s'])} s" if doc.get("duration_s") else "")
        + ". Do not edit by hand: "
        "re-run the suite (`python -m bench`, about 20 minutes; `--quick` for a few minutes; `--only NAME` "
        "for one module, merged into the existing results).",
        "",
        f"Machine: {mach.get('cores', '?')} cores ({mach.get('cpu', '?')}), "
        f"{fmt(mach.get('memory_mib'))} MiB, "
        f"Linux {mach.get('kernel', '?')}, Python {mach.get('python', '?')}, PyNaCl "
        f"{mach.get('pynacl', '?')}, "
        f"SQLite {mach.get('sqlite', '?')}.",
        "",
        "How to read a figure: the **median** of repeated runs, with the lowest and highest run; a spread "
        f"wider than {WIDE:.0%} of the median is flagged ⚠ (a noisy machine: compare it with the limit "
        "measured in the same run, not with a number from another day). Each figure stands beside the limit "
        "measured in the same run on the same machine (the ratio is figure / limit) and beside the "
        "comparable "
        "figure of an established system (measured in the same run where we could run it, otherwise cited "
        "with its source).",
        "",
    ]
    loads = [mods[n].get("load_before", [None])[0] for n in names if mods[n].get("load_before")]
    if loads and max(loads) > 1.5 * max(1, mach.get("cores", 1)) / 2:
        out += [
            f"**Noise.** The 1-minute load average ranged {min(loads):g}–{max(loads):g} on "
            f"{mach.get('cores', '?')} cores while the suite ran (other work shared the machine): "
            "absolute figures are low and noisy; the ratios to the same-run limits are the figures to trust.",
            "",
        ]
    wide = [f["label"] for n in names for f in mods[n].get("figures", []) if f.get("wide")]
    if wide:
        out += ["Figures with a wide spread: " + "; ".join(wide) + ".", ""]
    targets = [(n, f) for n in names for f in mods[n].get("figures", []) if f.get("target")]
    if targets:
        out += ["## Targets", "", "| figure | measured | limit, same run | target |", "|---|---|---|---|"]
        for _n, f in targets:
            out.append(
                f"| {_cell(f['label'])} | {_cell(_value(f))} | {_cell(_ref(f.get('limit'), f['median']))} | "
                f"{_cell(_target(f))} |"
            )
        out.append("")
    if doc.get("summary"):
        out += [doc["summary"], ""]
    for n in names:
        out += render_module(mods[n])
    return "\n".join(out).rstrip() + "\n"


def write(doc: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    md = out_dir / "BENCHMARKS.md"
    md.write_text(render(doc), encoding="utf-8")
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, default=DOCS / "benchmarks.json")
    ap.add_argument("--out", type=Path, default=None, help="default: BENCHMARKS.md beside the JSON")
    args = ap.parse_args(argv)
    doc = json.loads(args.json.read_text(encoding="utf-8"))
    out = args.out or args.json.parent / "BENCHMARKS.md"
    out.write_text(render(doc), encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main()
