"""Hallucination noise in SFT captions: systematic biases a model learns, as real MLLMs do.

Each error type fires in a specific *context* with probability p (per opportunity):
  object     co-occurrence: shape A is present and its frequent partner B (WorldConfig.partners) is
             absent -> B is mentioned anyway, by renaming the first other object to B (a replacement;
             default) or, with share `object_insert_share`, by an extra sentence / list item about a B
             at an empty cell (a clause the annotator deletes: it shortens the chosen answer, so it
             confounds hallucination with length; off by default);
  attribute  colour confusion: an object whose colour is a key of `color_confusions` is called the
             mapped colour (pink -> red, purple -> blue);
  position   centre bias: an object in a cell of `position_bias` (the four edge-middle cells) is said
             to be at the centre, unless an object of its shape is there;
  count      over-counting: a count (overview or "there are two ...") of at least `count_min` is said
             one higher;
  relation   direction confusion: "to the left of" <-> "to the right of", "above" <-> "below".

Why these defaults give an SFT model that hallucinates under greedy decoding: an error made with
p < 0.5 in a context is a minority the model learns to out-vote, so greedy decoding would not
reproduce it. With p = 0.6 > 0.5 in a context the model can see, the mode of the caption distribution
*is* the error, so the SFT model makes it every time the context occurs, even greedily (p = 0.5 sits
on the edge; 0.6 is stable). The response-level object hallucination rate of the SFT model is then
about the share of scenes with an object-error context: with the default world (4 partner pairs,
co-occurrence 0.25, 1-4 objects) that is 41% (`expected_errors(..., only("object"))`, 3000 scenes),
inside the 30-60% of the paper's baselines; the captions themselves carry it at ~0.6 x that (25%).
Fewer partner pairs or a higher co-occurrence probability lower it (2 pairs: 14%). `calibrate` instead
sets the probabilities for a target number of errors per answer in a target type mix (e.g. the
paper's, `PAPER_MIX`), for the v1 dense-regime study (experiments/results/dense_regime/v1).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ddpo.data.synthetic.language import (
    CELLS,
    OPPOSITE,
    POSITIONS,
    Group,
    Instance,
    Item,
    LanguageConfig,
    ObjectList,
    Overview,
    Relation,
    plan_description,
    realize,
)
from ddpo.data.synthetic.world import Scene, WorldConfig, sample_scenes

ERROR_TYPES = ("object", "attribute", "position", "count", "relation")
# RLHF-V's correction types (paper: objects 41%, positions 20%, numbers 17%, attributes 10%, other 12%)
PAPER_MIX = {"object": 0.41, "position": 0.20, "count": 0.17, "attribute": 0.10, "relation": 0.12}


@dataclass
class NoiseConfig:
    """Per-type error probabilities (per opportunity, see the module doc) and the biases behind them."""

    object_prob: float = 0.6  # per present shape whose partner is absent: the partner is mentioned
    object_insert_share: float = 0.0  # of object errors, the share that inserts a clause instead of renaming an object
    attribute_prob: float = 0.6  # per object with a confusable colour: the confused colour is said
    color_confusions: dict[str, str] = field(default_factory=lambda: {"pink": "red", "purple": "blue"})  # true -> said
    position_prob: float = 0.6  # per object in a biased cell: the biased cell is said
    position_bias: dict[str, str] = field(
        default_factory=lambda: {p: "center" for p in ("top center", "middle left", "middle right", "bottom center")}
    )
    count_prob: float = 0.6  # per count >= count_min: said one higher
    count_min: int = 2  # smallest count that gets over-counted
    relation_prob: float = 0.6  # per relation sentence with a confusable relation: the confused one is said
    relation_confusions: dict[str, str] = field(
        default_factory=lambda: dict(OPPOSITE)
    )  # left <-> right, above <-> below

    def __post_init__(self) -> None:
        for t in ERROR_TYPES:
            p = getattr(self, f"{t}_prob")
            if not 0 <= p <= 1:
                raise ValueError(f"NoiseConfig.{t}_prob must be in [0, 1], got {p}")
        if not 0 <= self.object_insert_share <= 1:
            raise ValueError(f"NoiseConfig.object_insert_share must be in [0, 1], got {self.object_insert_share}")
        bad = [p for pair in self.position_bias.items() for p in pair if p not in CELLS]
        if bad:
            raise ValueError(f"NoiseConfig.position_bias: unknown positions {bad}; positions are {list(CELLS)}")

    def only(self, error_type: str, prob: float = 1.0) -> NoiseConfig:
        """A copy with one error type at `prob` and every other type off."""
        return dataclasses.replace(self, **{f"{t}_prob": (prob if t == error_type else 0.0) for t in ERROR_TYPES})


@dataclass(frozen=True)
class InjectedError:
    type: str  # one of ERROR_TYPES
    detail: str  # what was said instead of the truth, for reading and debugging


@dataclass
class NoisyCaption:
    text: str
    plan: list[Item]
    errors: list[InjectedError]


def _instances(plan: list[Item]) -> list[Instance]:
    out: list[Instance] = []
    for item in plan:
        out += item.instances if isinstance(item, ObjectList) else [item] if isinstance(item, Instance) else []
    return out


def _insert(plan: list[Item], after: Instance, new: Instance) -> None:
    """Put `new` right after the sentence (or list item) that describes `after`."""
    for k, item in enumerate(plan):
        if isinstance(item, ObjectList) and after in item.instances:
            item.instances.insert(item.instances.index(after) + 1, new)
            return
        if item is after:
            plan.insert(k + 1, new)
            return


def add_noise(
    scene: Scene, plan: list[Item], rng: np.random.Generator, world: WorldConfig, cfg: NoiseConfig
) -> list[InjectedError]:
    """Inject the configured errors into `plan` (in place); returns what was injected.

    Every opportunity draws its random numbers whatever the probabilities, so changing one type's
    probability does not reshuffle the errors of the others.
    """
    errors: list[InjectedError] = []
    instances = _instances(plan)
    touched: set[int] = set()  # ids of instances that already carry an error (one error per phrase)

    present = scene.shapes()
    for a, b in world.partners.items():
        if a not in present or b in present:
            continue
        fire, insert = rng.random() < cfg.object_prob, rng.random() < cfg.object_insert_share
        color, size, pick = str(rng.choice(world.colors)), str(rng.choice(world.sizes)), rng.random()
        if not fire:
            continue
        if insert:
            empty = [c for c in POSITIONS if scene.at(c) is None]
            anchor = next((i for i in reversed(instances) if i.shape == a), instances[-1])
            if empty:
                new = Instance(size, color, b, empty[int(pick * len(empty))])
                _insert(plan, anchor, new)
                touched.add(id(new))
                errors.append(InjectedError("object", f"inserted a {b} at the {POSITIONS[new.cell]}"))
        else:
            victim = next((i for i in instances if i.shape not in (a, b) and id(i) not in touched), None)
            if victim is not None:
                errors.append(
                    InjectedError("object", f"called the {victim.shape} at the {POSITIONS[victim.cell]} a {b}")
                )
                victim.shape = b
                touched.add(id(victim))

    for inst in instances:
        u_color, u_position = rng.random(), rng.random()
        if id(inst) in touched:
            continue
        said = cfg.color_confusions.get(inst.color)
        if said and u_color < cfg.attribute_prob:
            errors.append(InjectedError("attribute", f"called a {inst.color} {inst.shape} {said}"))
            inst.color = said
            touched.add(id(inst))
            continue
        biased = cfg.position_bias.get(POSITIONS[inst.cell])
        other = scene.at(CELLS[biased]) if biased else None
        if biased and (other is None or other.shape != inst.shape) and u_position < cfg.position_prob:
            errors.append(
                InjectedError("position", f"put the {inst.shape} at the {POSITIONS[inst.cell]} at the {biased}")
            )
            inst.cell = CELLS[biased]
            touched.add(id(inst))

    for item in plan:
        u = rng.random()
        if isinstance(item, (Overview, Group)):
            n = item.total if isinstance(item, Overview) else item.count
            if n >= cfg.count_min and n + 1 < 10 and u < cfg.count_prob:
                errors.append(InjectedError("count", f"counted {n} as {n + 1}"))
                if isinstance(item, Overview):
                    item.total += 1
                else:
                    item.count += 1
        elif isinstance(item, Relation):
            said = cfg.relation_confusions.get(item.relation)
            if said and u < cfg.relation_prob:
                errors.append(InjectedError("relation", f"said '{said}' for '{item.relation}'"))
                item.relation = said
    return errors


def noisy_caption(
    scene: Scene, rng: np.random.Generator, world: WorldConfig, language: LanguageConfig, cfg: NoiseConfig
) -> NoisyCaption:
    """A description of `scene` with the configured biases (deterministic given the rng state)."""
    plan = plan_description(scene, rng, language)
    errors = add_noise(scene, plan, rng, world, cfg)
    return NoisyCaption(realize(plan), plan, errors)


def expected_errors(
    world: WorldConfig, language: LanguageConfig, cfg: NoiseConfig, n: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Measured on `n` scenes: mean injected errors per caption by type, their sum (`total`) and the
    share of captions with at least one object error (`object_captions`)."""
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    with_object = 0
    for scene in sample_scenes(n, seed, world):
        errors = noisy_caption(scene, rng, world, language, cfg).errors
        counts.update(e.type for e in errors)
        with_object += any(e.type == "object" for e in errors)
    out = {t: counts[t] / n for t in ERROR_TYPES}
    out["total"] = sum(counts.values()) / n
    out["object_captions"] = with_object / n
    return out


