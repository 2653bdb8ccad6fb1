"""AutoNAT's generation-strategy search: per-step mask ratios, mask temperatures, sampling temperatures and guidance
scales, optimised by a zeroth-order gradient estimate with SGD and momentum, against a pluggable metric.

    # the Shapes model, ShapesEval accuracy on 100 seen prompts, from its own schedule expanded at 4 steps
    # (examples/shapes/strategy_t4.json; steps and learning rates scaled to an accuracy in % on 100 prompts)
    python examples/search_strategy.py search --model pretrained/enat-shapes --steps 4 --metric shapes \\
        --num-prompts 100 --ratio-delta 0.05 --delta 0.5 --ratio-lr 2e-4 --lr 0.02 --max-minutes 24 \\
        --output strategy_t4.json --log search_t4.jsonl

    # FID against reference statistics, from AutoNAT's initialisation, on every process accelerate starts
    accelerate launch examples/search_strategy.py search --model enat-l-256 --steps 8 --init autonat \\
        --metric fid --reference-stats fid_stats_imagenet256.npz --inception-weights pt_inception.pth \\
        --num-images 10000 --output strategy_t8.json --log search_t8.jsonl

    # ShapesEval of a strategy (or, without --scheduler-config, of the model's schedule) on 500 + 500 prompts
    python examples/search_strategy.py evaluate --model pretrained/enat-shapes --steps 4 \\
        --scheduler-config strategy_t4.json --num-prompts 500

The search follows AutoNAT's `train.py` (`DisPatcher`): the strategy is the vector (mask ratios, mask temperatures,
sampling temperatures, guidance scales). Each iteration estimates the gradient of the loss (the metric, negated when
higher is better) by one-sided finite differences, one coordinate at a time (by default ratios +0.01, the rest
+0.1), takes one SGD step with momentum (by default 0.5, learning rate 1e-3 for the ratios and 0.1 for the rest: tuned
for FID; scale them to the metric), clips (ratios into [0, 0.99], the rest to >= 1e-4) and evaluates the new
strategy. Where this scheduler needs more than the original's clipping, the
ratios are also kept strictly decreasing, by at least 1 / (number of tokens): the original's sampler instead clamps
every step to reveal at least one token and keep one masked. The best strategy evaluated so far (never a perturbed
one) is written in the scheduler's config format:

    MaskedTokenScheduler.from_config(pipe.scheduler.config, **json.load(open("strategy_t4.json")))

Every evaluation (base or perturbed) is one line of the --log JSONL file. The images of an evaluation are split over
the processes by whole batches, so the result does not depend on how many processes run it.
"""

import argparse
import copy
import datetime
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from enat_diffusers import ENATPipeline, MaskedTokenScheduler
from enat_diffusers.evaluation.shapes import ShapesEval, evaluation_prompts, format_report, max_evaluation_prompts
from enat_diffusers.schedulers.scheduling_masked_token import STEP_LISTS
from enat_diffusers.utils.cli import (
    UsageError,
    add_debug_argument,
    check_output_file,
    load_pipeline,
    positive_int,
    report_errors,
    resolve_device,
    write_json_atomically,
)


# the order of the search vector, as AutoNAT's; STEP_LISTS: how many steps each list lacks (T - 1 or T values)
STRATEGY_KEYS = ("mask_ratios", "mask_temperatures", "sampling_temperatures", "guidance_scales")
# AutoNAT's strategy files (configs/AutoNAT_L-T8_strategy.yaml) -> this scheduler's config
AUTONAT_KEYS = {
    "manual_ratios": "mask_ratios",
    "manual_temp": "mask_temperatures",
    "manual_samp_temp": "sampling_temperatures",
    "manual_cfg": "guidance_scales",
}
MAX_RATIO = 0.99  # the original's clip of the ratios
MIN_VALUE = 1e-4  # the original's clip of temperatures and guidance scales

Strategy = Dict[str, List[float]]
Metric = Callable[[Optional[ENATPipeline], Strategy], float]


