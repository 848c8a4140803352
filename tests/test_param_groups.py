import math

import pytest

from crop_accel.model import ModelError, build_param_groups, check_model_options, create_model, spread_divisors


def test_resnet50_groups_get_exact_learning_rates():
    model = create_model("resnet50", num_classes=11, pretrained=False)
    groups = build_param_groups(model, head_lr=1e-3)
    names = [group["name"] for group in groups]
    lrs = [group["lr"] for group in groups]
    assert names == ["0:conv1,bn1", "1:layer1", "2:layer2", "3:layer3", "4:layer4", "5:fc"]
    assert lrs == pytest.approx([1e-4, 1e-3 / 8, 1e-3 / 6, 1e-3 / 4, 1e-3 / 2, 1e-3])


def test_resnet50_groups_cover_every_parameter_once():
    model = create_model("resnet50", num_classes=11, pretrained=False)
    groups = build_param_groups(model, head_lr=1e-3)
    grouped = [id(param) for group in groups for param in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(param) for param in model.parameters()}


def test_resnet50_head_has_eleven_outputs():
    model = create_model("resnet50", num_classes=11, pretrained=False)
    assert model.fc.out_features == 11


def test_spread_divisors_equal_counts_is_identity():
    assert spread_divisors((10, 8, 6, 4, 2, 1), 6) == [10, 8, 6, 4, 2, 1]


def test_spread_divisors_more_groups_interpolates_geometrically():
    spread = spread_divisors((10, 8, 6, 4, 2, 1), 11)
    assert spread[0] == pytest.approx(10)
    assert spread[-1] == pytest.approx(1)
    # Group 1 sits halfway between divisors 10 and 8.
    assert spread[1] == pytest.approx(math.sqrt(10 * 8))
    assert spread[2] == pytest.approx(8)
    assert all(a > b for a, b in zip(spread, spread[1:]))


def test_spread_divisors_fewer_groups_keeps_ends():
    spread = spread_divisors((10, 8, 6, 4, 2, 1), 3)
    assert spread == pytest.approx([10, math.sqrt(6 * 4), 1])


def test_other_model_gets_stem_to_head_groups():
    model = create_model("mobilenetv3_small_050", num_classes=5, pretrained=False)
    groups = build_param_groups(model, head_lr=1e-2)
    assert len(groups) == 8
    assert groups[0]["lr"] == pytest.approx(1e-3)
    assert groups[-1]["lr"] == pytest.approx(1e-2)
    assert "classifier" in groups[-1]["name"]
    assert all(a["lr"] < b["lr"] for a, b in zip(groups, groups[1:]))


def test_pretrained_file_with_no_pretrained_is_error(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"unused")
    with pytest.raises(ModelError, match="contradict"):
        check_model_options("resnet18", pretrained=False, pretrained_file=weights)


def test_unknown_model_is_error_before_data():
    with pytest.raises(ModelError, match="unknown timm model 'resnet5000'"):
        check_model_options("resnet5000", pretrained=True, pretrained_file=None)
