"""Which val images the reference and verify run on, in which shards, and what a subset can claim.

`verify.num_images` (default: all) chooses a seeded subset of the val split (`verify.seed`), once, here: the
reference and every precision's verify call `val_subset` with the same config and get the same images, in the val
split's order. `verify.shard_images` splits them into shards (separate Snakemake jobs) of that many images; a
shard's images are a run of consecutive images and its size a multiple of the batch sizes (the config check), so
each shard batches its images exactly as one job over all of them would, and the gathered verdict is the same, byte
for byte, whatever the shard size.

A verdict on a subset says so (`subset`: {"images", "of", "seed"}) and states intervals (`intervals`, 95 %): match
recall by Wilson's score interval over the reference detections, the mAP drop by a bootstrap over images (the
per-image COCO evaluation resampled, `trtflow.common.metrics.weighted_map`; no executor runs again). A verdict on
all images holds neither block.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtflow.artifacts import write_json
from trtflow.common.metrics import per_image_evaluation, weighted_map

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class ValSubset:
    """The val images verification runs on (val.json's entries, in its order), of how many, chosen with which seed."""

    images: list[dict]
    of: int
    seed: int

    @property
    def is_subset(self) -> bool:
        return len(self.images) < self.of

    def block(self) -> dict:
        """The verdict's `subset` block: {"images": n, "of": N, "seed": s}."""
        return {"images": len(self.images), "of": self.of, "seed": self.seed}

    def coco(self, coco: Mapping) -> dict:
        """`coco` (the val split) reduced to these images and their annotations: the ground truth mAP is scored on."""
        if not self.is_subset:
            return dict(coco)
        ids = {image["id"] for image in self.images}
        return {
            **coco,
            "images": self.images,
            "annotations": [entry for entry in coco.get("annotations", []) if entry["image_id"] in ids],
        }

    def shard_count(self, shard_images: int | None) -> int:
        return 1 if shard_images is None else max(1, math.ceil(len(self.images) / shard_images))

    def shard(self, shard_images: int | None, index: int) -> list[dict]:
        """The `index`-th run of `shard_images` consecutive images (None: all of them, the one shard)."""
        if not 0 <= index < self.shard_count(shard_images):
            raise ValueError(
                f"shard {index} does not exist: {len(self.images)} images in shards of verify.shard_images: "
                f"{shard_images} make {self.shard_count(shard_images)}"
            )
        return self.images if shard_images is None else self.images[index * shard_images : (index + 1) * shard_images]


class ShardError(ValueError):
    """Gathered shards that are not the chosen images in order: one missing, repeated or of other images."""


def check_shards(shard_images: list[list[int]], subset: ValSubset, sources: list[str]) -> None:
    """Refuse shards (the image ids of each, in gather order; `sources` names their files) that do not cover the
    `subset`'s images exactly and in order."""
    expected, first = [image["id"] for image in subset.images], 0
    for ids, source in zip(shard_images, sources, strict=True):
        if not ids or ids != expected[first : first + len(ids)]:
            raise ShardError(
                f"{source} holds images {ids[:3]}... where the gather expects image {first} on of the "
                f"{len(expected)} chosen ({expected[first : first + 3]}...): a shard is missing or out of order; rerun "
                "the shards (snakemake --forcerun reference_shard verify_shard)"
            )
        first += len(ids)
    if first != len(expected):
        raise ShardError(
            f"the shards {sources} hold {first} of the {len(expected)} images verification runs on: a shard is "
            "missing; rerun the shards (snakemake --forcerun reference_shard verify_shard)"
        )


def val_subset(coco: Mapping, settings: Mapping, key: str = "verify.num_images") -> ValSubset:
    """The images of `coco` (the val split) that verification runs on: `settings["num_images"]` of them chosen
    with `settings["seed"]` (config `verify:`, or another stage's, whose num_images is `key`), all where it is None.
    More than the split holds: all, and one warning line."""
    images, wanted, seed = coco["images"], settings.get("num_images"), settings.get("seed", 0)
    if wanted is None or wanted >= len(images):
        if wanted is not None and wanted > len(images):
            log.warning(
                "%s: %d but the val split has %d images: all %d are used",
                key,
                wanted,
                len(images),
                len(images),
            )
        return ValSubset(list(images), len(images), seed)
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), size=wanted, replace=False))
    return ValSubset([images[i] for i in chosen], len(images), seed)


def images_of_shard(coco: Mapping, settings: Mapping | None, shard: int) -> list[dict]:
    """The val images of shard `shard` of those verification runs on (`settings`: config `verify:`; None: all of
    them, one shard): what rules reference_shard and verify_shard run on."""
    settings = settings or {}
    return val_subset(coco, settings).shard(settings.get("shard_images"), shard)


def write_shard_plan(val_json: str | Path, settings: Mapping, out_json: str | Path) -> dict:
    """Checkpoint `verify_shards`: how many shards of `settings["shard_images"]` images the chosen val images make
    (config `verify:`), for the workflow to make one reference and one verify job of each."""
    subset = val_subset(json.loads(Path(val_json).read_text()), settings)
    plan = {
        **subset.block(),
        "shard_images": settings["shard_images"],
        "shards": subset.shard_count(settings["shard_images"]),
    }
    write_json(out_json, plan)
    return plan


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> list[float]:
    """Wilson's score interval of a binomial proportion (95 % by default); [0, 1] where there are no trials."""
    if trials == 0:
        return [0.0, 1.0]
    share = successes / trials
    centre = share + z * z / (2 * trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return [max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)]


def map_drop_interval(
    ground_truth: Mapping,
    reference: list[dict],
    deployed: list[dict],
    *,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> list[float]:
    """Percentile bootstrap interval (95 %) of the mAP drop in points, 100 x (reference mAP - deployed mAP), over
    the images of `ground_truth`: each resample draws its images with replacement (seeded), both result sets are
    scored on it from their per-image evaluations."""
    evaluations = [per_image_evaluation(ground_truth, results) for results in (reference, deployed)]
    count = len(evaluations[0].image_ids)
    weights = np.random.default_rng(seed).multinomial(count, np.full(count, 1 / count), size=resamples)
    drops = [100.0 * (weighted_map(evaluations[0], w) - weighted_map(evaluations[1], w)) for w in weights]
    low, high = np.percentile(drops, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return [float(low), float(high)]


def subset_claims(
    subset: ValSubset, ground_truth: Mapping, reference: list[dict], deployed: list[dict], matching
) -> dict:
    """What a verdict on a subset adds: the `subset` block and the `intervals` of match recall and mAP drop; nothing
    for all images. `matching`: the deployed detections matched to the reference's (trtflow.run.matching.Matching)."""
    if not subset.is_subset:
        return {}
    intervals = {
        "confidence": CONFIDENCE,
        "match_recall": {"method": "wilson", "interval": wilson_interval(len(matching.pairs), matching.reference)},
    }
    if ground_truth.get("annotations"):  # an images-only split measures no mAP
        intervals["map_drop_points"] = {
            "method": "bootstrap over images",
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": subset.seed,
            "interval": map_drop_interval(ground_truth, reference, deployed, seed=subset.seed),
        }
    return {"subset": subset.block(), "intervals": intervals}
