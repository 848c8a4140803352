"""Model creation and the discriminative (layer-wise) learning rates of its param groups."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
from timm.models import group_parameters

logger = logging.getLogger(__name__)

# Head learning rate divided by these, from the stem to the head. For ResNet50 the coarse
# timm groups are exactly stem (conv1, bn1), layer1, layer2, layer3, layer4 and fc.
DEFAULT_LR_DIVISORS = (10.0, 8.0, 6.0, 4.0, 2.0, 1.0)


class ModelError(ValueError):
    """A model name or weights file that cannot be used, with the reason and the fix."""


def to_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Return the model in the channels_last memory format when ``channels_last``, else unchanged."""
    if channels_last:
        return model.to(memory_format=torch.channels_last)
    return model


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    pretrained_file: str | Path | None = None,
) -> torch.nn.Module:
    """Create a timm model with a new ``num_classes`` head.

    With ``pretrained_file`` the ImageNet weights come from that local safetensors or
    state-dict file (read with ``weights_only=True``) and no network is used. timm drops
    the file's 1000-class head because ``num_classes`` differs.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:5]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ModelError(f"unknown timm model {name!r}.{hint} See timm.list_models() for all names.")

    kwargs: dict = {"num_classes": num_classes}
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise ModelError(f"--pretrained-file {path} not found; pass a .safetensors or .pth state dict")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}

    if pretrained_file is not None and not pretrained:
        raise ModelError(
            f"--no-pretrained and --pretrained-file {pretrained_file} contradict each other; drop one of them"
        )
    use_weights = pretrained or pretrained_file is not None
    try:
        return timm.create_model(name, pretrained=use_weights, **kwargs)
    except RuntimeError as error:
        if pretrained_file is None:
            raise
        raise ModelError(
            f"weights in {pretrained_file} do not fit timm model {name!r}: {_first_line(error)}. "
            "Pass the --model that the file was saved from."
        ) from error
    except OSError as error:
        if pretrained_file is not None:
            raise ModelError(f"cannot read --pretrained-file {pretrained_file}: {error}") from error
        raise ModelError(
            f"downloading the pretrained weights of {name!r} failed: {_first_line(error)}. "
            "Pass --pretrained-file PATH with local weights, or --no-pretrained."
        ) from error


def check_model_options(name: str, pretrained: bool, pretrained_file: str | Path | None) -> None:
    """Raise ModelError for a wrong model name or weights path before any data is read."""
    if not timm.is_model(name):
        create_model(name, num_classes=1, pretrained=False)
    if pretrained_file is not None and not Path(pretrained_file).is_file():
        raise ModelError(f"--pretrained-file {pretrained_file} not found; pass a .safetensors or .pth state dict")
    if pretrained_file is not None and not pretrained:
        raise ModelError(
            f"--no-pretrained and --pretrained-file {pretrained_file} contradict each other; drop one of them"
        )


def spread_divisors(divisors: list[float] | tuple[float, ...], num_groups: int) -> list[float]:
    """Map the divisors onto ``num_groups`` param groups, stem first and head last.

    When the counts match, group i gets divisor i. Otherwise group i sits at position
    i * (len(divisors) - 1) / (num_groups - 1) along the divisor list and takes the
    geometric interpolation of the two divisors around it. The stem therefore always
    gets the first divisor, the head the last, and the rates rise steadily in between.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    if len(divisors) == num_groups:
        return [float(d) for d in divisors]
    if num_groups == 1:
        return [float(divisors[-1])]
    if len(divisors) == 1:
        return [float(divisors[0])] * num_groups

    spread = []
    last = len(divisors) - 1
    for i in range(num_groups):
        position = i * last / (num_groups - 1)
        low = min(int(math.floor(position)), last - 1)
        fraction = position - low
        log_value = (1 - fraction) * math.log(divisors[low]) + fraction * math.log(divisors[low + 1])
        spread.append(math.exp(log_value))
    return spread


def build_param_groups(
    model: torch.nn.Module,
    head_lr: float,
    divisors: list[float] | tuple[float, ...] = DEFAULT_LR_DIVISORS,
) -> list[dict]:
    """Return optimizer param groups from timm's coarse group_matcher, stem to head.

    Each group carries ``lr`` (head_lr / divisor), ``divisor`` and ``name``, a readable
    label such as ``"0:conv1,bn1"``.
    """
    matcher = model.group_matcher(coarse=True)
    grouped_names = group_parameters(model, matcher)
    named = dict(model.named_parameters())

    group_ids = sorted(grouped_names)
    group_divisors = spread_divisors(divisors, len(group_ids))
    param_groups = []
    for position, (group_id, divisor) in enumerate(zip(group_ids, group_divisors)):
        names = grouped_names[group_id]
        params = [named[name] for name in names if named[name].requires_grad]
        if not params:
            continue
        param_groups.append(
            {
                "params": params,
                "lr": head_lr / divisor,
                "divisor": divisor,
                "name": f"{position}:{_group_label(names)}",
            }
        )
    return param_groups


def _group_label(names: list[str]) -> str:
    prefixes = []
    for name in names:
        prefix = name.rsplit(".", 1)[0]
        prefix = prefix.split(".")[0] if not prefix.startswith("blocks") else ".".join(prefix.split(".")[:2])
        if prefix not in prefixes:
            prefixes.append(prefix)
    return ",".join(prefixes[:3]) + (",..." if len(prefixes) > 3 else "")


def _first_line(error: BaseException, limit: int = 300) -> str:
    # load_state_dict puts the useful part (missing and unexpected keys) on the lines after
    # its header, so join lines instead of keeping only the first one.
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
