"""The stress-test spec: what to vary, what to keep, what the user's model should answer.

A spec is a YAML or JSON file (issue 11)::

    prompt: "frontal chest radiograph, {finding}, {age} year old {sex}"
    vary:
      finding: ["no acute findings", "moderate left pleural effusion", "moderate right pleural effusion"]
    fixed: {age: 60, sex: woman}
    labels:
      finding: {"no acute findings": 0, "moderate left pleural effusion": 1, "moderate right pleural effusion": 1}
    seeds: 32

- Every combination of the ``vary`` values is a *cell*; all cells share the seeds, so the images made
  with one seed (a *set*) differ only in the varied attributes.
- ``labels`` give the expected class of each value of an attribute (1 = positive for the model's
  score of class ``class_index``). A cell is positive when any of its labelled values is positive.
  A varied attribute with labels is a *target*; one without labels is a *nuisance*: changing it should
  not change the model's answer.
- Optional keys: ``base_seed`` (seeds are ``base_seed .. base_seed + seeds - 1``; or give ``seeds`` as
  a list), ``threshold`` (the model's decision threshold on its score, default 0.5), ``class_index``
  (which score is the positive class, default 0), ``tolerance`` (smallest effect worth flagging,
  default 0.1), ``strength`` (SDEdit strength for ``--images``, default 0.6), ``regions`` (where each
  value should change the image: ``phantom`` or a mapping ``attribute -> value -> zone | mask PNG``,
  see :mod:`generator.stress.regions`).

:class:`StressSpec` is valid once constructed: every error names the spec key and the value.
"""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

from generator._utils import did_you_mean
from generator.manifest import atomic_write_text

__all__ = ["StressSpec", "Cell", "PairKind", "PairType", "load_spec", "example_spec_text", "write_example_spec"]

Scalar = str | int | float

_REQUIRED = ("prompt", "vary", "labels", "seeds")
_OPTIONAL = ("fixed", "base_seed", "threshold", "class_index", "tolerance", "strength", "regions")
#: Most seeds a spec may ask for (a guard against a typo such as 32000 for 32).
MAX_SEEDS = 100_000


class PairKind(str, Enum):
    """What a change of one attribute's value should do to the model's answer."""

    #: The expected class stays (a nuisance change, or left -> right effusion): the answer must stay.
    SAME_LABEL = "same_label"
    #: The expected class changes (no finding -> effusion): the answer must change.
    LABEL_CHANGE = "label_change"
    #: Depends on the other attributes (two labelled attributes): judged per pair of images.
    MIXED = "mixed"


@dataclass(frozen=True)
class Cell:
    """One combination of the varied values.

    Attributes:
        index: Position in :attr:`StressSpec.cells` (row-major over ``vary`` in file order).
        values: Varied attribute -> its value in this cell.
        label: Expected class (0 or 1).
        prompt: The prompt with all placeholders filled.
    """

    index: int
    values: dict[str, Scalar]
    label: int
    prompt: str

    def key(self, without: str | None = None) -> tuple[tuple[str, str], ...]:
        """The cell's values as a hashable key, leaving out attribute ``without``."""
        return tuple((a, str(v)) for a, v in self.values.items() if a != without)


@dataclass(frozen=True)
class PairType:
    """A change of one varied attribute from one value to another (one ``pairs`` entry of the report).

    Attributes:
        attribute: The varied attribute.
        from_value: Its value before the change.
        to_value: Its value after the change.
        kind: :class:`PairKind` (does the expected class change?).
        members: ``(from cell index, to cell index)`` for every combination of the other varied values.
    """

    attribute: str
    from_value: Scalar
    to_value: Scalar
    kind: PairKind
    members: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        """``"finding: no acute findings -> moderate left pleural effusion"``."""
        return f"{self.attribute}: {self.from_value} -> {self.to_value}"


def _scalar(value: Any, key: str) -> Scalar:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{key} must be a string or a number, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{key} must not be empty, got {value!r}")
    return value


def _int(value: Any, key: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value!r}")
    return int(value)


