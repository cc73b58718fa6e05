"""Print the README's removal and LDS tables (markdown) from `concept-influence evaluate` output folders.

    python bench/evaluation_table.py runs/eval-removal [runs/eval-lds ...]

Rows: the base and fully fine-tuned models, the oracle, then each scores file's remove-top / remove-bottom and the
random removal at every fraction: measurement mean [95% CI over seeds] and the share of the rise removed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(block: dict, digits: int = 2) -> str:
    lo, hi = block["ci"]
    return f"{block['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def removal_rows(ev: dict) -> list[str]:
    judged = "trait_rate" in ev["metrics"]
    head = "| removal | rows | probe readout | rise removed (probe) |" + (
        " trait rate | rise removed (trait rate) |" if judged else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name: str, k: int | str, e: dict) -> str:
        text = f"| {name} | {k} | {ci(e, 3)} | {ci(e['rise_removed'])} |"
        if judged:
            text += f" {ci(e['trait_rate'], 3)} | {ci(e['trait_rate']['rise_removed'])} |"
        return text

    base, full = ev["base"], ev["full"]
    lines.append(
        f"| base model (no fine-tuning) | - | {ci(base, 3)} | - |"
        + (f" {ci(base['trait_rate'], 3)} | - |" if judged else "")
    )
    lines.append(f"| full data | 0 | {ci(full, 3)} | - |" + (f" {ci(full['trait_rate'], 3)} | - |" if judged else ""))
    if "oracle" in ev:
        lines.append(row("oracle: exactly the planted rows", ev["oracle"]["k"], ev["oracle"]))
    fractions = sorted({f for per in ev["results"].values() for f in per}, key=float)
    for f in fractions:
        first = True
        for name, per in ev["results"].items():
            if f not in per:
                continue
            e = per[f]
            lines.append(row(f"{name}: top {float(f):.0%}", e["k"], e["remove_top"]))
            lines.append(row(f"{name}: bottom {float(f):.0%}", e["k"], e["remove_bottom"]))
            if first:
                lines.append(row(f"random {float(f):.0%}", e["k"], e["random"]))
                first = False
    return lines


def paired_rows(ev: dict) -> list[str]:
    """Remove-top's share of the rise minus random's and bottom's, paired by seed (mean [95% CI])."""
    judged = "trait_rate" in ev["metrics"]
    head = "| method | fraction | top − random (probe) | top − bottom (probe) |"
    head += " top − random (trait rate) | top − bottom (trait rate) |" if judged else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, per in ev["results"].items():
        for f, e in sorted(per.items(), key=lambda kv: float(kv[0])):
            if "top_minus_random" not in e:
                continue
            r, b = e["top_minus_random"], e["top_minus_bottom"]
            text = f"| {name} | {float(f):.0%} | {ci(r)} | {ci(b)} |"
            if judged:
                text += f" {ci(r['trait_rate'])} | {ci(b['trait_rate'])} |"
            lines.append(text)
    return lines


def lds_rows(ev: dict) -> list[str]:
    judged = "trait_rate" in ev["metrics"]
    lines = [
        "| method | LDS (probe) | LDS (trait rate) |" if judged else "| method | LDS (probe) |",
        "|---|---|---|" if judged else "|---|---|",
    ]
    for name, block in ev["lds"]["methods"].items():
        text = f"| {name} | {ci({'mean': block['spearman'], 'ci': block['ci']})} |"
        if judged:
            t = block["trait_rate"]
            text += f" {ci({'mean': t['spearman'], 'ci': t['ci']})} |"
        lines.append(text)
    return lines


def main(folders: list[str]) -> None:
    for folder in folders:
        ev = json.loads((Path(folder) / "evaluation.json").read_text())
        print(
            f"\n{folder}: {ev['n_rows']} rows, {ev['seeds']} seeds, rise "
            + ", ".join(f"{k} {v:+.4f}" for k, v in ev["rise"].items())
        )
        if ev.get("results"):
            print("\n".join(removal_rows(ev)))
            print("\nPaired by seed: remove-top's share of the rise minus random's / remove-bottom's")
            print("\n".join(paired_rows(ev)))
        if ev.get("lds"):
            print(f"\nLDS over {ev['lds']['subsets']} subsets of {ev['lds']['subset_fraction']:.0%} of the rows")
            print("\n".join(lds_rows(ev)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
