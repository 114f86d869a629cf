"""Which object hallucinations a synthetic-benchmark model makes: the bias it was taught, or new ones.

    python experiments/hallucination_kinds.py runs/synthetic_ablation/seed0 sft dpo_sum ddpo_sum_g5

Each model answers the split's images greedily; every hallucinated object mention is sorted into:

  partner        names the frequent partner of a shape in the scene, itself absent: the co-occurrence
                 bias the SFT captions carry (the hallucination the preference data corrects most)
  other-absent   names another shape absent from the scene
  present-shape  names a shape the scene has, for an object of another shape
  extra          one more instance than the scene has objects
  count          a count sentence ("there are two squares") about an absent shape

A model is given by its directory under DIR ("sft", or a run name: DIR/runs/<name>/final).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ddpo.data.synthetic.annotator import ground
from ddpo.data.synthetic.language import parse
from ddpo.lab.settings import DemoSettings, base_config, generation_options
from ddpo.lab.world import split, synthetic_config
from ddpo.models.build import load_model

KINDS = ("partner", "other-absent", "present-shape", "extra", "count")


def kinds(scene, answer: str, partners: dict[str, str]) -> Counter:
    g = ground(scene, parse(answer))
    out: Counter = Counter()
    present = scene.shapes()
    for k, m in enumerate(g.parse.mentions):
        if not g.hallucinated[k]:
            continue
        if not m.is_instance:
            out["count"] += 1
        elif g.referents[k] is None:
            out["extra"] += 1
        elif m.shape_name in present:
            out["present-shape"] += 1
        elif any(partners.get(s) == m.shape_name for s in present):
            out["partner"] += 1
        else:
            out["other-absent"] += 1
    return out


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path)
    parser.add_argument("models", nargs="+", help="sft and/or run names")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    settings = DemoSettings.v1(output_dir=str(args.demo_dir), seed=args.seed)  # the v1 world's analysis
    template = base_config(settings).data.template
    partners = synthetic_config(settings).world.partners
    scenes, images, prompts, _ = split(settings, args.split, args.images)
    print(f"hallucinated object mentions on {len(scenes)} {args.split} images (greedy)\n")
    print("| model | " + " | ".join(KINDS) + " | all |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for name in args.models:
        path = args.demo_dir / "sft" if name == "sft" else args.demo_dir / "runs" / name / "final"
        answers = load_model(path).generate(images, prompts, generation_options(settings, template))
        total: Counter = Counter()
        for scene, answer in zip(scenes, answers):
            total += kinds(scene, answer, partners)
        print(f"| {name} | " + " | ".join(str(total[k]) for k in KINDS) + f" | {sum(total.values())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
