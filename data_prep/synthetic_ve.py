"""A learnable synthetic SNLI-VE: coloured-shape images with true, false and unverifiable hypotheses.

The premise images are data_prep.synthetic scenes; each image gets `per_label` hypotheses of each
class, phrased with varied templates:
- entailment: a true statement (a colour or a shape that is in the picture);
- contradiction: a false one (a colour or shape that is not);
- neutral: a statement the pixels cannot settle (who drew it, who likes it) about a shape that is
  there.
Telling entailment from contradiction needs the image, so a model beating 2/3 accuracy grounds
the words; neutral is a pure text cue. Deterministic from a seed; splits use disjoint images.

Written layout (root = `out_dir`), as the SNLI-VE release with Flickr30k images:
    images/<id>.jpg                 premises (numeric ids, as Flickr30k's)
    snli_ve_<split>.jsonl           {"Flickr30K_ID", "sentence2", "gold_label", "pairID"} per line
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from data_prep.synthetic import COLORS, SHAPES, _sample_scene, render

# Claims about the pixels: entailment when filled with what is there, contradiction with what is not.
CLAIMS = ("there is something {color} in the picture", "the picture shows a {shape}", "i can see a {color} {shape}")
NEUTRAL = (
    "the {shape} was drawn by {name}",
    "{name} likes the {color} one best",
    "the {color} {shape} was painted on a monday",
)
NAMES = ("anna", "bob", "carla", "dmitri", "eve", "farid")


@dataclass(frozen=True)
class SyntheticVE:
    root: Path
    image_root: Path
    jsonl: dict[str, Path]  # split -> snli_ve_<split>.jsonl
    pairs: dict[str, int]  # split -> number of (image, hypothesis) records


def _hypotheses(scene: tuple, rng: random.Random, per_label: int) -> list[tuple[str, str]]:
    colors = {c for c, *_ in scene}
    shapes = {s for _, s, *_ in scene}
    out: list[tuple[str, str]] = []
    for _ in range(per_label):
        color, shape = rng.choice(sorted(colors)), rng.choice(sorted(shapes))
        true_pair = next((c, s) for c, s, *_ in scene if s == shape)
        out.append((rng.choice(CLAIMS).format(color=true_pair[0], shape=true_pair[1]), "entailment"))
        wrong_color = rng.choice(sorted(set(COLORS) - colors))
        wrong_shape = rng.choice(sorted(set(SHAPES) - shapes))
        out.append((rng.choice(CLAIMS).format(color=wrong_color, shape=wrong_shape), "contradiction"))
        out.append((rng.choice(NEUTRAL).format(color=color, shape=shape, name=rng.choice(NAMES)), "neutral"))
    rng.shuffle(out)
    return out


def write_synthetic_ve(
    out_dir: str | Path, *, splits: dict[str, int], seed: int = 0, image_size: int = 64, per_label: int = 1
) -> SyntheticVE:
    """Generate `splits` ({split: number of images}) under `out_dir`; deterministic in `seed`."""
    root = Path(out_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    next_id = 1000000
    jsonl: dict[str, Path] = {}
    pairs: dict[str, int] = {}
    for split, n in splits.items():
        lines = []
        for _ in range(n):
            image_id = str(next_id)
            next_id += 1
            scene = _sample_scene(rng)
            render(scene, image_size, random.Random(f"{seed}/{image_id}")).save(images / f"{image_id}.jpg", quality=92)
            for k, (hypothesis, label) in enumerate(_hypotheses(scene, rng, per_label)):
                lines.append(
                    {
                        "Flickr30K_ID": image_id,
                        "sentence2": hypothesis,
                        "gold_label": label,
                        "pairID": f"{image_id}r{k}",
                    }
                )
        jsonl[split] = root / f"snli_ve_{split}.jsonl"
        jsonl[split].write_text("".join(json.dumps(line) + "\n" for line in lines))
        pairs[split] = len(lines)
    return SyntheticVE(root, images, jsonl, pairs)
