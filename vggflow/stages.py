"""VGG19's blocks as fine-tuning stages see them: which layers stay frozen, and what caching them costs.

A stage unfreezes the base from one block upwards. The layers below it are still the original
backbone as long as no earlier stage trained them, so their output (the stage's *prefix*) can
be computed once and cached instead of recomputed every epoch.
"""

from __future__ import annotations

from vggflow.config import VGG19_BLOCKS, FinetuneConfig

#: The stage that trains only the new head, on the base's pooled features.
HEAD_STAGE = "head"

#: Output channels of each VGG19 block (its pooling layer's depth).
BLOCK_CHANNELS = {"block1": 64, "block2": 128, "block3": 256, "block4": 512, "block5": 512}


def block_index(unfreeze_from: str) -> int:
    """1-based block number; ``all`` counts as block 1."""
    return 1 if unfreeze_from == "all" else VGG19_BLOCKS.index(unfreeze_from) + 1


def prefix_layer(unfreeze_from: str) -> str:
    """The last frozen layer below a stage (its output is the stage's input)."""
    index = block_index(unfreeze_from)
    return "input_layer" if index == 1 else f"block{index - 1}_pool"


def stage_of_prefix(layer: str) -> str | None:
    """The stage whose input is ``layer`` (``block4_pool`` → ``block5``); None for other layers."""
    if layer == "input_layer":
        return "block1"
    for index in range(1, len(VGG19_BLOCKS)):
        if layer == f"block{index}_pool":
            return f"block{index + 1}"
    return None


def prefix_bytes(unfreeze_from: str, image_size: int, n_images: int) -> int:
    """Size on disk of a stage's cached prefix output (float32)."""
    index = block_index(unfreeze_from)
    if index == 1:
        side, channels = image_size, 3
    else:
        side, channels = image_size // 2 ** (index - 1), BLOCK_CHANNELS[f"block{index - 1}"]
    return 4 * n_images * side * side * channels


def plan_prefix_caches(cfg: FinetuneConfig, image_size: int, n_images: int) -> dict[str, str | None]:
    """For each stage: the prefix layer it trains from (cached), or None to run the full model.

    A prefix cache is valid only while every layer in it is still the original backbone, i.e. no
    earlier stage unfroze anything at or below it. Caches above ``prefix_cache_max_gb`` are not
    used (they are read from disk batch by batch, but disk is finite).
    """
    plan: dict[str, str | None] = {}
    lowest_touched = len(VGG19_BLOCKS) + 1  # no block trained yet
    budget = cfg.prefix_cache_max_gb * 1e9
    for stage in cfg.stages:
        index = block_index(stage.unfreeze_from)
        usable = (
            cfg.cache_frozen_prefix
            and index <= lowest_touched
            and prefix_bytes(stage.unfreeze_from, image_size, n_images) <= budget
        )
        plan[stage.label] = prefix_layer(stage.unfreeze_from) if usable else None
        lowest_touched = min(lowest_touched, index)
    return plan


def prefix_layers(plan: dict[str, str | None]) -> list[str]:
    """The distinct prefix layers a plan caches, sorted."""
    return sorted({layer for layer in plan.values() if layer})
