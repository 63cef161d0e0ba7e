"""The ``"attent"`` section of a DeepSpeed JSON config: a typed, documented model.

A DeepSpeed config with an ``"attent"`` section switches the teacher on; without it (or with
``"enabled": false``) the job is plain DeepSpeed over the same data. The section is validated once,
at start, and every problem is reported in one :class:`ConfigError` that names the dotted key, the
value given, what is allowed and how to fix it.

Pure module: pydantic only (already a DeepSpeed dependency).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator)

SECTION = "attent"


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as "ration" must not silently fall back to a default.
    # Strict types too: "0.5" or "true" in JSON is a mistake to report, not a value to coerce.
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


class RatioSchedule(_Strict):
    """Fraction of the dataset trained in a selection round, as a function of training progress.

    Progress x runs from 0 at the first selection round to 1 at the last pass.
    """

    schedule: Literal["constant", "incremental", "cosine", "step"] = "constant"
    """constant: ``value``; incremental: linear ``start`` -> ``end``; cosine: ``start`` -> ``end``
    along a half cosine; step: ``values`` held for equal shares of the progress."""
    value: float = Field(0.7, gt=0.0, le=1.0)
    """Ratio for the constant schedule."""
    start: float = Field(0.2, gt=0.0, le=1.0)
    """First ratio of the incremental and cosine schedules."""
    end: float = Field(0.8, gt=0.0, le=1.0)
    """Last ratio of the incremental and cosine schedules."""
    values: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9])
    """Ratios of the step schedule, each for an equal share of the selection rounds' progress."""

    @field_validator("values")
    @classmethod
    def _check_values(cls, values: list[float]) -> list[float]:
        if not values or any(not (0.0 < v <= 1.0) for v in values):
            raise ValueError(f"allowed: a non-empty list of numbers in (0, 1]; got {values}")
        return values


class IntervalSchedule(_Strict):
    """How many passes one selection is trained for before the teacher selects again."""

    schedule: Literal["fixed", "incremental", "once"] = "fixed"
    """fixed: every ``every`` passes; incremental: ``every``, ``every+growth``, ... capped at
    ``max``; once: a single selection used for every remaining pass."""
    every: int = Field(1, ge=1)
    """Passes per selection (the first interval of the incremental schedule)."""
    growth: int = Field(1, ge=0)
    """Passes added to the interval after each selection (incremental schedule)."""
    max: int = Field(8, ge=1)
    """Largest interval of the incremental schedule."""


MIN_TEMPERATURE = 1e-3
"""Smallest ``selection.temperature``: score / T stays finite in float64 for |score| < 1.8e305.
(A runtime guard still raises a SelectionError naming the key if a larger score overflows.)"""


