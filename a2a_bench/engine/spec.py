"""What a sweep measures: the grid (from options or a TOML file), validated, expanded into points."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from a2a_bench.engine.workload import DTYPES, ROUTINGS, WorkloadSpec
from fused_a2a.backends import BACKENDS, get_backend

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SpecError(ValueError):
    """A user error in the sweep's options or spec file (the CLI exits with status 2)."""


REFERENCE = next(name for name, backend in BACKENDS.items() if backend.reference)
"""The backend every other is verified against (``BackendSpec.reference``), and the harness's default one."""


@dataclass(frozen=True)
class SweepSpec:
    """The grid of one sweep; every field is a list of values to cross, except the timing fields.

    Attributes:
        backends: backend names (``fused_a2a.backends.BACKENDS``).
        hidden, tokens, topk, experts: hidden sizes, tokens per rank, experts per token, experts.
        dtypes: ``bf16``/``fp16``/``fp32``.
        routings: ``uniform``, ``zipf:<skew>`` or ``hot:<fraction>``.
        sms: SM counts for the backends with SM knobs (``BackendSpec.sms_knobs``; empty: their
            defaults); a backend with several (HybridEP's dispatch and combine SMs) gets each count
            for all of them at once.
        knobs: ``{backend: {knob: [values]}}`` for the backends' other knobs (missing: default only).
        rng_seed: base seed of the workloads' random draws (``seed`` in spec files, ``run.json`` and
            on the command line, :data:`FILE_KEYS`).
        warmup, iters: untimed and timed iterations per mode.
        point_timeout_s: a point that runs longer is recorded as ``timeout``.
        exhaustive: time every knob combination (default: a coordinate search, :mod:`a2a_bench.engine.search`).
    """

    backends: tuple[str, ...] = (REFERENCE,)
    hidden: tuple[int, ...] = (4096,)
    tokens: tuple[int, ...] = (4096,)
    topk: tuple[int, ...] = (8,)
    experts: tuple[int, ...] = (64,)
    dtypes: tuple[str, ...] = ("bf16",)
    routings: tuple[str, ...] = ("uniform",)
    sms: tuple[int, ...] = ()
    knobs: dict[str, dict[str, tuple]] = field(default_factory=dict)
    rng_seed: int = 0
    warmup: int = 5
    iters: int = 20
    point_timeout_s: float = 300.0
    exhaustive: bool = False

    def to_json(self) -> dict[str, Any]:
        """The spec as spec files and ``run.json`` hold it (keys: :func:`file_keys`)."""
        return {file_key(k): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepSpec:
        """The spec :meth:`to_json` gave (``run.json``'s): lists become tuples again."""
        field_of = {file_key(f.name): f.name for f in fields(cls)}
        values = {field_of[key]: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        values["knobs"] = {b: {k: tuple(v) for k, v in knobs.items()} for b, knobs in data["knobs"].items()}
        return cls(**values)


FILE_KEYS = {"rng_seed": "seed"}  # field -> its key in spec files and run.json, where the two differ


def file_key(name: str) -> str:
    """The key of :class:`SweepSpec` field ``name`` in spec files and ``run.json``."""
    return FILE_KEYS.get(name, name)


def file_keys() -> list[str]:
    """Every :class:`SweepSpec` field's key in spec files and ``run.json``, in field order."""
    return [file_key(f.name) for f in fields(SweepSpec)]


QUICK = SweepSpec(  # every value of the reference backend's knobs
    backends=(REFERENCE,),
    hidden=(1024, 2048),
    tokens=(256, 512),
    topk=(4,),
    experts=(16,),
    knobs={REFERENCE: {knob.name: knob.choices for knob in BACKENDS[REFERENCE].knobs}},
    warmup=3,
    iters=10,
)


@dataclass(frozen=True)
class Point:
    """One measurement: a backend with fixed knobs on one workload, on ``world_size`` ranks."""

    backend: str
    knobs: tuple[tuple[str, Any], ...]
    workload: WorkloadSpec
    world_size: int

    @property
    def knob_dict(self) -> dict[str, Any]:
        return dict(self.knobs)

    @property
    def point_id(self) -> str:
        """A stable 12-hex-digit hash of what is measured (not of how long it is timed)."""
        workload = asdict(self.workload)
        workload["seed"] = workload.pop("rng_seed")  # the name ids were made with
        key = {"backend": self.backend, "knobs": dict(self.knobs), "world_size": self.world_size, **workload}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"8,16,32"`` or ``"8:64:8"`` (start:stop:step, stop included) → ints; ``SpecError`` otherwise."""
    values: list[int] = []
    for part in _words(text, what):
        if ":" in part:
            bounds = part.split(":")
            if len(bounds) != 3:
                raise SpecError(f"{what}: a range is start:stop:step, got {part!r}")
            start, stop, step = (_int(b, what) for b in bounds)
            if step <= 0:
                raise SpecError(f"{what}: range step must be positive, got {part!r}")
            if stop < start:
                raise SpecError(f"{what}: range {part!r} is reversed (stop < start)")
            values.extend(range(start, stop + 1, step))
        else:
            values.append(_int(part, what))
    return tuple(dict.fromkeys(values))


def parse_optional(text: str | None, parse, what: str):
    """``parse(text, what)`` (:func:`parse_ints`, :func:`parse_words`), or ``None`` for an option not given."""
    return None if text is None else parse(text, what)


def parse_words(text: str, what: str) -> tuple[str, ...]:
    """``"a,b"`` → ``("a", "b")``; ``SpecError`` for an empty list."""
    return tuple(dict.fromkeys(_words(text, what)))


def parse_knob(text: str) -> tuple[str, str, tuple]:
    """``"backend.knob=v1,v2"`` → ``(backend, knob, values)`` typed by the knob; ``SpecError`` otherwise."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SpecError(f"--knob takes backend.knob=v1,v2, got {text!r}")
    target, values = text.split("=", 1)
    backend, name = target.split(".", 1)
    return backend, name, _knob_values(backend, name, parse_words(values, f"--knob {target}"))


def _knob_values(backend: str, name: str, words) -> tuple:
    try:
        knob = get_backend(backend).knob(name)
        return tuple(dict.fromkeys(knob.parse(str(w)) for w in words))
    except ValueError as exc:
        raise SpecError(str(exc)) from None


SCALARS: dict[str, tuple[tuple[type, ...], str]] = {
    "seed": ((int,), "an integer"),
    "warmup": ((int,), "an integer"),
    "iters": ((int,), "an integer"),
    "point_timeout_s": ((int, float), "a number of seconds"),
    "exhaustive": ((bool,), "true or false"),
}
WORD_LISTS = ("backends", "dtypes", "routings")
INT_LISTS = ("hidden", "tokens", "topk", "experts", "sms")


def load_spec_file(path: Path) -> dict[str, Any]:
    """Read a TOML spec file into :class:`SweepSpec` field overrides, every value type-checked.

    Scalars must have their field's type (``seed = 1.5``, ``iters = true``, ``exhaustive = "yes"`` are
    refused); lists hold strings (``backends``, ``dtypes``, ``routings``) or integers and
    ``"start:stop:step"`` ranges (``hidden``, ``tokens``, ``topk``, ``experts``, ``sms``); knob values
    have the knob's type, or are words converted as on the command line.

    Raises:
        SpecError: one line naming the file and the first problem.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec file {path} does not parse: {exc}") from None
    known = set(file_keys())
    fields_of = {file_key(f.name): f.name for f in fields(SweepSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"spec file {path}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "knobs":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise SpecError(f"spec file {path}: knobs must be a table of tables ([knobs.<backend>])")
            out[key] = {
                b: {k: _spec_knob_values(path, b, k, v if isinstance(v, list) else [v]) for k, v in kv.items()}
                for b, kv in value.items()
            }
        elif key in SCALARS:
            kinds, what = SCALARS[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise SpecError(f"spec file {path}: {key} must be {what}, got {_toml(value)}")
            out[fields_of[key]] = value
        else:
            items = value if isinstance(value, list) else [value]
            if key in WORD_LISTS:
                wrong = next((v for v in items if not isinstance(v, str)), None)
                what = "strings"
            else:
                wrong = next((v for v in items if isinstance(v, bool) or not isinstance(v, (int, str))), None)
                what = "integers or \"start:stop:step\" ranges"
            if wrong is not None:
                raise SpecError(f"spec file {path}: {key} takes {what}, got {_toml(wrong)}")
            text = ",".join(str(v) for v in items)
            out[key] = parse_words(text, key) if key in WORD_LISTS else parse_ints(text, key)
    return out


def _spec_knob_values(path: Path, backend: str, name: str, values: list) -> tuple:
    """A spec file's values of one knob: words parsed as on the command line, others type-checked."""
    try:
        knob = get_backend(backend).knob(name)
        typed = [knob.parse(v) if isinstance(v, str) else knob.validate(v) for v in values]
    except ValueError as exc:
        raise SpecError(f"spec file {path}: knobs.{backend}.{name}: {exc}") from None
    if not typed:
        raise SpecError(f"spec file {path}: knobs.{backend}.{name}: empty list")
    return tuple(dict.fromkeys(typed))


def _toml(value: Any) -> str:
    """``value`` as TOML writes it (``true``, ``"ten"``, ``1.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)


def parse_routing(text: str) -> tuple[str, float]:
    """``uniform`` / ``zipf:1.2`` / ``hot:0.5`` → ``(routing, skew)``; ``SpecError`` otherwise."""
    name, _, skew = text.partition(":")
    if name not in ROUTINGS:
        raise SpecError(f"unknown routing {text!r}; choose from uniform, zipf:<skew>, hot:<fraction>")
    if name == "uniform":
        return name, 1.0
    try:
        return name, float(skew) if skew else (1.0 if name == "zipf" else 0.5)
    except ValueError:
        raise SpecError(f"routing {text!r}: the skew must be a number") from None


def validate(spec: SweepSpec, world_size: int) -> None:
    """Raise ``SpecError`` (one line) for anything that makes the sweep meaningless on ``world_size`` ranks."""
    for name in spec.backends:
        if name not in BACKENDS:
            raise SpecError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    for name in spec.knobs:
        if name not in spec.backends:
            raise SpecError(f"knobs given for backend {name!r}, which is not in --backends")
    for label, values in (("hidden", spec.hidden), ("tokens", spec.tokens), ("topk", spec.topk), ("experts", spec.experts)):
        if not values:
            raise SpecError(f"{label}: empty list")
        if any(v <= 0 for v in values):
            raise SpecError(f"{label}: values must be positive, got {list(values)}")
    for dtype in spec.dtypes:
        if dtype not in DTYPES:
            raise SpecError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if dtype == "fp8" and any(h % 128 for h in spec.hidden):
            raise SpecError(f"fp8 dispatch needs hidden sizes divisible by 128, got {list(spec.hidden)}")
    for routing in spec.routings:
        parse_routing(routing)
    for experts in spec.experts:
        if experts % world_size:
            raise SpecError(f"experts ({experts}) is not divisible by the number of ranks ({world_size})")
    if max(spec.topk) > min(spec.experts):
        raise SpecError(f"topk ({max(spec.topk)}) is larger than the number of experts ({min(spec.experts)})")
    if spec.sms and not any(get_backend(name).sms_knobs for name in spec.backends):
        raise SpecError(f"--sms sets SM knobs, which none of {', '.join(spec.backends)} has "
                        f"(backends with them: {', '.join(sms_backends())})")
    if spec.warmup < 0 or spec.iters < 1:
        raise SpecError(f"warmup must be >= 0 and iters >= 1, got {spec.warmup} and {spec.iters}")
    if spec.point_timeout_s <= 0:
        raise SpecError(f"point timeout must be positive, got {spec.point_timeout_s}")
    for name in spec.backends:
        backend = get_backend(name)
        grid = knob_grid(spec, name)
        for knob_name, values in grid.items():
            for value in values:
                problem = backend.knob(knob_name).check(value)
                if problem is not None:
                    raise SpecError(f"{name}: {problem}")


def sms_backends() -> list[str]:
    """The registered backends with SM knobs (what ``--sms`` sets)."""
    return [name for name, backend in BACKENDS.items() if backend.sms_knobs]


def knob_grid(spec: SweepSpec, backend_name: str) -> dict[str, tuple]:
    """Each knob of the backend with the values this sweep tries (its default when not given).

    With ``spec.sms``, the backend's first SM knob takes those values and its other SM knobs that the
    spec leaves unset are tied to it (:func:`tied_knobs`): they are not in the grid.
    """
    backend = get_backend(backend_name)
    given = spec.knobs.get(backend_name, {})
    tied = tied_knobs(spec, backend_name)
    grid = {}
    for knob in backend.knobs:
        if knob.name in tied:
            continue
        if knob.name in given:
            grid[knob.name] = tuple(given[knob.name])
        elif spec.sms and knob.name in backend.sms_knobs:
            grid[knob.name] = spec.sms
        else:
            grid[knob.name] = (knob.default,)
    return grid


def tied_knobs(spec: SweepSpec, backend_name: str) -> dict[str, str]:
    """SM knobs that follow the backend's first SM knob in this sweep (knob -> the knob it follows):
    with ``spec.sms``, every other SM knob the spec gives no values of its own."""
    backend = get_backend(backend_name)
    if not spec.sms or len(backend.sms_knobs) < 2:
        return {}
    given = spec.knobs.get(backend_name, {})
    first = backend.sms_knobs[0]
    return {name: first for name in backend.sms_knobs[1:] if name not in given}


def expand(spec: SweepSpec, world_size: int) -> list[Point]:
    """Every point of the grid, in a stable order (backend, shape, then knobs)."""
    points = []
    for backend in spec.backends:
        grid = knob_grid(spec, backend)
        tied = tied_knobs(spec, backend)
        order = [knob.name for knob in get_backend(backend).knobs]
        combos = []
        for values in itertools.product(*grid.values()):
            knobs = dict(zip(grid, values))
            knobs.update({name: knobs[leader] for name, leader in tied.items()})
            combos.append(tuple((name, knobs[name]) for name in order))
        for dtype, routing, experts, topk, hidden, tokens in itertools.product(
            spec.dtypes, spec.routings, spec.experts, spec.topk, spec.hidden, spec.tokens
        ):
            name, skew = parse_routing(routing)
            workload = WorkloadSpec(
                num_tokens=tokens, hidden=hidden, topk=topk, num_experts=experts, dtype=dtype,
                routing=name, skew=skew, rng_seed=spec.rng_seed,
            )
            points.extend(Point(backend, combo, workload, world_size) for combo in combos)
    return points


def merge(base: SweepSpec, overrides: dict[str, Any]) -> SweepSpec:
    """``base`` with the non-``None`` overrides applied."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _words(text: str, what: str) -> list[str]:
    words = [w.strip() for w in str(text).split(",") if w.strip()]
    if not words:
        raise SpecError(f"{what}: empty list")
    return words


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"{what}: {text!r} is not an integer") from None


TIMING_FIELDS = ("warmup", "iters")  # how long each row was timed: rows timed otherwise do not compare
RUN_FIELDS = ("point_timeout_s", "exhaustive")  # how a sweep runs: a resume may change them


def spec_changes(recorded: dict[str, Any], spec: SweepSpec) -> tuple[list[str], list[str]]:
    """How ``spec`` differs from a run folder's ``recorded`` spec (``run.json``'s, JSON form):
    ``(grid changes, timing changes)``, each as ``"<field> <recorded> -> <new>"`` texts."""
    new = json.loads(json.dumps(spec.to_json()))
    grid, timing = [], []
    for name in file_keys():
        if name in RUN_FIELDS or recorded.get(name) == new[name]:
            continue
        text = f"{name} {_spec_text(recorded.get(name))} -> {_spec_text(new[name])}"
        (timing if name in TIMING_FIELDS else grid).append(text)
    return grid, timing


def _spec_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return " ".join(f"{b}.{k}={_spec_text(v)}" for b, kv in sorted(value.items()) for k, v in sorted(kv.items())) or "none"
    return str(value)