# ------------------------------------------------------------------------------------------------------ strategies


def expand_schedule(scheduler: MaskedTokenScheduler, num_steps: int) -> Strategy:
    """The per-step lists of `scheduler` at `num_steps` steps (ENAT's formulas, or its own lists), as explicit lists in
    the config format: `MaskedTokenScheduler.from_config(scheduler.config, **lists)` samples the same ids."""
    schedule = copy.deepcopy(scheduler)
    schedule.set_timesteps(num_steps)
    return {
        "mask_ratios": schedule.step_mask_ratios[:-1],
        "mask_temperatures": schedule.step_mask_temperatures[:-1],
        "sampling_temperatures": schedule.step_sampling_temperatures,
        "guidance_scales": schedule.step_guidance_scales,
    }


def autonat_init(num_steps: int) -> Strategy:
    """AutoNAT's starting point: cosine ratios, mask temperatures falling linearly from 1 (to 2 / T), sampling
    temperatures 1, guidance rising linearly to 1 (from 1 / T)."""
    grid = np.linspace(0, 1, num_steps + 1)
    return {
        "mask_ratios": np.cos(grid * math.pi / 2)[1:-1].tolist(),
        "mask_temperatures": (1 - grid)[:-2].tolist(),
        "sampling_temperatures": [1.0] * num_steps,
        "guidance_scales": grid[1:].tolist(),
    }


def strategy_num_steps(strategy: Strategy) -> int:
    """The number of steps of a complete strategy; `ValueError` when its lists disagree or one is missing."""
    missing = [key for key in STRATEGY_KEYS if strategy.get(key) is None]
    if missing:
        raise ValueError(f"The strategy has no {', '.join(missing)}.")
    counts = {len(strategy[key]) + STEP_LISTS[key] for key in STRATEGY_KEYS}
    if len(counts) != 1 or counts == {1}:
        raise ValueError(
            "A strategy needs T - 1 mask_ratios and mask_temperatures and T sampling_temperatures and "
            f"guidance_scales, T >= 2; got {', '.join(f'{len(strategy[k])} {k}' for k in STRATEGY_KEYS)}."
        )
    return counts.pop()