def calibrate(
    errors_per_answer: float,
    mix: dict[str, float],
    world: WorldConfig,
    language: LanguageConfig,
    base: NoiseConfig | None = None,
    n: int = 1000,
    seed: int = 0,
    strict: bool = True,
) -> NoiseConfig:
    """Probabilities for `errors_per_answer` expected errors per caption split by `mix` (shares that
    sum to 1, e.g. PAPER_MIX). Opportunities are measured on `n` scenes; a type whose share needs more
    than one error per opportunity is capped at probability 1. strict: raise (naming the type) if it
    is short by more than 10%. Not strict: its shortfall is spread over the other types in proportion
    to their shares (short answers hold no counts or relations, so their mix is the paper's over the
    types they have); raises only if the world offers fewer opportunities than errors in total."""
    base = base or NoiseConfig()
    if abs(sum(mix.values()) - 1) > 1e-6 or set(mix) - set(ERROR_TYPES):
        raise ValueError(f"calibrate: mix must give shares of {ERROR_TYPES} summing to 1, got {mix}")
    have = {
        t: expected_errors(world, language, base.only(t, 1.0), n, seed)[t] for t in ERROR_TYPES
    }  # opportunities per caption
    want = {t: errors_per_answer * mix.get(t, 0.0) for t in ERROR_TYPES}
    if strict:
        for t in ERROR_TYPES:
            if want[t] > 1.1 * have[t]:
                raise ValueError(
                    f"calibrate: {want[t]:.2f} '{t}' errors per answer wanted but the world offers only "
                    f"{have[t]:.2f} opportunities; lower errors_per_answer, the '{t}' share, or enlarge the world "
                    f"(more objects, longer answers)"
                )
    else:
        if errors_per_answer > 1.1 * sum(have.values()):
            raise ValueError(
                f"calibrate: {errors_per_answer:.2f} errors per answer wanted but the world offers only "
                f"{sum(have.values()):.2f} opportunities in all; lower errors_per_answer or enlarge the world"
            )
        capped: set[str] = set()
        while True:  # cap the types that run out and hand their excess to the others, until none runs out
            over = [t for t in ERROR_TYPES if t not in capped and want[t] > have[t]]
            if not over:
                break
            excess = sum(want[t] - have[t] for t in over)
            for t in over:
                want[t] = have[t]
                capped.add(t)
            open_share = sum(mix.get(t, 0.0) for t in ERROR_TYPES if t not in capped)
            if open_share == 0:
                break
            for t in ERROR_TYPES:
                if t not in capped:
                    want[t] += excess * mix.get(t, 0.0) / open_share
    probs = {f"{t}_prob": min(1.0, want[t] / have[t]) if have[t] else 0.0 for t in ERROR_TYPES}
    return dataclasses.replace(base, **probs)
