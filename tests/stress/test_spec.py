"""The spec: the issue's form in YAML and JSON, cells and pairs, and errors naming the key."""

from __future__ import annotations

import json

import pytest

from generator.stress.spec import PairKind, StressSpec, example_spec_text, load_spec, write_example_spec

ISSUE_YAML = '''prompt: "frontal chest radiograph, {finding}, {age} year old {sex}"
vary:                      # every combination of these values is a cell; all cells share the seeds
  finding: ["no acute findings", "moderate left pleural effusion", "moderate right pleural effusion"]
fixed: {age: 60, sex: woman}
labels:                    # expected class of each value (1 = positive for the model's class 0 score)
  finding: {"no acute findings": 0, "moderate left pleural effusion": 1, "moderate right pleural effusion": 1}
seeds: 32
'''


def test_issue_form_yaml_and_json_agree(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(ISSUE_YAML)
    import yaml

    j = tmp_path / "s.json"
    j.write_text(json.dumps(yaml.safe_load(ISSUE_YAML)))
    a, b = load_spec(y), load_spec(j)
    assert [c.prompt for c in a.cells] == [c.prompt for c in b.cells]
    assert a.seeds == b.seeds == tuple(range(32))
    assert [c.label for c in a.cells] == [0, 1, 1]
    assert a.cells[1].prompt == "frontal chest radiograph, moderate left pleural effusion, 60 year old woman"
    kinds = {(p.from_value, p.to_value): p.kind for p in a.pair_types}
    assert kinds[("no acute findings", "moderate left pleural effusion")] == PairKind.LABEL_CHANGE
    assert kinds[("moderate left pleural effusion", "moderate right pleural effusion")] == PairKind.SAME_LABEL


def test_cells_are_the_product_and_pairs_hold_other_values(effusion_spec):
    spec = StressSpec.from_mapping(effusion_spec)
    assert len(spec.cells) == 6
    assert spec.nuisance_attributes == ["sex"]
    sex = [p for p in spec.pair_types if p.attribute == "sex"]
    assert len(sex) == 1 and sex[0].kind == PairKind.SAME_LABEL
    for f, t in sex[0].members:  # same finding, other sex
        assert spec.cells[f].values["finding"] == spec.cells[t].values["finding"]
        assert spec.cells[f].values["sex"] != spec.cells[t].values["sex"]
    assert len(spec.pair_types) == 4  # 3 finding changes + 1 sex change


def test_example_spec_is_valid_and_commented(tmp_path):
    path = write_example_spec(tmp_path / "ex.yaml")
    spec = load_spec(path)
    assert spec.regions and len(spec.cells) == 6
    assert example_spec_text().count("#") > 10
    with pytest.raises(FileExistsError, match="--init-spec"):
        write_example_spec(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(prompt=d["prompt"] + ", {view}"), r"placeholder \{view\}"),
        (lambda d: d["labels"]["finding"].pop("moderate left pleural effusion"),
         r"labels.finding gives no label for the value 'moderate left pleural effusion'"),
        (lambda d: d.update(seeds=0), "seeds must be >= 1"),
        (lambda d: d.update(seeds=[]), "seeds must be >= 1"),
        (lambda d: d["labels"]["finding"].update({"moderate left pleural efusion": 1}),
         "did you mean 'moderate left pleural effusion'"),
        (lambda d: d["labels"]["finding"].update({"no acute findings": 2}), "must be 0 or 1"),
        (lambda d: d["vary"].update(view=["PA"]), "vary.view is not a placeholder"),
        (lambda d: d.update(sedes=3), "did you mean 'seeds'"),
        (lambda d: d.pop("labels"), "lacks the key 'labels'"),
        (lambda d: d["vary"].update(sex=["woman", "woman"]), "vary.sex lists the value 'woman' twice"),
        (lambda d: d["fixed"].update(sex="man"), "'sex' is in both vary and fixed"),
        (lambda d: d.update(tolerance=1.5), "tolerance must be in"),
        (lambda d: d.update(strength=0), "strength must be in"),
        (lambda d: d.update(regions={"finding": {"no acute findings": "left_lung"}}), "neither a zone"),
    ],
)
def test_bad_specs_name_the_key(effusion_spec, change, message):
    change(effusion_spec)
    with pytest.raises(ValueError, match=message):
        StressSpec.from_mapping(effusion_spec)


def test_bad_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: 'x {a}'\nvary: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML \(line"):
        load_spec(bad)
    with pytest.raises(FileNotFoundError, match="--spec"):
        load_spec(tmp_path / "missing.yaml")
    unknown = tmp_path / "u.yaml"
    unknown.write_text(ISSUE_YAML.replace("{sex}", "{sx}"))
    with pytest.raises(ValueError, match=r"u.yaml: .*\{sx\}"):
        load_spec(unknown)


def test_two_labelled_attributes_make_mixed_pairs():
    spec = StressSpec.from_mapping({
        "prompt": "chest radiograph, {finding}, {device}", "seeds": [5, 9],
        "vary": {"finding": ["no acute findings", "pneumothorax"], "device": ["no drain", "chest drain"]},
        "labels": {"finding": {"no acute findings": 0, "pneumothorax": 1},
                   "device": {"no drain": 0, "chest drain": 1}},
    })
    assert [c.label for c in spec.cells] == [0, 1, 1, 1]
    assert {p.attribute: p.kind for p in spec.pair_types} == {"finding": PairKind.MIXED, "device": PairKind.MIXED}
    assert spec.seeds == (5, 9)