class SelectionConfig(_Strict):
    method: Literal["hard", "soft", "random", "infobatch"] = "hard"
    """hard: top-k by score; soft: Gumbel-top-k on softmax(score / temperature), i.e. sampling
    without replacement; random: uniform without replacement (the budget-matched control);
    infobatch: InfoBatch-style pruning at the same budget: every example scoring above the mean
    of the candidates' scores is kept (a uniform draw of them if they exceed the budget), the
    rest of the budget is a uniform draw from the below-mean ones."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    """Softmax temperature of soft selection: large = close to random, small = close to hard."""
    transform: Literal["identity", "log"] = "identity"
    """Soft selection samples with probability proportional to exp(t(score) / temperature):
    identity gives exp(score / T) (the paper's softmax of losses); log gives score^(1/T), i.e.
    importance sampling proportional to the signal (with rescale: the unbiased, variance-reducing
    choice when the signal is a gradient norm)."""
    skip_top: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the highest-scoring examples never selected (guards against persistently
    unlearnable examples, the RHO-LOSS critique of greedy max-loss)."""
    rescale: bool = False
    """Weight each kept example's loss by the inverse of its inclusion probability (normalised to
    mean 1), so the subset's gradient is an unbiased estimate of the full-data gradient. Needs
    method soft, random or infobatch: hard top-k includes its examples with probability 1. For
    infobatch a kept below-mean example weighs (number below mean) / (number below mean kept),
    an above-mean one 1, before the normalisation. With ``per_source`` the inverse inclusion
    probabilities of every source are normalised together (a stratified, unbiased estimate)."""
    per_source: bool = False
    """Mixture-aware selection; needs per-sample source ids (``Teacher(..., sources=...)``).
    Scores are z-scored within each source (over that source's candidates; a source whose scores
    are all equal gets 0), the budget is split over sources in proportion to their numbers of
    candidates (largest remainder, ties to the lower source id), and each source's share is
    selected by ``method`` on its own scores, so a source of high losses cannot crowd out the
    others. Unscored examples take the best known score of their own source. Needs ``sharding``
    'gather' (or 'auto' resolving to it)."""
    resample_each_pass: bool = False
    """Draw a fresh subset at every pass of a round (from the latest scores), as the paper's soft
    selection does; otherwise a round trains the same subset for all its passes."""
    sharding: Literal["auto", "gather", "sharded"] = "auto"
    """Where the score table lives. gather: every rank holds all N scores and gathers new ones
    (simplest; 9 bytes x N per rank); sharded: each rank holds N / ranks scores and the top-k
    threshold is found with a few fixed-size collectives (docs/SCALE.md); auto: sharded when the
    dataset has more than ``sharding_threshold`` samples and there is more than one rank. Both give
    the same selection, bit for bit."""
    sharding_threshold: int = Field(10_000_000, ge=0)
    """Dataset size (samples) above which ``sharding: auto`` shards the score table."""

    # Field validators (not model validators) so these errors carry their exact key and are
    # reported together with every other problem; fields validate in declaration order, so the
    # field they depend on is in info.data when it was valid.
    @field_validator("rescale")
    @classmethod
    def _rescale_needs_probabilities(cls, rescale: bool, info: ValidationInfo) -> bool:
        if rescale and info.data.get("method") == "hard":
            raise ValueError(
                "rescale=true needs method 'soft', 'random' or 'infobatch': hard top-k keeps its "
                "examples with probability 1, so there is nothing to rescale"
            )
        return rescale


class AttentionConfig(_Strict):
    layers: list[int] = Field(default_factory=lambda: [-1])
    """Decoder layers whose attention gives the per-token importance (negative = from the end)."""

    @field_validator("layers")
    @classmethod
    def _some_layer(cls, layers: list[int]) -> list[int]:
        if not layers:
            raise ValueError("got []; allowed: a non-empty list of decoder layer indices (negative "
                             "= from the end); fix: set it to [-1] (the last layer) or remove "
                             "the key")
        return layers
    query_chunk: int = Field(128, ge=1)
    """Queries processed at once when summing attention mass, bounding memory to
    batch x heads x query_chunk x sequence."""


class GradNormConfig(_Strict):
    """Layers and memory of the ``grad_norm`` signal (attent_scale/grad_norm.py)."""

    last_blocks: int = Field(2, ge=0)
    """Include every Linear layer of the model's last ``last_blocks`` decoder blocks."""
    include_head: bool = True
    """Include the output head (the vocabulary projection)."""
    modules: list[str] = Field(default_factory=list)
    """More Linear layers by qualified name, fnmatch patterns (``model.layers.*.mlp.down_proj``)."""
    method: Literal["auto", "outer", "gram"] = "auto"
    """Per-example norm of a layer's weight gradient: outer (form A^T G, ~T x d_in x d_out per
    example), gram (T x T Gram matrices, ~T^2 x (d_in + d_out)), auto: the cheaper for each layer.
    All three are exact."""
    chunk_elements: int = Field(1 << 24, ge=1024)
    """Most elements of the temporary blocks (per-example weight gradients or Gram rows) formed at
    once, bounding the signal's extra memory."""

    @field_validator("modules")
    @classmethod
    def _some_layer(cls, modules: list[str], info: ValidationInfo) -> list[str]:
        if not modules and info.data.get("last_blocks") == 0 and not info.data.get("include_head"):
            raise ValueError("no layer selected (last_blocks 0, include_head false, modules "
                             "empty); fix: set last_blocks >= 1, include_head true, or name "
                             "modules")
        return modules


class AttentConfig(_Strict):
    """The teacher. Every field has a default; a preset fills several at once."""

    enabled: bool = True
    """false: the job is plain DeepSpeed over the same data."""
    preset: Optional[Literal["attent-mild", "attent-mix", "attent-soft", "attent-simple",
                             "attent-complex", "random", "infobatch"]] = None
    """Named recipe applied before the other keys (which override it). attent-mild: the shipped
    default (a fresh soft top-70% each pass on losses normalised within each source, each source
    keeping its share, with a mild preference for high loss: temperature 2); attent-mix: the
    same, sharper (temperature 0.5); attent-soft: attent-mix on raw losses; attent-simple: the
    paper's LLM recipe; attent-complex: the paper's cycles; random: the budget-matched control;
    infobatch: InfoBatch at a fixed 70% budget, rescaled, with a full last pass."""
    seed: int = Field(0, ge=0, lt=2 ** 63)
    """Seed of every teacher draw. Each draw uses a generator made from (seed, pass, purpose);
    numpy's seed sequences take non-negative integers, and checkpoints store it as int64."""
    signal: Literal["loss", "fgrad_norm", "attention_fgrad", "grad_norm"] = "loss"
    """loss: mean token cross-entropy; fgrad_norm: RMS over tokens of ||softmax - onehot||;
    attention_fgrad: the same, each token weighted by its attention importance; grad_norm: the
    norm of the gradient of the example's own mean token loss w.r.t. the weights of the layers in
    ``grad_norm`` (exact, from activation and output-gradient hooks; works under ZeRO-3/FSDP)."""
    source: Literal["free", "pool"] = "free"
    """free: scores recorded from every training forward; pool: a no-grad pass over a candidate
    pool before each selection, run in lockstep on every rank."""
    pool_size: Optional[int] = Field(None, ge=1)
    """Candidates scored by each pool pass (null = the whole dataset)."""
    warmup_passes: int = Field(1, ge=0)
    """Full-data passes before the first selection."""
    full_passes_per_round: int = Field(0, ge=0)
    """Full-data passes after each round's subset passes (the paper's cycles)."""
    final_full_passes: int = Field(0, ge=0)
    """The last N passes of the run are full-data passes (InfoBatch's annealing: the model ends
    on the unbiased full-data gradient). Counted in the plan, so the LR schedule knows them."""
    ratio: RatioSchedule = Field(default_factory=RatioSchedule)
    interval: IntervalSchedule = Field(default_factory=IntervalSchedule)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    score: Literal["raw", "drop", "reducible"] = "raw"
    """What selection ranks (learnability). raw: the signal as recorded; drop: the example's
    previous recorded signal minus its newest (how much it improved since it was last scored;
    an example scored only once counts as unscored and competes with the best known score);
    reducible: the signal minus a per-example reference score (RHO-LOSS: a small reference
    model's loss), given as ``Teacher(..., reference=...)``; NaN there = unknown = unscored.
    The raw signal stays the teacher's score table and what the pass summaries report."""
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    grad_norm: GradNormConfig = Field(default_factory=GradNormConfig)
    score_chunk_tokens: int = Field(2048, ge=1)
    """Tokens per chunk when reducing logits to scores (bounds the temporary memory)."""

    @field_validator("warmup_passes")
    @classmethod
    def _free_scores_need_warmup(cls, warmup: int, info: ValidationInfo) -> int:
        if warmup == 0 and info.data.get("source") == "free":
            raise ValueError(
                "source='free' needs warmup_passes >= 1: free scores come from training forwards, "
                "so the first selection would see no scores; set warmup_passes: 1 or source: 'pool'"
            )
        return warmup

    @field_validator("score")
    @classmethod
    def _drop_needs_two_scores_for_hard(cls, score: str, info: ValidationInfo) -> str:
        # The first selection sees no example scored twice unless two free warm-up passes ran;
        # every candidate then ties, and hard top-k would keep the lowest ids (a bias by id, for
        # the whole run with interval 'once'). Soft, random and infobatch draw uniformly instead.
        sel, source = info.data.get("selection"), info.data.get("source")
        warmup = info.data.get("warmup_passes")
        if (score == "drop" and sel is not None and sel.method == "hard"
                and (source == "pool" or (warmup is not None and warmup < 2))):
            raise ValueError(
                f"got 'drop' with selection.method 'hard', source {source!r} and warmup_passes "
                f"{warmup}: the first selection would see no example scored twice, so every "
                "example ties and hard top-k keeps the lowest ids; allowed: 'drop' with source "
                "'free' and warmup_passes >= 2, or a method that draws (soft, random, infobatch); "
                "fix: set warmup_passes: 2, or selection.method 'soft'/'infobatch', or score 'raw'")
        return score


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' LLM fine-tuning recipe: one full epoch recording losses, then the top 70%.
    "attent-simple": {
        "signal": "loss",
        "source": "free",
        "warmup_passes": 1,
        "ratio": {"schedule": "constant", "value": 0.7},
        "interval": {"schedule": "once"},
        "selection": {"method": "hard"},
    },
    # The shipped default, the safest policy measured on the protocol of docs/bench/PROTOCOL.md
    # (docs/BENCHMARKS.md §8b, §8c): losses z-scored within each source (code, prose, ...),
    # each source keeping its share of the budget, drawn by Gumbel-top-k on softmax(z / 2), so
    # an example one standard deviation above its source's mean is only e^0.5 = 1.65 times as
    # likely to be drawn as a typical one. Few passes (95M): ahead of random and of full data at
    # equal steps on a code + prose mixture (3 of 3 seeds), level on prose; 16M: ahead on both.
    # 8 passes over little data (95M): level with random (5 of 9 seeds), where attent-mix lost
    # 9 of 9; 12 passes: behind random (2 of 9), so such jobs should train on all the data.
    "attent-mild": {
        "signal": "loss",
        "source": "free",
        "warmup_passes": 1,
        "ratio": {"schedule": "constant", "value": 0.7},
        "interval": {"schedule": "fixed", "every": 1},
        "selection": {"method": "soft", "temperature": 2.0, "per_source": True},
    },
    # attent-mild at temperature 0.5 (the default of 2026-12-02 morning, §8): ahead of random
    # in every seed on the few-pass corpora and on the 95M mixture of §8, but behind it in 9 of
    # 9 seeds of the 95M data-constrained rerun of §8b (code, prose, mixture).
    "attent-mix": {
        "signal": "loss",
        "source": "free",
        "warmup_passes": 1,
        "ratio": {"schedule": "constant", "value": 0.7},
        "interval": {"schedule": "fixed", "every": 1},
        "selection": {"method": "soft", "temperature": 0.5, "per_source": True},
    },
    # The best policy of our first sweep (docs/BENCHMARKS.md §2b, 100M model, 8 passes): the paper's
    # recipe, but each pass draws a fresh Gumbel-top-70% on softmax(loss / 0.5) from the latest
    # free scores instead of keeping one hard top-70%. It beat attent-simple and random on both
    # seeds there; the benchmark harness names it soft-T0.5.
    "attent-soft": {
        "signal": "loss",
        "source": "free",
        "warmup_passes": 1,
        "ratio": {"schedule": "constant", "value": 0.7},
        "interval": {"schedule": "fixed", "every": 1},
        "selection": {"method": "soft", "temperature": 0.5},
    },
    # The authors' ViT pre-training cycles: incremental ratio and interval, soft selection,
    # re-scored by a full no-grad pass before every subset pass, full passes between rounds.
    "attent-complex": {
        "signal": "loss",
        "source": "pool",
        "warmup_passes": 1,
        "full_passes_per_round": 1,
        "ratio": {"schedule": "incremental", "start": 0.2, "end": 0.8},
        "interval": {"schedule": "incremental", "every": 1, "growth": 1, "max": 5},
        "selection": {"method": "soft", "temperature": 1.0, "resample_each_pass": True},
    },
    # Budget-matched control: the same ratio as attent-simple, drawn uniformly.
    "random": {
        "source": "free",
        "warmup_passes": 1,
        "ratio": {"schedule": "constant", "value": 0.7},
        "interval": {"schedule": "fixed", "every": 1},
        "selection": {"method": "random"},
    },
    # InfoBatch (Qin et al., ICLR 2024) at the random control's fixed budget: each pass keeps the
    # above-mean-loss examples, fills the rest uniformly from the others with their losses scaled
    # up, and the last pass is full (its annealing). Fixed pass sizes, unlike the original's
    # variable pruning: its budget-matched control is "random" with final_full_passes: 1.
    "infobatch": {
        "signal": "loss",
        "source": "free",
        "warmup_passes": 1,
        "final_full_passes": 1,
        "ratio": {"schedule": "constant", "value": 0.7},
        "interval": {"schedule": "fixed", "every": 1},
        "selection": {"method": "infobatch", "rescale": True},
    },
}


