"""Training of the demo detector on the synthetic demo data (rule `train_demo`).

Images go through the same letterbox as inference; the detector is trained on exactly the network
input it later sees, with horizontal flips of the image content as the only augmentation.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from trtflow.artifacts import atomic_write
from trtflow.common.images import read_image
from trtflow.common.metrics import category_labels
from trtflow.common.model import build_detector, run_detector
from trtflow.common.preprocess import letterbox_geometry, resize_with_ratio


def load_training_set(coco_json: str | Path, input_hw: tuple[int, int], pad_value: int = 0):
    """Letterboxed uint8 canvases (N, H, W, 3) BGR, content widths, and per-image targets in input pixels."""
    coco = json.loads(Path(coco_json).read_text())
    labels = category_labels(coco)
    annotations: dict[int, list] = {}
    for annotation in coco["annotations"]:
        annotations.setdefault(annotation["image_id"], []).append(annotation)
    canvases, widths, targets = [], [], []
    for image in coco["images"]:
        canvas, letterbox = resize_with_ratio(read_image(image["file_name"]), input_hw, pad_value)
        _, (_, content_width) = letterbox_geometry(letterbox.original_hw, input_hw)
        boxes = np.array([a["bbox"] for a in annotations.get(image["id"], [])], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        canvases.append(canvas)
        widths.append(content_width)
        targets.append(
            {
                "boxes": torch.from_numpy(boxes * letterbox.ratio),
                "labels": torch.tensor(
                    [labels[a["category_id"]] for a in annotations.get(image["id"], [])], dtype=torch.int64
                ),
            }
        )
    return torch.from_numpy(np.stack(canvases)), widths, targets


def flip_content(canvas: torch.Tensor, target: dict, width: int) -> tuple[torch.Tensor, dict]:
    """Mirror the image content (not the padding) left-right, with its boxes."""
    flipped = canvas.clone()
    flipped[:, :width] = canvas[:, :width].flip(1)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return flipped, {"boxes": boxes, "labels": target["labels"]}


def to_network_input(canvases: torch.Tensor, preprocess_cfg: dict) -> torch.Tensor:
    """uint8 (B, H, W, 3) BGR canvases -> normalised float (B, 3, H, W), as trtflow.common.preprocess.normalize does."""
    pixels = canvases.flip(-1) if preprocess_cfg["color"] == "rgb" else canvases
    mean = torch.tensor(preprocess_cfg["mean"], device=canvases.device)
    std = torch.tensor(preprocess_cfg["std"], device=canvases.device)
    return ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous()


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (0.001 + 0.999 * step / warmup)
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_demo(
    train_json,
    out_path,
    model_cfg: dict,
    preprocess_cfg: dict,
    *,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 0.02,
    seed: int = 0,
    device: str | None = None,
    log=print,
) -> Path:
    """Train the demo detector and save its state_dict (safetensors) to `out_path`."""
    from safetensors.torch import save_file

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    input_hw = (model_cfg["input"]["height"], model_cfg["input"]["width"])
    canvases, widths, targets = load_training_set(train_json, input_hw, preprocess_cfg.get("pad_value", 0))
    canvases = canvases.to(device)
    model = build_detector(model_cfg).to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(targets) // batch_size
    total = epochs * steps_per_epoch
    step, started = 0, time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        flips = torch.rand(len(targets), generator=generator) < 0.5
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            batch, batch_targets = [], []
            for index in order[first : first + batch_size].tolist():
                canvas, target = canvases[index], targets[index]
                if flips[index]:
                    canvas, target = flip_content(canvas, target, widths[index])
                batch.append(canvas)
                batch_targets.append({k: v.to(device) for k, v in target.items()})
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, lr, warmup=min(300, total // 10))
            losses = run_detector(model, to_network_input(torch.stack(batch), preprocess_cfg), batch_targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 10.0)
            optimizer.step()
            step += 1
        log(
            f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} "
            + " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            + f" ({time.time() - started:.0f} s)"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"arch": model_cfg["arch"], "num_classes": str(model_cfg["num_classes"])}
    atomic_write(out_path, lambda staging: save_file(state, str(staging), metadata=header))
    return Path(out_path)