def _float(value: Any, key: str, low: float, high: float, *, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    v = float(value)
    if not (low <= v < high if open_high else low <= v <= high):
        bracket = ")" if open_high else "]"
        raise ValueError(f"{key} must be in [{low}, {high}{bracket}, got {value!r}")
    return v


def _placeholders(prompt: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        raise ValueError(f"prompt is not a valid template ({exc}): {prompt!r}") from None
    names: list[str] = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"prompt placeholders must be names such as {{finding}}, got {{{name}}} in {prompt!r}")
        if spec or conv:
            raise ValueError(f"prompt placeholder {{{name}}} must not carry a format or conversion in {prompt!r}")
        if name not in names:
            names.append(name)
    return names


@dataclass(frozen=True)
class StressSpec:
    """A validated stress-test spec (see the module docstring for the file form).

    Args:
        prompt: Template with ``{placeholders}`` naming the keys of ``vary`` and ``fixed``.
        vary: Attribute -> the values it takes (at least one attribute, each with >= 1 distinct values).
        labels: Attribute (of ``vary`` or ``fixed``) -> value -> expected class 0/1.
        seeds: Seeds shared by every cell (distinct), or their number N (seeds ``0 .. N - 1``).
        fixed: Attribute -> the one value it keeps.
        threshold: The model's decision threshold on its positive-class score.
        class_index: Which of the model's scores is the positive class.
        tolerance: Smallest effect worth flagging (flip rate, sensitivity gap), in ``[0, 1)``.
        strength: SDEdit strength for real-image edits, in ``(0, 1]``.
        regions: ``None``, ``"phantom"`` or attribute -> value -> zone name or mask file.
        source: The file the spec was read from (for messages and relative mask paths), if any.

    Raises:
        ValueError: any invalid entry, naming the spec key and the value.
    """

    prompt: str
    vary: dict[str, list[Scalar]]
    labels: dict[str, dict[str, int]]
    seeds: tuple[int, ...] | int
    fixed: dict[str, Scalar] = field(default_factory=dict)
    threshold: float = 0.5
    class_index: int = 0
    tolerance: float = 0.1
    strength: float = 0.6
    regions: str | dict[str, dict[str, str]] | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        names = _placeholders(self.prompt)
        if not isinstance(self.vary, Mapping) or not self.vary:
            raise ValueError(f"vary must map at least one attribute to its values, got {self.vary!r}")
        if not isinstance(self.fixed, Mapping):
            raise ValueError(f"fixed must map attributes to values, got {self.fixed!r}")
        vary: dict[str, list[Scalar]] = {}
        for attr, values in self.vary.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"vary.{attr} must be a non-empty list of values, got {values!r}")
            vals = [_scalar(v, f"vary.{attr}[{i}]") for i, v in enumerate(values)]
            seen: set[str] = set()
            for v in vals:
                if str(v) in seen:
                    raise ValueError(f"vary.{attr} lists the value {v!r} twice")
                seen.add(str(v))
            vary[str(attr)] = vals
        fixed = {str(a): _scalar(v, f"fixed.{a}") for a, v in self.fixed.items()}
        both = sorted(set(vary) & set(fixed))
        if both:
            raise ValueError(f"attribute {both[0]!r} is in both vary and fixed; keep it in one of them")
        known = [*vary, *fixed]
        for name in names:
            if name not in known:
                raise ValueError(
                    f"prompt has the placeholder {{{name}}} that is neither in vary nor in fixed"
                    f"{did_you_mean(name, known)}"
                )
        for attr in known:
            if attr not in names:
                where = "vary" if attr in vary else "fixed"
                raise ValueError(
                    f"{where}.{attr} is not a placeholder of prompt {self.prompt!r}"
                    f"{did_you_mean(attr, names)}: add {{{attr}}} to the prompt or remove it"
                )
        object.__setattr__(self, "vary", vary)
        object.__setattr__(self, "fixed", fixed)
        object.__setattr__(self, "labels", self._check_labels(vary, fixed))
        object.__setattr__(self, "seeds", self._check_seeds(self.seeds))
        object.__setattr__(self, "threshold", _float(self.threshold, "threshold", -1e12, 1e12))
        object.__setattr__(self, "class_index", _int(self.class_index, "class_index", 0))
        object.__setattr__(self, "tolerance", _float(self.tolerance, "tolerance", 0.0, 1.0, open_high=True))
        strength = _float(self.strength, "strength", 0.0, 1.0)
        if strength == 0.0:
            raise ValueError("strength must be in (0, 1] (0 would return the image unchanged), got 0")
        object.__setattr__(self, "strength", strength)
        object.__setattr__(self, "regions", self._check_regions(self.regions, vary, fixed))

    # ------------------------------------------------------------------------------ validation
    def _check_labels(self, vary: dict[str, list[Scalar]], fixed: dict[str, Scalar]) -> dict[str, dict[str, int]]:
        if not isinstance(self.labels, Mapping) or not self.labels:
            raise ValueError(
                f"labels must give the expected class of each value of at least one attribute, got {self.labels!r}"
            )
        out: dict[str, dict[str, int]] = {}
        attrs = [*vary, *fixed]
        for attr, table in self.labels.items():
            attr = str(attr)
            if attr not in attrs:
                raise ValueError(f"labels.{attr} names no attribute of vary or fixed{did_you_mean(attr, attrs)}")
            if not isinstance(table, Mapping):
                raise ValueError(f"labels.{attr} must map each value to 0 or 1, got {table!r}")
            values = [str(v) for v in vary[attr]] if attr in vary else [str(fixed[attr])]
            clean: dict[str, int] = {}
            for value, label in table.items():
                value = str(value)
                if value not in values:
                    raise ValueError(
                        f"labels.{attr} has a label for {value!r}, which is not a value of {attr}"
                        f"{did_you_mean(value, values)}"
                    )
                if isinstance(label, bool) or label not in (0, 1):
                    raise ValueError(f"labels.{attr}.{value} must be 0 or 1, got {label!r}")
                clean[value] = int(label)
            for value in values:
                if value not in clean:
                    raise ValueError(f"labels.{attr} gives no label for the value {value!r}: add it (0 or 1)")
            out[attr] = clean
        return out

    @staticmethod
    def _check_seeds(seeds: Any) -> tuple[int, ...]:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1: every cell needs at least one seed, got {seeds}")
            if seeds > MAX_SEEDS:
                raise ValueError(f"seeds must be at most {MAX_SEEDS}, got {seeds}")
            return tuple(range(seeds))
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
            raise ValueError(f"seeds must be a number of seeds (>= 1) or a list of seeds, got {seeds!r}")
        out = tuple(_int(s, f"seeds[{i}]", 0) for i, s in enumerate(seeds))
        if not out:
            raise ValueError("seeds must be >= 1: every cell needs at least one seed, got 0 seeds")
        if len(set(out)) != len(out):
            raise ValueError("seeds must be distinct; a seed is listed twice")
        if len(out) > MAX_SEEDS:
            raise ValueError(f"seeds must be at most {MAX_SEEDS}, got {len(out)}")
        return out

    def _check_regions(self, regions: Any, vary: dict[str, list[Scalar]], fixed: dict[str, Scalar]) -> Any:
        from generator.stress.regions import check_region_entry

        if regions is None or regions == "phantom":
            return regions
        if isinstance(regions, str) or not isinstance(regions, Mapping):
            raise ValueError(f"regions must be 'phantom' or map attribute -> value -> zone or mask file, got {regions!r}")
        out: dict[str, dict[str, str]] = {}
        for attr, table in regions.items():
            attr = str(attr)
            if attr not in vary:
                raise ValueError(f"regions.{attr} names no attribute of vary{did_you_mean(attr, list(vary))}")
            if not isinstance(table, Mapping):
                raise ValueError(f"regions.{attr} must map values to a zone or mask file, got {table!r}")
            values = [str(v) for v in vary[attr]]
            out[attr] = {}
            for value, entry in table.items():
                value = str(value)
                if value not in values:
                    raise ValueError(f"regions.{attr} names {value!r}, not a value of {attr}{did_you_mean(value, values)}")
                out[attr][value] = check_region_entry(entry, f"regions.{attr}.{value}", self.source)
        return out

    # ------------------------------------------------------------------------------ derived
    @property
    def nuisance_attributes(self) -> list[str]:
        """Varied attributes without labels (changing them should not change the answer)."""
        return [a for a in self.vary if a not in self.labels]

    def label_of(self, values: Mapping[str, Scalar]) -> int:
        """Expected class of a cell: 1 when any labelled attribute's value is labelled 1."""
        full = {**self.fixed, **values}
        return int(any(table[str(full[a])] for a, table in self.labels.items()))

    def fill(self, values: Mapping[str, Scalar]) -> str:
        """The prompt with ``values`` (varied) and the fixed values filled in."""
        return self.prompt.format(**{**self.fixed, **values})

    @property
    def cells(self) -> list[Cell]:
        """Every combination of the varied values, row-major in file order."""
        attrs = list(self.vary)
        out = []
        for i, combo in enumerate(itertools.product(*(self.vary[a] for a in attrs))):
            values = dict(zip(attrs, combo))
            out.append(Cell(index=i, values=values, label=self.label_of(values), prompt=self.fill(values)))
        return out

    @property
    def pair_types(self) -> list[PairType]:
        """One :class:`PairType` per attribute and ordered pair of its values (earlier -> later in the list)."""
        cells = self.cells
        out = []
        for attr, values in self.vary.items():
            for i, j in itertools.combinations(range(len(values)), 2):
                a, b = values[i], values[j]
                members = []
                for ca in cells:
                    if str(ca.values[attr]) != str(a):
                        continue
                    for cb in cells:
                        if str(cb.values[attr]) == str(b) and cb.key(attr) == ca.key(attr):
                            members.append((ca.index, cb.index))
                same = {cells[f].label == cells[t].label for f, t in members}
                kind = (PairKind.MIXED if len(same) > 1
                        else PairKind.SAME_LABEL if same == {True} else PairKind.LABEL_CHANGE)
                out.append(PairType(attribute=attr, from_value=a, to_value=b, kind=kind, members=tuple(members)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON data (as written in ``report.json``)."""
        return {
            "prompt": self.prompt, "vary": self.vary, "fixed": self.fixed, "labels": self.labels,
            "seeds": list(self.seeds), "threshold": self.threshold, "class_index": self.class_index,
            "tolerance": self.tolerance, "strength": self.strength, "regions": self.regions,
        }

    @classmethod
    def from_mapping(cls, data: Any, source: str | Path | None = None) -> "StressSpec":
        """Build a spec from parsed YAML/JSON.

        Raises:
            ValueError: not a mapping, a missing or unknown key (with "did you mean"), or an invalid value.
        """
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise ValueError(f"a stress-test spec must be a mapping of keys{where}, got {type(data).__name__}")
        for key in data:
            if key not in _REQUIRED + _OPTIONAL:
                raise ValueError(f"unknown spec key {key!r}{where}{did_you_mean(str(key), _REQUIRED + _OPTIONAL)}")
        for key in _REQUIRED:
            if key not in data:
                raise ValueError(f"the spec{where} lacks the key {key!r} (needs {', '.join(_REQUIRED)})")
        seeds = data["seeds"]
        if isinstance(seeds, bool):
            raise ValueError(f"seeds must be a number of seeds or a list of seeds, got {seeds!r}")
        if isinstance(seeds, int):
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1: every cell needs at least one seed, got {seeds}")
            if seeds > MAX_SEEDS:
                raise ValueError(f"seeds must be at most {MAX_SEEDS}, got {seeds}")
            base = _int(data.get("base_seed", 0), "base_seed", 0)
            seeds = list(range(base, base + seeds))
        elif "base_seed" in data:
            raise ValueError("base_seed applies only when seeds is a number; seeds is a list here")
        kwargs = {k: data[k] for k in _OPTIONAL if k in data and k != "base_seed"}
        kwargs.setdefault("fixed", {})
        if kwargs["fixed"] is None:
            kwargs["fixed"] = {}
        try:
            return cls(prompt=data["prompt"], vary=data["vary"], labels=data["labels"], seeds=seeds,
                       source=Path(source) if source else None, **kwargs)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}" if source else str(exc)) from None


def load_spec(path: str | Path) -> StressSpec:
    """Read a spec from a ``.yaml``/``.yml``/``.json`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unparsable file (with the line) or an invalid spec (naming the key and file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML ({line.strip() or 'parse error'}: "
                             f"{getattr(exc, 'problem', exc)})") from None
    return StressSpec.from_mapping(data, source=path)


def example_spec_text() -> str:
    """A commented example spec (what ``radsynth stress-test --init-spec FILE`` writes)."""
    return '''# RadSynth stress-test spec (radsynth stress-test --spec THIS_FILE --classifier MODEL --output DIR)
# Every combination of the "vary" values is a cell; all cells share the same seeds, so the images made
# with one seed differ only in the varied attributes (counterfactuals).

# Prompt template: every {placeholder} must be a key of "vary" or "fixed".
prompt: "frontal chest radiograph, {finding}, {age} year old {sex}"

vary:
  # a target attribute (it has labels below): the model's answer should follow it
  finding: ["no acute findings", "moderate left pleural effusion", "moderate right pleural effusion"]
  # a nuisance attribute (no labels): changing it should not change the model's answer
  sex: [woman, man]

fixed: {age: 60}

# Expected class of each value (1 = positive for the model's score of class "class_index").
# A cell is positive when any of its labelled values is 1. Every value of a labelled attribute needs one.
labels:
  finding: {"no acute findings": 0, "moderate left pleural effusion": 1, "moderate right pleural effusion": 1}

# Seeds per cell: a number (seeds base_seed .. base_seed + N - 1) or a list of seeds.
# 95% CI half-width of a rate p with N seeds is about 1.96 * sqrt(p (1 - p) / N): +-0.10 for p = 0.1 at
# N = 36, +-0.05 at N = 140 (see docs/stress_test.md for the table).
seeds: 32
base_seed: 0

# Optional:
threshold: 0.5        # the model's decision threshold on its score
class_index: 0        # which score the model returns for the positive class
tolerance: 0.1        # smallest effect flagged: a flip rate or sensitivity gap whose 95% CI lies beyond it
strength: 0.6         # --images: how much of a real image is re-noised before the edit (0-1]
# Where each value should change the image, so that similarity is also measured outside that region:
# "phantom" (derived from procedural phantoms of the same attributes), or per value a zone
# (left_hemithorax, right_hemithorax, left_lower_zone, right_lower_zone, left_upper_zone,
# right_upper_zone, lower_zones, upper_zones, whole_image) or a mask PNG (white = may change).
regions:
  finding: {"moderate left pleural effusion": left_lower_zone, "moderate right pleural effusion": right_lower_zone}
'''


def write_example_spec(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write :func:`example_spec_text` to ``path`` atomically.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"--init-spec {path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, example_spec_text())