class ConfigError(ValueError):
    """Every problem of the ``attent`` section, one per line, each with key, value and fix."""


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed(err: dict) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for key, words in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in ctx:
            return f"allowed: a number {words} {ctx[key]}"
    return err["msg"]


def config_error(problems: list[str]) -> ConfigError:
    """One ConfigError listing ``problems`` (each 'attent.key: got ...; allowed ...; fix ...')."""
    return ConfigError(f"invalid '{SECTION}' section ({len(problems)} problem"
                       f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in (SECTION, *err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (value {err['input']!r}); remove it or check its spelling"
    if kind == "value_error":
        return f"{loc}: {err['msg'].removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{loc}: required key is missing; add it"
    return f"{loc}: got {err['input']!r}; {_allowed(err)}; fix: set {loc} to an allowed value"


def parse_attent(section: Optional[dict]) -> Optional[AttentConfig]:
    """Validate an ``attent`` section. Returns None when the teacher is off.

    Raises ConfigError listing every problem (not just the first).
    """
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: got {section!r}; allowed: a JSON object; fix: write "
                          f'"{SECTION}": {{"preset": "attent-simple"}} or remove the section')
    raw = dict(section)
    problems: list[str] = []
    preset = raw.get("preset")
    if preset is not None:
        if isinstance(preset, str) and preset in PRESETS:
            raw = _merge(PRESETS[preset], raw)
        else:
            problems.append(f"{SECTION}.preset: got {preset!r}; allowed: {sorted(PRESETS)} or null; "
                            "fix: pick one of them or remove the key")
            raw.pop("preset")
    try:
        cfg = AttentConfig.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors())
        cfg = None
    if problems:
        raise config_error(problems)
    return cfg if cfg.enabled else None


def split_deepspeed_config(config: dict | str | Path) -> tuple[dict, Optional[AttentConfig]]:
    """Split a DeepSpeed config (dict or JSON path) into (the plain DeepSpeed part, the teacher).

    The DeepSpeed part is exactly the user's config minus the ``attent`` key, so a job with the
    section removed runs the identical DeepSpeed setup.
    """
    if not isinstance(config, dict):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: the DeepSpeed config must be a JSON object, got "
                              f"{type(config).__name__}")
    ds_config = {k: v for k, v in config.items() if k != SECTION}
    return ds_config, parse_attent(config.get(SECTION))