def load_strategy(path: Path, scheduler: MaskedTokenScheduler) -> Strategy:
    """A strategy file: a scheduler config JSON (lists that are missing or null come from `scheduler`'s schedule
    expanded at the file's number of steps) or an AutoNAT strategy YAML (`manual_ratios`, `manual_temp`,
    `manual_samp_temp`, `manual_cfg`)."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        content = json.loads(text)
    else:
        import yaml

        content = yaml.safe_load(text)
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds no mapping of strategy lists.")
    content = {AUTONAT_KEYS.get(key, key): value for key, value in content.items()}
    lists = {
        key: [float(v) for v in (value if isinstance(value, list) else [value])]  # AutoNAT writes 1-lists as scalars
        for key, value in content.items()
        if key in STRATEGY_KEYS and value is not None
    }
    counts = {len(values) + STEP_LISTS[key] for key, values in lists.items()}
    if len(counts) != 1:
        raise ValueError(f"{path}: the strategy lists are missing or disagree on the number of steps.")
    strategy = {**expand_schedule(scheduler, counts.pop()), **lists}
    strategy_num_steps(strategy)
    return strategy


def flatten(strategy: Strategy) -> np.ndarray:
    """The search vector: mask ratios, mask temperatures, sampling temperatures, guidance scales (float64)."""
    return np.concatenate([np.asarray(strategy[key], dtype=np.float64) for key in STRATEGY_KEYS])


def unflatten(vector: np.ndarray, num_steps: int) -> Strategy:
    """Inverse of `flatten`."""
    splits = np.cumsum([num_steps - STEP_LISTS[key] for key in STRATEGY_KEYS[:-1]])
    return {key: part.tolist() for key, part in zip(STRATEGY_KEYS, np.split(np.asarray(vector, float), splits))}


def coordinate_names(num_steps: int) -> List[str]:
    """`mask_ratios[0]`, ...: the name of every coordinate of the search vector."""
    return [f"{key}[{i}]" for key in STRATEGY_KEYS for i in range(num_steps - STEP_LISTS[key])]


def non_increasing(values: np.ndarray) -> np.ndarray:
    """The closest (least-squares) non-increasing sequence: pool adjacent violators."""
    sums, counts = [], []  # blocks of pooled values
    for value in values:
        sums.append(float(value))
        counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] < sums[-1] / counts[-1]:
            total, count = sums.pop(), counts.pop()
            sums[-1] += total
            counts[-1] += count
    return np.repeat(np.divide(sums, counts), counts)


def clip_ratios(ratios: np.ndarray, min_gap: float) -> np.ndarray:
    """The closest ratios that decrease by at least `min_gap` per step within `[min_gap, 0.99]`: the original's clip
    into [0, 0.99] made strictly monotone (the least-squares projection onto that set)."""
    offsets = min_gap * np.arange(len(ratios))  # r_i - r_{i+1} >= gap  <=>  r_i + i * gap is non-increasing
    shifted = np.clip(non_increasing(np.asarray(ratios, float) + offsets), len(ratios) * min_gap, MAX_RATIO)
    return shifted - offsets


def clip_vector(vector: np.ndarray, num_steps: int, min_gap: float) -> np.ndarray:
    """The search vector made valid: ratios by `clip_ratios`, temperatures and guidance scales >= 1e-4."""
    ratios, rest = np.split(np.asarray(vector, dtype=np.float64), [num_steps - 1])
    return np.concatenate([clip_ratios(ratios, min_gap), np.maximum(rest, MIN_VALUE)])


def coordinate_bounds(vector: np.ndarray, index: int, num_steps: int, min_gap: float) -> (float, float):
    """The interval a coordinate may move in while the others stay and the vector stays valid."""
    last = num_steps - 2  # index of the last ratio
    if index > last:
        return MIN_VALUE, math.inf
    low = vector[index + 1] + min_gap if index < last else min_gap
    high = vector[index - 1] - min_gap if index > 0 else MAX_RATIO
    return low, high


# ---------------------------------------------------------------------------------------------------------- search


class StrategySearch:
    r"""
    AutoNAT's search (`train.py`, `DisPatcher`) of a `T`-step strategy against `metric(pipeline, strategy) -> float`.

    One iteration (`step`):

    1. Gradient of the loss `L` (the metric, negated when `mode="max"`) at the current strategy `x`, one coordinate
       at a time: `g_i = (L(x + d_i e_i) - L(x)) / d_i` with `d_i = ratio_delta` (mask ratios) or `delta` (the rest),
       one-sided, not antithetic; `T - 1 + T - 1 + T + T` evaluations. Where `+d_i` would leave the valid set the step
       is shortened to fit, or taken downwards if that moves further (the original clamps it into [0, 1] and
       [1e-4, inf)); a coordinate that cannot move gets `g_i = 0` and no evaluation.
    2. Optionally `g` clamped to `[-clip_grad, clip_grad]`; one step of `torch.optim.SGD` with `momentum`, learning
       rate `ratio_lr` for the ratios and `lr` for the rest (the original's two parameter groups).
    3. Clip (`clip_vector`): ratios into [0, 0.99] and strictly decreasing (by `min_ratio_gap`), the rest >= 1e-4.
    4. Evaluate the new strategy: the base value of the next iteration.

    Args:
        metric: `metric(pipeline, strategy)`, `strategy` a dict of the four lists (the config format).
        pipeline: Passed to the metric (may be `None` for metrics that do not use it).
        init (`Strategy`): The starting strategy; it is clipped first.
        mode (`str`): `"max"` (accuracy) or `"min"` (FID).
        min_ratio_gap (`float`): Smallest decrease between consecutive mask ratios, and the smallest last ratio;
            `1 / num_tokens` keeps every step revealing and keeping masked at least one token.
        ratio_lr, lr, momentum, ratio_delta, delta, clip_grad: See above; the defaults are the original's.
        on_evaluation (`Callable[[dict], None]`, *optional*): Receives the record of every evaluation.
    """

    def __init__(
        self,
        metric: Metric,
        pipeline: Optional[ENATPipeline],
        init: Strategy,
        mode: str = "max",
        min_ratio_gap: float = 0.0,
        ratio_lr: float = 1e-3,
        lr: float = 0.1,
        momentum: float = 0.5,
        ratio_delta: float = 0.01,
        delta: float = 0.1,
        clip_grad: Optional[float] = None,
        on_evaluation: Optional[Callable[[dict], None]] = None,
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.metric, self.pipeline, self.mode = metric, pipeline, mode
        self.num_steps = strategy_num_steps(init)
        self.min_ratio_gap, self.clip_grad = min_ratio_gap, clip_grad
        self.deltas = np.array([ratio_delta] * (self.num_steps - 1) + [delta] * (3 * self.num_steps - 1))
        self.names = coordinate_names(self.num_steps)
        vector = torch.from_numpy(clip_vector(flatten(init), self.num_steps, min_ratio_gap))
        self.ratios = torch.nn.Parameter(vector[: self.num_steps - 1].clone())
        self.rest = torch.nn.Parameter(vector[self.num_steps - 1 :].clone())
        self.optimizer = torch.optim.SGD(
            [{"params": [self.ratios], "lr": ratio_lr}, {"params": [self.rest], "lr": lr}], momentum=momentum
        )
        self.on_evaluation = on_evaluation
        self.iteration = 0
        self.num_evaluations = 0
        self.value = None  # metric at the current strategy
        self.best = None  # {"iteration", "value", "strategy"}

    @property
    def vector(self) -> np.ndarray:
        return torch.cat([self.ratios.detach(), self.rest.detach()]).numpy().copy()

    @property
    def strategy(self) -> Strategy:
        return unflatten(self.vector, self.num_steps)

    def loss(self, value: float) -> float:
        return -value if self.mode == "max" else value

    def evaluate(self, vector: np.ndarray, candidate: str, displacement: Optional[float] = None) -> float:
        """The metric of one strategy vector, recorded."""
        strategy = unflatten(vector, self.num_steps)
        start = time.perf_counter()
        value = float(self.metric(self.pipeline, strategy))
        self.num_evaluations += 1
        if self.on_evaluation is not None:
            self.on_evaluation(
                {
                    "evaluation": self.num_evaluations,
                    "iteration": self.iteration,
                    "candidate": candidate,
                    "displacement": displacement,
                    "value": value,
                    "seconds": round(time.perf_counter() - start, 3),
                    "time": datetime.datetime.now().isoformat(timespec="seconds"),
                    "strategy": strategy,
                }
            )
        return value

    def start(self):
        """Evaluates the starting strategy (once)."""
        if self.value is None:
            self.value = self.evaluate(self.vector, "base")
            self.best = {"iteration": 0, "value": self.value, "strategy": self.strategy}

    def perturbed_value(self, vector: np.ndarray, index: int) -> float:
        """Coordinate `index` moved for its finite difference: `+delta`, else as far as it can go, up or down."""
        low, high = coordinate_bounds(vector, index, self.num_steps, self.min_ratio_gap)
        value, delta = vector[index], self.deltas[index]
        if high - value >= delta:
            return value + delta
        up, down = max(high, value), min(max(value - delta, low), value)
        return up if up - value >= value - down else down

    def estimate_gradient(self) -> np.ndarray:
        """The forward-difference gradient of the loss at the current strategy."""
        self.start()
        vector, base_loss = self.vector, self.loss(self.value)
        gradient = np.zeros_like(vector)
        for index, name in enumerate(self.names):
            perturbed = vector.copy()
            perturbed[index] = self.perturbed_value(vector, index)
            displacement = perturbed[index] - vector[index]
            if displacement == 0:
                continue
            value = self.evaluate(perturbed, name, displacement)
            gradient[index] = (self.loss(value) - base_loss) / displacement
        return gradient

    def step(self) -> (float, float):
        """One iteration; returns the metric before and after it."""
        self.start()
        before = self.value
        gradient = torch.from_numpy(self.estimate_gradient())
        if self.clip_grad is not None:
            gradient = gradient.clamp(-self.clip_grad, self.clip_grad)
        split = self.num_steps - 1
        self.ratios.grad, self.rest.grad = gradient[:split].clone(), gradient[split:].clone()
        self.optimizer.step()
        clipped = torch.from_numpy(clip_vector(self.vector, self.num_steps, self.min_ratio_gap))
        with torch.no_grad():
            self.ratios.copy_(clipped[:split])
            self.rest.copy_(clipped[split:])
        self.iteration += 1
        self.value = self.evaluate(self.vector, "base")
        if self.loss(self.value) < self.loss(self.best["value"]):
            self.best = {"iteration": self.iteration, "value": self.value, "strategy": self.strategy}
        return before, self.value


# --------------------------------------------------------------------------------------------------------- metrics


def strategy_scheduler(pipe: ENATPipeline, strategy: Strategy) -> MaskedTokenScheduler:
    """The pipeline's scheduler with the strategy's lists. (They are passed as keyword arguments: `from_config` drops
    the keys that the config of a scheduler built in Python lists in `_use_default_values`.)"""
    return MaskedTokenScheduler.from_config(pipe.scheduler.config, **strategy)


class _Sharded:
    """Splits the images of an evaluation over processes by whole batches (a batch is computed the same way whatever
    the number of processes) and gathers the per-batch results in batch order."""

    def __init__(self, num_items: int, batch_size: int, accelerator=None):
        self.batches = [(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]
        self.rank, self.world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)

    def map(self, function) -> list:
        """`[function(start, end) for every batch]`, each batch computed on one process."""
        mine = [(i, function(*batch)) for i, batch in enumerate(self.batches) if i % self.world == self.rank]
        if self.world > 1:
            from accelerate.utils import gather_object

            mine = gather_object(mine)
        return [result for _, result in sorted(mine, key=lambda item: item[0])]


class ShapesAccuracy:
    r"""
    ShapesEval whole-prompt accuracy in % (higher is better) of a Shapes text-to-image pipeline, with common random
    numbers: the same prompts and the same per-image seeds (image `i`: `seed + i`, as `ShapesEval.evaluate_pipeline`)
    for every strategy, so that differences between strategies are not seed noise.

    Args:
        prompts (`List[str]`): e.g. `evaluation_prompts(100, seed=1)`, seen prompts of another seed than the reported
            ones (as `examples/shapes/sampling_sweep.py` does).
        batch_size (`int`), seed (`int`), reuse_features (`bool`, *optional*): Generation settings (reuse: where
            the model has it).
        accelerator (`accelerate.Accelerator`, *optional*): Splits the batches over its processes.
    """

    mode = "max"

    def __init__(self, prompts: List[str], batch_size: int = 50, seed: int = 0, reuse_features=None, accelerator=None):
        self.prompts, self.seed, self.reuse_features = list(prompts), seed, reuse_features
        self.evaluator = ShapesEval()
        self.shards = _Sharded(len(self.prompts), batch_size, accelerator)

    def correct(self, pipe: ENATPipeline, strategy: Strategy) -> List[bool]:
        """Whether each prompt's image passes ShapesEval."""
        scheduler, pipe.scheduler = pipe.scheduler, strategy_scheduler(pipe, strategy)
        try:

            def batch(start, end):
                report = self.evaluator.evaluate_pipeline(
                    pipe,
                    self.prompts[start:end],
                    num_inference_steps=strategy_num_steps(strategy),
                    batch_size=end - start,
                    seed=self.seed + start,
                    reuse_features=self.reuse_features,
                )
                return [result["correct"] for result in report["results"]]

            with torch.inference_mode():
                return [flag for flags in self.shards.map(batch) for flag in flags]
        finally:
            pipe.scheduler = scheduler

    def __call__(self, pipe: ENATPipeline, strategy: Strategy) -> float:
        correct = self.correct(pipe, strategy)
        return 100 * sum(correct) / len(correct)


class FIDScore:
    r"""
    FID (lower is better) of `num_images` generated images against reference statistics (`mu` and `sigma` of an
    `.npz`), with the FID Inception of a local weights file (`enat_diffusers.evaluation.fid`: `load_statistics`,
    `load_inception`, `to_uint8`, `frechet_distance`). Image `i` is generated with seed `seed + i` and condition
    `conditions[i % len(conditions)]` (class ids or prompts).
    """

    mode = "min"

    def __init__(
        self,
        conditions: list,
        num_images: int,
        reference_stats: str,
        inception_weights: str,
        batch_size: int = 50,
        seed: int = 0,
        accelerator=None,
    ):
        from enat_diffusers.evaluation import fid

        self.fid, self.conditions, self.num_images, self.seed = fid, list(conditions), num_images, seed
        self.device = "cpu" if accelerator is None else accelerator.device
        self.reference = fid.load_statistics(reference_stats)
        self.inception = fid.load_inception(inception_weights, self.device)
        self.shards = _Sharded(num_images, batch_size, accelerator)

    def features(self, pipe: ENATPipeline, strategy: Strategy) -> np.ndarray:
        """The Inception pool features `(num_images, 2048)` of the images generated with `strategy`."""
        scheduler, pipe.scheduler = pipe.scheduler, strategy_scheduler(pipe, strategy)
        key = "class_labels" if isinstance(self.conditions[0], int) else "prompt"

        def batch(start, end):
            images = pipe(
                **{key: [self.conditions[i % len(self.conditions)] for i in range(start, end)]},
                num_inference_steps=strategy_num_steps(strategy),
                generator=[torch.Generator().manual_seed(self.seed + i) for i in range(start, end)],
                output_type="pt",
            ).images
            return self.inception(self.fid.to_uint8(images).to(self.device))[0].cpu().numpy()

        try:
            with torch.inference_mode():
                return np.concatenate(self.shards.map(batch))
        finally:
            pipe.scheduler = scheduler

    def __call__(self, pipe: ENATPipeline, strategy: Strategy) -> float:
        return self.fid.frechet_distance(self.features(pipe, strategy), *self.reference)


# ------------------------------------------------------------------------------------------------------------- CLI


def _load_pipeline(model: str, device) -> ENATPipeline:
    pipe = load_pipeline(ENATPipeline, model).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _initial_strategy(args, pipe: ENATPipeline) -> Strategy:
    if args.init in ("default", "autonat"):
        steps = args.steps or 8
        return expand_schedule(pipe.scheduler, steps) if args.init == "default" else autonat_init(steps)
    strategy = load_strategy(Path(args.init), pipe.scheduler)
    if args.steps is not None and strategy_num_steps(strategy) != args.steps:
        raise ValueError(f"{args.init} is a {strategy_num_steps(strategy)}-step strategy, not {args.steps}.")
    return strategy


def _build_metric(args, pipe: ENATPipeline, accelerator):
    if args.metric == "shapes":
        prompts = evaluation_prompts(args.num_prompts, seed=args.prompt_seed, held_out=False)
        return ShapesAccuracy(prompts, args.batch_size, args.seed, accelerator=accelerator)
    if not (args.reference_stats and args.inception_weights):
        raise ValueError("--metric fid needs --reference-stats and --inception-weights.")
    if args.prompts:
        conditions = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    elif pipe.is_text_to_image:
        raise ValueError("--metric fid on a text-to-image model needs --prompts.")
    else:  # every class equally often, in class order: ENAT's evaluation labels (as examples/evaluate.py)
        num_classes = pipe.transformer.config.num_classes
        conditions = [i * num_classes // args.num_images for i in range(args.num_images)]
    stats, weights = args.reference_stats, args.inception_weights
    return FIDScore(conditions, args.num_images, stats, weights, args.batch_size, args.seed, accelerator)


def run_search(args):
    from accelerate import Accelerator

    inputs = [args.model, args.init, args.reference_stats, args.inception_weights, args.prompts]
    check_output_file(args.output, inputs, "--output", args.overwrite)
    check_output_file(args.log, inputs, "--log", args.overwrite)
    if Path(args.output).absolute() == Path(args.log).absolute():
        raise UsageError("--output and --log name the same file")
    accelerator = Accelerator(cpu=args.cpu)
    main_process = accelerator.is_main_process
    pipe = _load_pipeline(args.model, accelerator.device)
    metric = _build_metric(args, pipe, accelerator)
    init = _initial_strategy(args, pipe)
    num_tokens = pipe.transformer.config.sample_size**2 // pipe.token_patch_size**2  # units: token groups
    say = print if main_process else (lambda *a, **k: None)

    log = open(args.log, "w") if main_process else None  # one line per evaluation, as it happens

    def record(entry):
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    search = StrategySearch(
        metric,
        pipe,
        init,
        mode=metric.mode,
        min_ratio_gap=1 / num_tokens,
        ratio_lr=args.ratio_lr,
        lr=args.lr,
        momentum=args.momentum,
        ratio_delta=args.ratio_delta,
        delta=args.delta,
        clip_grad=args.clip_grad,
        on_evaluation=record,
    )

    def write_best():  # replaced whole, never left half-written
        if main_process:
            write_json_atomically(args.output, search.best["strategy"])

    unit = " %" if args.metric == "shapes" else ""
    started = time.perf_counter()
    search.start()
    write_best()
    say(f"{search.num_steps} steps, {len(search.names)} coordinates; start: {search.value:.2f}{unit}", flush=True)
    last_seconds = 0.0
    for _ in range(args.iterations):
        elapsed = time.perf_counter() - started
        if args.max_minutes is not None and elapsed + last_seconds > 60 * args.max_minutes:
            say(f"stopping: another iteration would pass --max-minutes {args.max_minutes:g}")
            break
        before, after = search.step()
        last_seconds = time.perf_counter() - started - elapsed
        write_best()
        best = search.best
        say(
            f"iteration {search.iteration}: {before:.2f}{unit} -> {after:.2f}{unit}  (best {best['value']:.2f}{unit} "
            f"at iteration {best['iteration']}; {search.num_evaluations} evaluations, {last_seconds:.0f} s)",
            flush=True,
        )
    if log is not None:
        log.close()
    say(f"best: {search.best['value']:.2f}{unit} at iteration {search.best['iteration']}, written to {args.output}")
    say(json.dumps(search.best["strategy"]))


def run_evaluate(args):
    if args.json:
        check_output_file(args.json, [args.model, args.scheduler_config], "--json", args.overwrite)
    pipe = _load_pipeline(args.model, resolve_device(args.device))
    if args.scheduler_config:
        strategy = load_strategy(Path(args.scheduler_config), pipe.scheduler)
        pipe.scheduler = strategy_scheduler(pipe, strategy)
        steps = strategy_num_steps(strategy)
        if args.steps is not None and args.steps != steps:
            raise ValueError(f"{args.scheduler_config} is a {steps}-step strategy, not {args.steps}.")
    else:
        steps = args.steps or 8
    seen = evaluation_prompts(args.num_prompts, args.seed, held_out=False)
    unseen = evaluation_prompts(args.num_prompts, args.seed, held_out=True)
    with torch.inference_mode():
        report = ShapesEval().evaluate_pipeline(
            pipe, seen + unseen, [False] * len(seen) + [True] * len(unseen), steps, args.batch_size, args.seed
        )
    source = args.scheduler_config or "the model's schedule"
    print(f"ShapesEval of {args.model} with {source}: {steps} steps, {args.num_prompts} + {args.num_prompts} prompts")
    print(format_report(report))
    if args.json:
        write_json_atomically(args.json, {"steps": steps, "strategy": source, **report})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="search a strategy")
    evaluate = commands.add_parser("evaluate", help="ShapesEval of a strategy on seen and held-out prompts")
    for sub in (search, evaluate):
        sub.add_argument("--model", required=True, help="an ENATPipeline folder or Hub repo id")
        sub.add_argument("--steps", type=positive_int, help="decoding steps (default: the strategy file's, else 8)")
        sub.add_argument("--batch-size", type=positive_int, default=50, help="images per pipeline call")
        sub.add_argument("--overwrite", action="store_true", help="replace existing output files")
        add_debug_argument(sub)

    search.add_argument(
        "--init",
        default="default",
        help="'default': the model's scheduler expanded to per-step lists; 'autonat': AutoNAT's initialisation "
        "(cosine ratios, linear temperatures and guidance); or a strategy file (scheduler config JSON, or AutoNAT "
        "YAML with manual_ratios/manual_temp/manual_samp_temp/manual_cfg)",
    )
    search.add_argument("--metric", choices=("shapes", "fid"), default="shapes", help="ShapesEval accuracy or FID")
    search.add_argument("--output", required=True, help="JSON file for the best strategy (scheduler config format)")
    search.add_argument("--log", required=True, help="JSONL file, one line per evaluation")
    search.add_argument("--iterations", type=int, default=100, help="SGD updates (the original's max_upd)")
    search.add_argument("--max-minutes", type=float, help="start no iteration that would end after this")
    search.add_argument("--ratio-lr", type=float, default=1e-3, help="learning rate of the mask ratios")
    search.add_argument("--lr", type=float, default=0.1, help="learning rate of temperatures and guidance scales")
    search.add_argument("--momentum", type=float, default=0.5, help="SGD momentum")
    search.add_argument("--ratio-delta", type=float, default=0.01, help="finite-difference step of the mask ratios")
    search.add_argument("--delta", type=float, default=0.1, help="finite-difference step of the rest")
    search.add_argument("--clip-grad", type=float, help="clamp every gradient coordinate to [-C, C]")
    search.add_argument("--seed", type=int, default=0, help="image i of every evaluation uses seed + i")
    search.add_argument("--num-prompts", type=positive_int, default=100, help="shapes: seen prompts per evaluation")
    search.add_argument("--prompt-seed", type=int, default=1, help="shapes: seed of the validation prompts")
    search.add_argument("--num-images", type=positive_int, default=10000, help="fid: images per evaluation")
    search.add_argument("--reference-stats", help="fid: .npz with the reference mu and sigma")
    search.add_argument("--inception-weights", help="fid: local Inception weights file")
    search.add_argument(
        "--prompts", help="fid: file of prompts, one per line, cycled (default: the model's classes, balanced)"
    )
    search.add_argument("--cpu", action="store_true", help="run on the CPU even where accelerate finds a GPU")

    evaluate.add_argument("--scheduler-config", help="strategy file (JSON or AutoNAT YAML); default: the model's")
    evaluate.add_argument(
        "--num-prompts", type=positive_int, default=500, help="seen prompts, and as many held-out ones"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the prompts; image i uses seed + i")
    evaluate.add_argument("--device", help="default: cuda if available, else cpu")
    evaluate.add_argument("--json", help="write the report (every image's check too) to this JSON file")
    args = parser.parse_args(argv)
    if args.num_prompts > max_evaluation_prompts() and (args.command == "evaluate" or args.metric == "shapes"):
        parser.error(f"--num-prompts: the validation split has {max_evaluation_prompts()} held-out captions at most")
    with report_errors(args.debug):
        run_search(args) if args.command == "search" else run_evaluate(args)


if __name__ == "__main__":
    main()
