"""Transforms alone, without quantizing: the float model they produce, block by block, for the
conformance kit and the tests that prove a transform leaves the model's function unchanged."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from llmquant.host.arch import find_blocks
from llmquant.host.calibrate import SequentialCalibrator
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.moe import defused_skeleton, weight_shapes
from llmquant.host.transforms import Transforms, TransformStep

__all__ = ["transformed_state_dict"]


def transformed_state_dict(source: Path, steps: list[TransformStep], samples: Tensor,
                           fake_quantize: Callable[[str, Tensor], Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Run `steps` over the checkpoint folder `source` as a quantizing run would, quantizing nothing.

    Args:
        samples: ``(n, seqlen)`` calibration token ids.
        fake_quantize: what a calibrated transform's search quantizes with, ``(module, W) -> W``.

    Returns:
        (every tensor by checkpoint key in float32, whether the head was untied).
    """
    from transformers import AutoConfig

    checkpoint = Checkpoint(source)
    model_config = AutoConfig.from_pretrained(source)
    skeleton, keys, _ = defused_skeleton(model_config, checkpoint.infos, weight_shapes(checkpoint.infos))
    layout = find_blocks(skeleton)
    transforms = Transforms(steps, fake_quantize, keys)
    text = model_config.get_text_config()
    model_type = json.loads((Path(source) / "config.json").read_text())["model_type"]
    edited = transforms.prepare(skeleton, checkpoint, model_type, int(text.hidden_size))
    state: dict[str, Tensor] = {}
    with tempfile.TemporaryDirectory() as spill:
        calibrator = SequentialCalibrator(skeleton, layout, edited, samples, batch_size=2, dtype=torch.float32, device="cpu",
                                          memory=2**30, spill_dir=Path(spill), keys=keys, transforms=transforms, hessians=False)
        calibrator.capture_inputs()
        for index in range(layout.count):
            prefix = layout.block_name(index)
            targets = {f"{prefix}.{rel}" for rel in layout.linears[index]}
            calibrator.run_block(index, lambda name, stats: edited[f"{keys.disk(name)}.weight"].float(), targets)
            state.update({k: v.float() for k, v in edited.blocks.items()})
            edited.drop_block(keys.disk(prefix) + ".")
    for key in edited:
        if key not in state:
            state[key] = edited[key].float()
    return state, transforms.untied
