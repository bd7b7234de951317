import json
from pathlib import Path

import pytest
import yaml

from fedsq import cli, config


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _walk(sub, f"{path}{key}.")


def test_every_key_has_a_default_and_a_description():
    for key, sub in _walk(config.SCHEMA):
        assert "default" in sub, key
        assert sub.get("description"), key


def test_defaults_fill_an_empty_config_and_validate():
    cfg = config.load({})
    assert cfg["split"] == {
        "scheme": "dirichlet", "alpha": 0.5, "num_clients": 10, "seed": 0, "min_size": 2, "classes_per_client": 2,
    }
    assert cfg["bn"] == "pooled"
    assert cfg["eval"]["targets"] == [0.6, 0.7]
    assert cfg["tags"]["lr_mode"] == "equal"


def test_method_options_are_filled_from_their_strategy_and_others_stay_null():
    assert config.load({"method": {"name": "fedprox"}})["method"]["mu"] == 0.01
    fedsq = config.load({"method": {"name": "fedsq"}})["method"]
    assert (fedsq["mu"], fedsq["gate_maxpool"], fedsq["regime_cache"], fedsq["regime_cache_budget"]) == (0.0, False, "auto", 0.25)
    assert fedsq["tau"] is None and fedsq["server_momentum"] is None  # fedadam's and fedavgm's
    assert config.load({"method": {"name": "fedadam"}})["method"]["betas"] == [0.9, 0.99]  # a list, as YAML writes it


def test_the_run_schema_lists_what_the_code_registers():
    import re

    from fedsq import batchnorm, data, models, strategies, weights

    keys = config.SCHEMA["properties"]
    assert keys["method"]["properties"]["name"]["enum"] == list(strategies.METHODS)
    assert keys["bn"]["enum"] == list(batchnorm.POLICIES)
    # Built-ins are an enum beside the pattern of names resolved by their library (or path).
    assert keys["backbone"]["anyOf"][0]["enum"] == list(models.BUILT_IN)
    assert keys["dataset"]["anyOf"][0]["enum"] == list(data.SOURCES)
    # The workflow's weight sources: the named ones and URLs.
    workflow_schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    source = re.compile(workflow_schema["properties"]["backbones"]["additionalProperties"]["properties"]["source"]["pattern"])
    named = {"default", *(name for b in models.BUILT_IN for name in models.backbone(b).sources)}
    assert all(source.match(name) for name in named) and not source.match("bogus")
    assert all(source.match(f"{scheme}host/w.pt") for scheme in weights.URL_SCHEMES)


def test_loads_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dataset": "digits", "split": {"scheme": "iid"}, "rounds": 5}))
    cfg = config.load(path, overrides=["split.num_clients=4", "eval.targets=[0.5]", "tracking.uri=null"])
    assert cfg["split"]["scheme"] == "iid" and cfg["split"]["num_clients"] == 4
    assert cfg["eval"]["targets"] == [0.5] and cfg["tracking"]["uri"] is None and cfg["rounds"] == 5


def test_load_does_not_mutate_its_input():
    raw = {"split": {"scheme": "iid"}}
    config.load(raw)
    assert raw == {"split": {"scheme": "iid"}}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dataset": "mnist"}, "dataset: 'mnist' is not valid (prepared dataset (`fedsq data prepare`) under paths.data: "
                               "digits, cifar100, cinic10, imagefolder:<folder>"),
        ({"backbone": "vgg"}, "backbone: 'vgg' is not valid (network architecture: alexnet, resnet18, efficientnet_lite0"),
        ({"split": {"sheme": "iid"}}, "unknown key split.sheme (allowed: scheme, alpha,"),
        ({"colour": 1}, "unknown key colour (allowed: dataset,"),
        ({"bn": "batch"}, "bn: 'batch' is not one of ['pooled', 'averaged', 'frozen', 'local']"),
        ({"rounds": -1}, "rounds: -1 is less than the minimum of 0"),
        ({"optimizer": {"lr": "auto"}}, "optimizer.lr: 'auto' is not valid (learning rate, or \"calibrated\""),
        ({"optimizer": {"lr": "calibrated"}}, "optimizer.lr: 'calibrated' needs calibration:"),
        ({"clients_per_round": 20}, "clients_per_round: 20 is more than split.num_clients (10)"),
        ({"method": {"name": "fedsgd"}}, "method.name: 'fedsgd' is not one of ['fedavg', 'fedprox', 'fedsq',"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    with pytest.raises(ValueError) as err:
        config.load(raw)
    assert message in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        config.load({}, overrides=["rounds"])


def test_resolve_lr_from_calibration_json(tmp_path):
    assert config.resolve_lr(config.load({"optimizer": {"lr": 0.05}})) == (0.05, "config")
    path = tmp_path / "fedsq.json"
    path.write_text(json.dumps({"lr": 0.03, "mode": "central", "method": "fedsq"}))
    cfg = config.load({"method": {"name": "fedsq"}, "optimizer": {"lr": "calibrated"}, "calibration": str(path)})
    assert cfg["tags"]["lr_mode"] == "calibrated"
    lr, source = config.resolve_lr(cfg)
    assert lr == 0.03 and "central" in source and str(path) in source
    cfg["method"]["name"] = "fedavg"  # another method's pick must not be borrowed silently
    with pytest.raises(ValueError, match="calibrated for method 'fedsq', not 'fedavg'"):
        config.resolve_lr(cfg)


def test_flatten_uses_dotted_keys():
    flat = config.flatten(config.load({}))
    assert flat["split.alpha"] == 0.5 and flat["method.name"] == "fedavg" and flat["eval.targets"] == [0.6, 0.7]
    assert not any(isinstance(v, dict) for v in flat.values())


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) would read these as strings and the lr check would reject them.
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {lr: 1e-3, weight_decay: 5.0E-4}\n")
    cfg = config.load(path, overrides=["method.tau=1e-6"])
    assert cfg["optimizer"]["lr"] == 0.001 and cfg["optimizer"]["weight_decay"] == 0.0005
    assert cfg["method"]["tau"] == 1e-6


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 3\nsplit: {scheme: iid\nseed: 1\n")  # the brace is never closed
    assert cli.main(["run", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fedsq run: error: {path}, line 3, column 5: not valid YAML: ")
    with pytest.raises(ValueError, match=r"^override 'rounds=\[3,', line 1, column 4: not valid YAML: "):
        config.load({}, overrides=["rounds=[3,"])
