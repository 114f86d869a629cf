"""Which part of the CHiP recipe undoes its preference term on the v2 lab? (seed 0, validation only)

    python experiments/chip_parts.py      # after `python experiments/methods.py lr-grid` made runs/methods/seed0

Trains the chip recipe (configs/methods/chip.yaml) at lr 3e-6 three ways from seed 0's SFT model on its
pairs (ddpo/lab/recipes.py `chip_part_runs`): without TDPO's KL, without the cross-modal (conditional)
term, and with the KL alone (gamma 1, no conditional term); prints validation mention-level
hallucination, recall and drift per run.
"""

import json
from pathlib import Path

from ddpo.lab.recipes import chip_part_runs
from ddpo.lab.settings import DemoSettings
from ddpo.lab.stages import run

SOURCE = Path("runs/methods/seed0")  # the methods comparison's seed 0: SFT model and pairs with severity
OUT = Path("runs/chip_parts/seed0")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "gate.json", "pairs"):  # read only: linked, not copied
        if not (OUT / name).exists():
            (OUT / name).symlink_to((SOURCE / name).resolve())
    settings = DemoSettings(output_dir=str(OUT), seed=0, methods=chip_part_runs(3e-6), validation_only=True)
    run(settings)
    results = json.loads((OUT / "results.json").read_text())
    for name, m in results["validation"].items():
        print(
            f"{name}: mention hallucination {m['mention_hallucination_rate']:.3f}, recall {m['object_recall']:.3f}, "
            f"drift {results['drift'][name]:+.4f}"
        )


if __name__ == "__main__":
    main()
