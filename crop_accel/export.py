"""The trained model as files: ``model.safetensors`` plus ``model.json``.

The pair is enough to rebuild the classifier with plain timm, without crop_accel::

    meta = json.load(open("model.json"))
    model = timm.create_model(meta["architecture"], num_classes=len(meta["class_names"]))
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


@dataclass
class ModelBundle:
    """A loaded trained model with what is needed to run it on new images."""

    model: torch.nn.Module
    architecture: str
    class_names: list[str]
    data_config: dict


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_model(model: torch.nn.Module, directory: Path, architecture: str, class_names: list[str], data_config: dict) -> None:
    """Save weights and metadata; each file is renamed into place only when complete."""
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous() because channels_last tensors are strided and safetensors needs dense ones.
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = directory / f".{WEIGHTS_FILE}.tmp"
    safetensors.torch.save_file(state_dict, str(temporary), metadata={"architecture": architecture})
    os.replace(temporary, directory / WEIGHTS_FILE)

    meta = {
        "architecture": architecture,
        "num_classes": len(class_names),
        "class_names": class_names,
        "data_config": _json_data_config(data_config),
    }
    atomic_write_json(directory / META_FILE, meta)


def load_model(directory: str | Path, expected_classes: list[str] | None = None) -> ModelBundle:
    """Load a model saved by ``save_model``; raise ValueError on any mismatch.

    Only tensors are read (safetensors), so no arbitrary object is unpickled.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{path} not found; --model-dir must be the output dir of a finished training run")

    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    class_names = list(meta["class_names"])
    if expected_classes is not None and expected_classes != class_names:
        raise ValueError(
            f"the model in {directory} was trained on classes {class_names}, "
            f"but the data has classes {expected_classes}; evaluate it on data with the same class folders"
        )

    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=len(class_names))
    state_dict = safetensors.torch.load_file(str(weights_path))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(
            f"weights in {weights_path} do not match architecture {meta['architecture']!r} "
            f"with {len(class_names)} classes: {str(error).splitlines()[0]}"
        ) from error

    data_config = dict(meta["data_config"])
    for key in ("input_size", "mean", "std"):
        data_config[key] = tuple(data_config[key])
    return ModelBundle(model=model, architecture=meta["architecture"], class_names=class_names, data_config=data_config)


def _json_data_config(data_config: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in data_config.items()}
