"""Configuration: pydantic models, loaded from ``configs/default.yaml``, then ``--config FILE``, then ``--set``.

Layers are merged key by key (later wins). Validation is strict: an unknown key or a wrong type is one
:class:`~pipeline.errors.ConfigError` naming the dotted key and the layer (file or ``--set``) it came from.
The resolved config is saved into every run (``run.json``) and is part of each stage's fingerprint.

User files and ``--set`` values are read defensively: a file over :data:`MAX_CONFIG_BYTES`, bytes that are not
UTF-8, nesting deeper than :data:`MAX_DEPTH` or more than :data:`MAX_VALUES` values (aliases counted as expanded)
are one ConfigError each, and every value or key an error echoes is cut to :func:`preview`.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.backends import BUILTIN_BACKENDS
from pipeline.errors import ConfigError

__all__ = [
    "PROJECT_ROOT",
    "STAGE_NAMES",
    "DEFAULT_CONFIG",
    "EnvConfig",
    "Sam3Config",
    "Sam3dConfig",
    "SegmentConfig",
    "ReconstructConfig",
    "VLMConfig",
    "AgentConfig",
    "RequestLimits",
    "RunConfig",
    "EngineConfig",
    "SlurmStageConfig",
    "SlurmConfig",
    "PipelineConfig",
    "load_config",
    "apply_overrides",
    "parse_set_flags",
    "parse_yaml",
    "check_shape",
    "preview",
    "is_import_path",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"
STAGE_NAMES: tuple[str, ...] = ("segment", "reconstruct")
Frame = Literal["pytorch3d", "opencv", "opengl"]
#: File formats the 3D stage (or ``python -m pipeline export``) can add beside gaussians.ply and mesh.glb.
ExportFormat = Literal["obj", "stl", "usdz", "glb-textured"]
EXPORT_FORMATS: tuple[str, ...] = ("obj", "stl", "usdz", "glb-textured")
#: Largest config file read (``--config``; the default file too). Config files are a few KB.
MAX_CONFIG_BYTES = 1_000_000
#: Deepest nesting of a config file, a ``--set`` value or a ``--list`` line (the real config is 4 levels deep).
MAX_DEPTH = 50
#: Most values (mapping entries and list items, YAML aliases counted as often as they are used) in one layer.
MAX_VALUES = 100_000
PREVIEW_CHARS = 80
_MAX_INT_BITS = 10_000  # ≈ 3000 decimal digits: beyond it Python refuses to print the number (JSON, hashing)
# the C parser where PyYAML was built with libyaml: faster, and it caps flow nesting itself
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """``value`` for an error message: a string as is, anything else as ``repr``; control characters escaped (one
    line) and cut to ``limit`` characters, so a huge or hostile value is named, never echoed whole."""
    text = value if isinstance(value, str) else _safe_repr(value)
    text = text[: limit * 4]  # escaping can only grow it: cut first, then escape, then cut exactly
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except RecursionError:  # a self-referencing or very deep structure
        return f"<{type(value).__name__} nested too deep>"
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        return f"<{type(value).__name__} too long to print>"


def is_import_path(value: str) -> bool:
    """True for ``package.module:Class`` (dotted identifiers, a colon, one identifier)."""
    module, sep, cls = value.partition(":")
    return bool(sep) and cls.isidentifier() and all(part.isidentifier() for part in module.split("."))


def _check_backend(stage: str, value: str) -> str:
    if value in BUILTIN_BACKENDS[stage] or is_import_path(value):
        return value
    known = ", ".join(sorted(BUILTIN_BACKENDS[stage]))
    raise ValueError(f"not a built-in {stage} backend ({known}) nor an import path 'package.module:Class'")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvConfig(_Section):
    """Where a stage's interpreter lives.

    ``kind``: ``conda`` (by ``name`` or ``prefix``), ``venv`` (``prefix`` is the venv directory) or ``current``
    (the driver's own interpreter; for tests and single-env installs). ``spec`` is the env file under ``envs/``
    that ``python -m pipeline envs create`` builds it from. ``variables`` are added to the child's environment:
    declare here what a conda activation script would have set (``CUDA_HOME``, ``CC``, …), because the driver
    runs ``<prefix>/bin/python`` directly and activation scripts do not run.
    """

    kind: Literal["conda", "venv", "current"] = "conda"
    name: str | None = None
    prefix: Path | None = None
    spec: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)


class Sam3Config(_Section):
    """Meta SAM3 image model: weights, precision, compilation."""

    checkpoint: str = "facebook/sam3"  # a Hugging Face repo id or a local .pt path
    revision: str | None = None
    bpe_path: Path | None = None  # default: found in the env (open_clip's copy of the CLIP BPE vocab)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    compile: bool = False
    redownload: bool = False
    random_weights: bool = False  # benchmarks/tests only: build without loading any checkpoint
    prefetch_batch: int = Field(1, ge=1, le=32)  # images per batched backbone pass in a job group; 1 = off
    cuda_graphs: bool = True  # GPU only: backbone + grounding replayed as CUDA graphs captured at start
    # phrase counts with their own grounding graph; a call pads to the next one (rounding differs slightly)
    graph_buckets: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 12, 16], min_length=1)

    @field_validator("graph_buckets")
    @classmethod
    def _buckets_in_range(cls, value: list[int]) -> list[int]:
        if any(not 1 <= b <= 16 for b in value):
            raise ValueError(f"graph_buckets must be phrase counts between 1 and 16, got {value}")
        return sorted(set(value))


class Sam3dConfig(_Section):
    """Meta SAM 3D Objects inference pipeline knobs (see docs/reconstruct.md)."""

    checkpoint_dir: Path = Path("checkpoints/sam-3d-objects")
    # preset: named sampler settings (pipeline/backends/sam3d_presets.py); a knob below left null comes from it
    preset: Literal["quality", "fast", "preview"] = "quality"
    stage1_steps: int | None = Field(None, ge=1)
    stage2_steps: int | None = Field(None, ge=1)
    decode_formats: list[Literal["gaussian", "gaussian_4", "mesh"]] | None = None
    stage1_distillation: bool | None = None
    stage2_distillation: bool | None = None
    max_batch_objects: int = Field(4, ge=1)  # objects of one image per batched run; CUDA OOM halves it
    mesh_postprocess: bool = False
    texture_baking: bool = False
    layout_postprocess: bool = False
    export_obj: bool = False
    compile: bool = False
    random_weights: bool = False  # benchmarks/tests only


class SegmentConfig(_Section):
    """The 2D stage: text phrases → one mask per object."""

    env: str = "sam3"
    backend: str = "sam3"  # a built-in name or "package.module:Class"
    options: dict[str, Any] = Field(default_factory=dict)  # free-form, for plug-in backends
    variables: dict[str, str] = Field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    min_area_px: int = Field(64, ge=0)
    dedup_iou: float = Field(0.7, gt=0.0, le=1.0)
    max_objects: int = Field(20, ge=1)
    sam3: Sam3Config = Field(default_factory=Sam3Config)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        return _check_backend("segment", value)


class ReconstructConfig(_Section):
    """The 3D stage: image + masks → per-object Gaussians, meshes, poses and a composed scene."""

    env: str = "sam3d-objects"
    backend: str = "sam3d"
    options: dict[str, Any] = Field(default_factory=dict)
    variables: dict[str, str] = Field(default_factory=dict)
    device: str = "auto"
    seed: int = 42  # object i gets seed + i
    frame: Frame = "opencv"  # frame of scene.ply / scene.glb
    preview: bool = True
    exports: list[ExportFormat] = Field(default_factory=list)  # per object and for the scene, in the scene's frame
    texture_size: int = Field(1024, ge=64, le=8192)  # texels per side of a baked texture (obj, usdz, glb-textured)
    sam3d: Sam3dConfig = Field(default_factory=Sam3dConfig)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        return _check_backend("reconstruct", value)

    @field_validator("exports", mode="before")
    @classmethod
    def _split_exports(cls, value: Any) -> Any:
        """``"obj,stl"`` (a --set or --export value) → ``["obj", "stl"]``; duplicates dropped."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(dict.fromkeys(value))
        return value  # anything else: the type check names it


class VLMConfig(_Section):
    """The vision-language model: a managed ``vllm serve`` in the ``vllm`` env, or an external endpoint."""

    url: str | None = None  # external OpenAI-compatible base URL (…/v1); None = managed server
    api_key_env: str | None = None  # name of the environment variable holding the API key
    env: str = "vllm"
    model: str = "Qwen/Qwen3-VL-8B-Thinking"  # repo id or local directory
    served_name: str = "qwen3-vl-8b-thinking"
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    max_model_len: int = 32768
    gpu_memory_utilization: float = Field(0.45, gt=0.0, le=1.0)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 4, "video": 0})
    reasoning_parser: str | None = "qwen3"
    tensor_parallel_size: int = Field(1, ge=1)
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES for the server
    extra_args: list[str] = Field(default_factory=list)
    variables: dict[str, str] = Field(default_factory=dict)
    ready_timeout_s: float = Field(900.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    image_max_side: int = Field(1280, ge=64)
    max_tokens: int = Field(8192, ge=16)
    temperature: float = 0.6
    top_p: float = 0.95
    retries: int = Field(2, ge=0)

    def api_key(self) -> str | None:
        """The key from the environment variable named by ``api_key_env`` (None when unset or empty)."""
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None


class AgentConfig(_Section):
    """The agent loop: VLM proposes phrases, SAM3 segments, VLM keeps or re-proposes."""

    max_rounds: int = Field(3, ge=1)
    max_phrases: int = Field(6, ge=1)


class RequestLimits(_Section):
    """What one request may ask for, the same at every entry point (CLI, ``--list`` lines, Python API, web)."""

    max_query_chars: int = Field(500, ge=1)  # a --query sentence for the VLM agent
    max_phrases: int = Field(16, ge=1)  # --prompt phrases after splitting on commas and dropping repeats
    max_phrase_chars: int = Field(200, ge=1)  # one phrase


class RunConfig(_Section):
    """Where runs go, how their input photos are checked and kept, and the limits of a request."""

    out_root: Path = Path("outputs")
    max_pixels: int = Field(40_000_000, ge=1)  # larger photos are refused from their header, before any decode
    store_input: Literal["copy", "hardlink", "reflink"] = "copy"  # how a run keeps its photo's original bytes
    limits: RequestLimits = Field(default_factory=RequestLimits)


class EngineConfig(_Section):
    """The warm engine: worker lifetimes, time limits, grouping and the GPU memory check (docs/engine.md)."""

    state_dir: Path | None = None  # child records + worker logs; None: $XDG_STATE_HOME/image-to-3d
    stage_timeout_s: float = Field(3600.0, gt=0)  # one stage of one run; past it the worker is killed, restarted
    max_restarts: int = Field(2, ge=0)  # consecutive failed worker starts before a stage stops trying
    segment_group: int = Field(4, ge=1)  # waiting images sent to the segment worker together
    check_gpu_memory: bool = True  # refuse to start when the stages sharing a GPU cannot fit on it

    def resolved_state_dir(self) -> Path:
        """``state_dir``, or the per-user default under ``$XDG_STATE_HOME`` (``~/.local/state``)."""
        if self.state_dir is not None:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "image-to-3d"


class SlurmStageConfig(_Section):
    """What one stage's array tasks ask SLURM for (per task: one warm worker over one shard)."""

    gpus: int = Field(1, ge=0)  # → --gres=gpu[:gpu_type]:N; 0 asks for none
    gpu_type: str | None = None  # e.g. "h100" → --gres=gpu:h100:N
    cpus: int = Field(8, ge=1)  # → --cpus-per-task
    mem: str = "32G"  # → --mem (host memory per task)
    time: str = "04:00:00"  # → --time (per task: one shard)


class SlurmConfig(_Section):
    """``batch --executor slurm``: shards of images as array tasks, each running the warm engine (docs/slurm.md)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    shard_size: int = Field(16, ge=1)  # images per array task
    parallelism: int = Field(8, ge=1)  # array tasks running at once (--array=…%N)
    mode: Literal["auto", "combined", "per-stage"] = "auto"  # auto: per-stage when the stages ask for different resources
    warn_s: int = Field(300, ge=10)  # SIGUSR1 this long before the time limit: stop cleanly and requeue
    python: str | None = None  # interpreter on the nodes; null: the submitting driver's
    extra_args: list[str] = Field(default_factory=list)  # more sbatch flags, e.g. ["--constraint=a100"]
    segment: SlurmStageConfig = Field(default_factory=lambda: SlurmStageConfig(mem="32G"))
    reconstruct: SlurmStageConfig = Field(default_factory=lambda: SlurmStageConfig(mem="64G"))

    def stage(self, name: str) -> SlurmStageConfig:
        """The resources of stage ``name``'s array tasks."""
        return getattr(self, name)


class PipelineConfig(_Section):
    """The whole resolved configuration."""

    run: RunConfig = Field(default_factory=RunConfig)
    envs: dict[str, EnvConfig] = Field(
        default_factory=lambda: {
            "vllm": EnvConfig(name="vllm", spec="vllm.yml"),
            "sam3": EnvConfig(name="sam3", spec="sam3.yml"),
            "sam3d-objects": EnvConfig(name="sam3d-objects", spec="sam3d-objects.yml"),
        }
    )
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    vlm: VLMConfig = Field(default_factory=VLMConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    def stage(self, name: str) -> SegmentConfig | ReconstructConfig:
        """The config section of stage ``name`` (``segment`` or ``reconstruct``)."""
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
        return getattr(self, name)

    def env_for(self, name: str) -> EnvConfig:
        """The env named ``name``, or a ConfigError listing the declared envs."""
        try:
            return self.envs[name]
        except KeyError:
            raise ConfigError(
                f"env {name!r} is not declared under 'envs' (declared: {', '.join(sorted(self.envs))})",
                hint=f"add envs.{name} to your config or point the stage at a declared env",
            ) from None


# ---------------------------------------------------------------------------------------------- loading


class _TooDeep(Exception):
    """A YAML document nested deeper than the parser (or :data:`MAX_DEPTH`) allows."""


def parse_yaml(text: str) -> Any:
    """One YAML document with the safe (C, where available) loader. Raises ``yaml.YAMLError`` (also for a value
    Python refuses to build, such as an int of more than 4300 digits), or :class:`_TooDeep` for nesting the parser
    cannot take (instead of a RecursionError)."""
    try:
        return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except RecursionError:
        raise _TooDeep() from None
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml's own cap on flow and block nesting
            raise _TooDeep() from None
        raise
    except (ValueError, OverflowError) as exc:  # raised by a constructor (int(), float(), a timestamp)
        raise yaml.YAMLError(f"a value cannot be read: {exc}") from None


def check_shape(data: Any, where: str) -> None:
    """ConfigError when ``data`` nests deeper than :data:`MAX_DEPTH` or holds more than :data:`MAX_VALUES` values.

    The walk is iterative and counts a shared (aliased) value each time it is used, so a "billion laughs"
    document is refused after :data:`MAX_VALUES` steps instead of being expanded later by validation or hashing.
    """
    stack: list[tuple[Any, int]] = [(data, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, int) and node.bit_length() > _MAX_INT_BITS:
            raise ConfigError(f"{where} holds a number of more than 3000 digits",
                              hint="config numbers are counts, sizes and seeds; check the value")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} is nested deeper than {MAX_DEPTH} levels",
                              hint="config values are a few levels deep; check the file for runaway brackets")
        children = list(node.values()) if isinstance(node, Mapping) else node if isinstance(node, (list, tuple)) else ()
        count += len(children)
        if count > MAX_VALUES:
            raise ConfigError(f"{where} holds more than {MAX_VALUES} values (YAML aliases counted as expanded)",
                              hint="a config is a few hundred values; remove the repeated aliases or the bulk data")
        stack.extend((child, depth + 1) for child in children)


def parse_set_flags(flags: Sequence[str]) -> dict[str, Any]:
    """``["segment.threshold=0.3", "vlm.extra_args=[--foo]"]`` → nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for flag in flags:
        key, sep, raw = flag.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {preview(flag)!r} is not of the form section.key=value",
                hint="for example --set segment.threshold=0.3",
            )
        parts = key.strip().split(".")
        if len(parts) > MAX_DEPTH:
            raise ConfigError(f"--set key {preview(key)!r} has more than {MAX_DEPTH} parts",
                              hint="config keys are section.key or section.sub.key")
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except _TooDeep:
            raise ConfigError(f"--set {preview(key)}: the value is nested deeper than {MAX_DEPTH} levels",
                              hint="check the value for runaway brackets") from None
        except yaml.YAMLError:
            value = raw
        check_shape(value, f"--set {preview(key)}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {preview(flag)!r} conflicts with another --set of {preview(part)!r}")
        node[parts[-1]] = value
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping; any way the file can be bad (missing, huge, not UTF-8, not YAML, too deep,
    not a mapping) is one ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # never more: the path may be a huge file or a device
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", hint="check the --config path") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1_000_000} MB",
                          hint="a config file is a few KB: check that --config names the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                          hint="save it as UTF-8, or check that --config names the right file") from None
    try:
        data = parse_yaml(text)
    except _TooDeep:
        raise ConfigError(f"config file {path} is nested deeper than {MAX_DEPTH} levels",
                          hint="config values are a few levels deep; check the file for runaway brackets") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {preview(str(exc).splitlines()[0], 160)}",
                          hint="fix the line the parser names (yamllint shows it too)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    check_shape(data, f"config file {path}")
    return data


def _merge(base: dict[str, Any], layer: Mapping[str, Any], origin: str, origins: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``layer`` into ``base`` in place, recording for each dotted key the layer it came from."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, origins, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)
        origins[dotted] = origin


def _origin_of(loc: Sequence[Any], origins: Mapping[str, str]) -> str:
    parts = [str(p) for p in loc]
    for n in range(len(parts), 0, -1):
        dotted = ".".join(parts[:n])
        if dotted in origins:
            return origins[dotted]
    return "the defaults"


def _known_keys(loc: Sequence[Any]) -> list[str]:
    """The keys the config accepts at the dotted location ``loc`` (a section, or an env inside ``envs``)."""
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:  # a free-form mapping (envs.<name>, options, variables)
            model = EnvConfig if list(loc[:1]) == ["envs"] and len(loc) == 2 else None
            continue
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _config_error(exc: ValidationError, origins: Mapping[str, str]) -> ConfigError:
    first = exc.errors()[0]
    loc = list(first["loc"])
    dotted = preview(".".join(str(p) for p in loc))  # keys come from the user too: a huge one is cut
    origin = _origin_of(loc, origins)
    if first["type"] == "extra_forbidden":
        message = f"unknown config key '{dotted}' in {origin}"
        last = str(loc[-1])
        near = difflib.get_close_matches(last, _known_keys(loc[:-1]), n=1, cutoff=0.6) if len(last) <= 200 else []
        prefix = preview(".".join(str(p) for p in loc[:-1]))
        hint = (f"did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near
                else "see the config reference in README.md for the valid keys")
    else:
        got = preview(_safe_repr(first.get("input")))  # a huge value is named, not echoed
        message = f"config key '{dotted}' in {origin}: {preview(first['msg'], 200)} (got {got})"
        hint = "fix the value; README.md lists each key's type and default"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(message, hint=hint)


def load_config(
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    default_file: Path | None = DEFAULT_CONFIG,
) -> PipelineConfig:
    """Merge the default file, an optional user file and ``--set`` flags, then validate strictly."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if default_file is not None and default_file.exists():
        _merge(merged, _read_yaml(default_file), str(default_file), origins)
    if config_file is not None:
        _merge(merged, _read_yaml(Path(config_file)), str(config_file), origins)
    if overrides:
        _merge(merged, parse_set_flags(overrides), "--set", origins)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise _config_error(exc, origins) from None


def apply_overrides(config: PipelineConfig, overrides: Sequence[str], *, origin: str = "--set") -> PipelineConfig:
    """``config`` with ``overrides`` (``"section.key=value"``, as ``--set``) applied, validated strictly."""
    if not overrides:
        return config
    merged = config.model_dump(mode="json")
    origins: dict[str, str] = {}
    _merge(merged, parse_set_flags(overrides), origin, origins)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise _config_error(exc, origins) from None
