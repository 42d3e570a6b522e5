"""The planner's four answers, each as a JSON-ready result and the table ``tools/plan.py`` prints for it.

``run_model``: parameter counts (checked against the model built on the meta device) and FLOPs per token.
``run_compute``: Chinchilla sizing, predicted loss, wall-clock time and cost; a deadline on N GPUs as a budget.
``run_memory``: per-GPU memory of one layout. ``run_search``: the layouts that fit, ranked by the time of a step.

Each returns an ``Answer``; bad input raises ``PlanError`` (or ``ConfigError`` from a config) with a one-line message.
Formulas, conventions and JSON keys: docs/plan.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from megatron_lite.planning import inputs
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.flops import flops_per_processed_token
from megatron_lite.planning.inputs import LayoutOptions, ModelOptions, ModelSpec, Notes
from megatron_lite.planning.memory import estimate
from megatron_lite.planning.params import count_params, moe_of
from megatron_lite.planning.report import flops_convention, model_report
from megatron_lite.planning.scaling import (
    APPROACH_FITS,
    APPROACH_SOURCES,
    APPROACHES,
    BESIROGLU,
    HOFFMANN,
    PAPERS,
    SECONDS_PER_DAY,
    optimum,
    plan_compute,
    training_time,
)
from megatron_lite.planning.search import (
    DEFAULT_BATCH_TOKENS,
    Constraints,
    default_global_batch,
    search,
    smallest_footprint,
)
from megatron_lite.planning.steptime import LAYER_OVERHEAD_S, Network, tokens_per_sample
from megatron_lite.planning.units import GiB, duration, gib, human, seq_words, table


@dataclass
class ComputeOptions(ModelOptions):
    """``compute``: a budget (``flops``, or a deadline of ``days``/``hours`` on ``gpus``), ``params``/``tokens`` or a
    model; ``peak_flops`` None: the dense bf16 peak of ``gpu``."""

    days: float | None = None
    hours: float | None = None
    flops: float | None = None
    params: float | None = None
    tokens: float | None = None
    approach: str = "approach1"
    gpus: int | None = None
    gpu: str = "h100"
    mfu: float = 0.4
    peak_flops: float | None = None
    price_per_gpu_hour: float | None = None


@dataclass
class SearchOptions(LayoutOptions):
    """``search``: the layout options fix what they give (``Constraints``); ``mfu`` None: the calibrated curve."""

    mfu: float | None = None
    peak_flops: float | None = None
    intra_node_bandwidth: float = 300e9  # bytes/s per GPU (NVLink)
    inter_node_bandwidth: float = 25e9  # bytes/s per GPU (network)
    layer_overhead_us: float = LAYER_OVERHEAD_S * 1e6
    top: int = 10


@dataclass
class Answer:
    """A command's ``result`` (JSON-ready), its ``text`` table, and what to say besides: ``problem`` when the answer
    cannot be trusted (the command fails after printing it), ``warnings`` to print first."""

    result: Any
    text: str
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)


def _defaults_row(notes: Notes) -> list[tuple[str, str]]:
    return [("defaults", ", ".join(notes.defaults) if notes.defaults else "none (every setting given)")]


def run_model(opts: ModelOptions) -> Answer:
    """Parameter counts and FLOPs per token; a closed-form count that disagrees with the model code is a problem."""
    notes = Notes()
    spec, settings, name = inputs.load_model(opts)
    seq, target = inputs.lengths(opts, spec, settings, notes)
    r = model_report(spec, seq, name, target_len=target)
    r["defaults"] = list(notes.defaults)
    rows = [("model", f"{name} ({r['family']})"),
            ("params total", f"{r['params_total']:,} ({human(r['params_total'])})"),
            ("  embedding", f"{r['params_embedding']:,}"), ("  non-embedding", f"{r['params_non_embedding']:,}")]
    rows += [(f"  per {k} layer", f"{v:,}") for k, v in r["params_per_layer"].items()]
    if r["moe"]:
        m = r["moe"]
        shared = f" + {m['shared_experts']} shared" if m["shared_experts"] else ""
        rows += [("  routed experts", f"{r['params_routed_experts']:,} ({m['num_experts']} of width "
                                      f"{m['expert_ffn_size']:,}{shared}, top {m['top_k']}, in "
                                      f"{m['mixture_layers']} of {m['num_layers']} layers)"),
                 ("params active", f"{r['params_active']:,} ({human(r['params_active'])}) per token: all but the "
                                   "routed experts a token does not choose")]
    rows += [("vocab", f"{r['vocab_size']:,} padded to {r['padded_vocab_size']:,} "
                       f"(+{r['vocab_padding_params']:,} params; unpadded total {r['params_total_unpadded']:,})"),
             ("meta-device count", f"{r['params_meta']:,} ({'agrees' if r['counts_agree'] else 'DISAGREES'})"
              if r["params_meta"] is not None else "unavailable"),
             ("N for FLOPs", f"{r['params_flops']:,}" + (" (active parameters)" if r["moe"] else "")),
             (f"FLOPs/token @ {seq_words(seq, target)}",
              f"{r['flops_per_token']:.4g} (causal {r['flops_per_token_causal']:.4g})"),
             ("convention", r["flops_convention"])] + _defaults_row(notes)
    problem = None
    if r["counts_agree"] is False:
        problem = (f"the closed-form count (total {r['params_total']:,}, embedding {r['params_embedding']:,}) "
                   f"disagrees with the meta-device model (total {r['params_meta']:,}, embedding "
                   f"{r['params_meta_embedding']:,}); planning/params.py no longer matches the model code")
    return Answer(r, table(rows), problem, notes.warnings)


class _ComputeModel(NamedTuple):
    spec: ModelSpec
    name: str
    seq_len: int
    flops_per_token: float  # model FLOPs per processed token
    target_len: int | None


def _compute_model(opts: ComputeOptions, notes: Notes) -> _ComputeModel | None:
    """The model ``compute`` is given, or None."""
    if not (opts.preset or opts.config):
        if opts.seq_len is not None:
            raise PlanError("--seq-len needs a model (--preset or --config): the attention FLOPs depend on its shape")
        return None
    if opts.params is not None:
        raise PlanError("give --params or a model (--preset/--config), not both: the model fixes the parameters")
    spec, settings, name = inputs.load_model(opts)
    seq, target = inputs.lengths(opts, spec, settings, notes)
    return _ComputeModel(spec, name, seq, flops_per_processed_token(spec, seq, target), target)


def run_compute(opts: ComputeOptions) -> Answer:
    """Chinchilla sizing (C = 6PD, the fits' accounting) and, with a model, time in model FLOPs (the convention MFU
    is quoted in); a deadline on ``gpus`` is the budget they compute by then."""
    notes = Notes()

    def peak() -> float:  # looked up only where a time is asked: an unknown --gpu is fine without one
        return inputs.peak(opts.gpu, opts.peak_flops)

    if opts.price_per_gpu_hour is not None and opts.gpus is None:
        raise PlanError("--price-per-gpu-hour needs --gpus N (the cost is the GPU-hours of N GPUs times the price)")
    if opts.days is not None and opts.hours is not None:
        raise PlanError("give --days or --hours, not both")
    deadline_s = opts.days * SECONDS_PER_DAY if opts.days is not None else (
        opts.hours * 3600.0 if opts.hours is not None else None)
    if deadline_s is not None and opts.gpus is None:
        raise PlanError("--days/--hours need --gpus N: the budget is what N GPUs compute by the deadline")
    if deadline_s is not None and opts.flops is not None:
        raise PlanError("give --flops or a deadline (--days/--hours with --gpus), not both")
    model = _compute_model(opts, notes)
    params = count_params(model.spec).total if model else opts.params
    budget = None
    if deadline_s is not None:
        budget = opts.gpus * peak() * opts.mfu * deadline_s  # model FLOPs: MFU is quoted against them
    if budget is not None and not model and (opts.params is not None or opts.tokens is not None):
        raise PlanError("with a deadline give a model (--preset or --config) or neither --params nor --tokens: the "
                        "deadline fixes the compute")
    spend = budget if budget is not None else opts.flops  # model FLOPs to spend, when given
    if model and spend is not None and opts.tokens is None:
        r = plan_compute(params=params, tokens=spend / model.flops_per_token, approach=opts.approach)  # what it buys
    elif model and opts.tokens is None:
        r = plan_compute(params=params, approach=opts.approach)  # the model's compute-optimal tokens
    elif model and opts.flops is not None:
        raise PlanError("give --flops or --tokens with a model, not both")
    else:
        r = plan_compute(spend, params, opts.tokens, opts.approach)
    fit = APPROACH_FITS[opts.approach]
    if model:
        r.update(model=model.name, seq_len=model.seq_len, flops_per_token=model.flops_per_token,
                 flops_model=r["tokens"] * model.flops_per_token,
                 flops_convention=flops_convention(model.spec, model.seq_len, model.target_len))
    else:
        r.update(flops_model=None, flops_convention="6PD (no model shape: the attention term is not counted)")
    rows = [("compute C = 6PD", f"{r['flops']:.4g} FLOPs (Chinchilla's accounting, what the fits use)")]
    if model:
        rows.append(("model FLOPs", f"{r['flops_model']:.4g} = tokens x {model.flops_per_token:.4g} per token at "
                                    f"{seq_words(model.seq_len, model.target_len)} "
                                    f"({r['flops_model'] / r['flops'] - 1:+.1%} vs 6PD; {r['flops_convention']})"))
    rows += [("params P", f"{r['params']:.4g} ({human(r['params'])})"),
             ("tokens D", f"{r['tokens']:.4g} ({human(r['tokens'])})"),
             ("tokens/param", f"{r['tokens_per_param']:.1f}"),
             ("predicted loss", f"{r['loss']:.3f} (L(N, D) with the [{fit.paper}] constants below)"),
             ("headline", f"{r['approach']} optimum" if r["compute_optimal"] else "as given (not optimized)")]
    if budget is not None:
        r.update(deadline_s=deadline_s, budget_flops=budget)
        rows.insert(0, ("deadline", f"{deadline_s / SECONDS_PER_DAY:,.2f} days on {opts.gpus} x {opts.gpu} at "
                                    f"{opts.mfu:.0%} MFU = {budget:.4g} model FLOPs"))
        if model:
            opt = optimum(opts.approach, params=params)
            r["optimal_tokens"] = opt["tokens"]
            r["days_for_optimal_tokens"] = training_time(opt["tokens"] * model.flops_per_token, opts.gpus, peak(),
                                                         opts.mfu)["days"]
            rows.append((f"{opts.approach} tokens", f"{opt['tokens']:.4g} for this model, which would take "
                                                    f"{r['days_for_optimal_tokens']:,.2f} days"))
            best = optimum(opts.approach, flops=budget)
            r["optimum_for_budget"] = best
            rows.append(("optimum for it", f"{best['params']:.4g} params on {best['tokens']:.4g} tokens "
                                           f"({opts.approach}, the budget as 6PD)"))
        if not model:
            rows.append(("note", "the budget is spent as 6PD; a real shape also spends the attention term: give "
                                 "--preset or --config to count it"))
    if opts.gpus is not None:
        spent = r["flops_model"] if model else r["flops"]
        r.update(training_time(spent, opts.gpus, peak(), opts.mfu, opts.price_per_gpu_hour))
        label = "model FLOPs" if model else "6PD: no attention term; give --preset or --config to count it"
        rows += [("GPUs", f"{opts.gpus} x {opts.gpu} at {opts.mfu:.0%} MFU of {r['peak_flops']:.3g} FLOP/s"),
                 ("wall-clock", f"{r['days']:,.2f} days ({label})"), ("GPU-hours", f"{r['gpu_hours']:,.0f}")]
        if "cost" in r:
            rows.append(("cost", f"{r['cost']:,.0f} at {opts.price_per_gpu_hour:g}/GPU-hour"))
    if model:
        rows += _defaults_row(notes)
        r["defaults"] = list(notes.defaults)
    text = table(rows) + "\n\napproach        params        tokens       flops      loss\n"
    for k, v in r["approaches"].items():
        text += f"{k:<14}{v['params']:>10.3g}{v['tokens']:>14.3g}{v['flops']:>12.3g}{v['loss']:>10.3f}\n"
    text += "\nconstants: P_opt = K * C^a, D_opt = C / (6 P_opt); L(N, D) = E + A/N^alpha + B/D^beta\n"
    text += "".join(f"  [{key}] {paper}\n" for key, paper in PAPERS.items())
    for k, (K, a) in APPROACHES.items():
        paper, where = APPROACH_SOURCES[k]
        text += f"{k:<14}K={K:<9.4g} a={a:<7.4g} [{paper}] {where}\n"
    for fit in (HOFFMANN, BESIROGLU):
        text += (f"{'L(N, D)':<14}E={fit.E:g} A={fit.A:g} B={fit.B:g} alpha={fit.alpha:g} beta={fit.beta:g} "
                 f"[{fit.paper}] {fit.where}\n")
    return Answer(r, text.rstrip(), None, notes.warnings)


def run_memory(opts: LayoutOptions) -> Answer:
    """Per-GPU memory of one layout, by part and at its peak phase, and whether it fits."""
    notes = Notes()
    spec, settings, name = inputs.load_model(opts)
    layout = inputs.layout(opts, spec, settings, notes, least_global_batch=True)
    r = estimate(spec, layout, inputs.gpu_memory(opts.gpu, opts.gpu_memory))
    r["defaults"] = list(notes.defaults)
    b = r["breakdown"]
    grads = gib(b["gradients"])
    if b["fp32_gradients"]:
        grads += (f" (+ {gib(r['phases']['fp32_gradients'])} fp32 gradients the optimizer step makes, once the "
                  f"activations are freed: {gib(b['fp32_gradients'])} above the backward peak)")
    rows = [("layout", f"{layout.name()} {layout.dtype} {seq_words(layout.seq_len, layout.target_len)} "
                       f"{layout.schedule} (m={layout.num_microbatches})"),
            ("weights", gib(b["weights"])), ("gradients", grads), ("optimizer", gib(b["optimizer"])),
            ("activations", gib(b["activations"]))]
    moe = moe_of(spec)
    if moe is not None:
        held = f"{moe.num_experts // layout.ep} of {moe.num_experts} per mixture layer on each GPU (ep {layout.ep})"
        if layout.ep > 1:
            states = ("FSDP2 shards their states over" if layout.engine == "fsdp" else
                      "their states whole (outside ZeRO), their gradients reduced over")
            held += f"; {states} the {layout.expert_data} data ranks holding the same experts"
        rows.append(("experts", held))
    rows += [("overhead", gib(b["overhead"]) + (f" (of which {gib(r['phases']['gathered'])} gathered weights and "
                                                "their gradient)" if r["phases"]["gathered"] else "")),
             ("per GPU", f"{gib(r['per_gpu_bytes'])} (pipeline stage {r['most_loaded_stage']}, the most loaded; "
                         f"peak {r['peak_phase']})")]
    if r["cpu_bytes"]:
        rows.append(("host (offloaded)", f"{gib(r['cpu_bytes'])} per GPU, {gib(r['cpu_bytes_per_node'])} per node "
                                         f"of {min(layout.gpus, layout.gpus_per_node)} GPUs"))
    rows.append(("fits", f"{'yes' if r['fits'] else 'NO'} in {gib(r['gpu_memory'])}"))
    rows += _defaults_row(notes)
    return Answer(r, table(rows), None, notes.warnings)


def run_search(opts: SearchOptions) -> Answer:
    """The layouts that fit, ranked by the estimated time of one step of the same global batch; the layout options
    that are given fix that choice."""
    notes = Notes()
    spec, settings, name = inputs.load_model(opts)
    if opts.offload:
        raise PlanError("search neither enumerates nor times offloading; drop --offload and check an offloaded "
                        "layout with: plan.py memory --offload ...")
    settings.pop("offload", None)
    memory = inputs.gpu_memory(opts.gpu, opts.gpu_memory)
    base = inputs.layout(opts, spec, settings, notes)
    fixed = Constraints(tp=opts.tp, pp=opts.pp, cp=opts.cp, ep=opts.ep, engine="fsdp" if opts.fsdp else None,
                        zero=opts.zero, micro_batch=opts.micro_batch, recompute=opts.recompute)
    if opts.global_batch is not None:
        source = "--global-batch"
    elif settings.get("global_batch") is not None:
        source = "the config's training batch"
    else:
        base.global_batch = default_global_batch(spec, base, fixed.micro_batch)
        source = f"default: about {DEFAULT_BATCH_TOKENS:,} tokens, rounded to a multiple of the {opts.gpus} GPUs"
    net = Network(opts.intra_node_bandwidth, opts.inter_node_bandwidth)
    rows = search(spec, base, memory, inputs.peak(opts.gpu, opts.peak_flops, base.dtype), opts.mfu, net, opts.top,
                  fixed, opts.layer_overhead_us * 1e-6)
    for row in rows:
        row["global_batch_source"] = source
        row["defaults"] = list(notes.defaults)
    per_sample = tokens_per_sample(spec, base)
    head = (f"{name} on {opts.gpus} GPUs with {gib(memory)} each, {base.dtype}, "
            f"{seq_words(base.seq_len, base.target_len)}: global batch "
            f"{base.global_batch:,} x {per_sample:,} = {base.global_batch * per_sample:,} tokens per step ({source})")
    if fixed.flags():
        head += f"\nconstraints: {fixed.flags()}"
    if notes.defaults:
        head += f"\ndefaults: {', '.join(d for d in notes.defaults if not d.startswith('micro-batch'))}"
    if not rows:
        need = smallest_footprint(spec, base, fixed)
        return Answer(rows, f"{head}\nno layout fits: the smallest needs {gib(need)} per GPU", None, notes.warnings)
    lines = [head, "ranked by the estimated time of that step (docs/plan.md, search); only layouts training runs",
             f"{'tp':>3}{'pp':>4}{'cp':>4}{'dp':>5}{'ep':>4}  {'engine':<7}{'mb':>4}{'m':>6}  {'recompute':<13}"
             f"{'GiB/GPU':>9}"
             f"{'step':>10}{'tok/s':>12}{'MFU':>7}"]
    for x in rows:
        lay = x["layout"]
        eng = "fsdp" if lay["engine"] == "fsdp" else f"zero{lay['zero']}"
        lines.append(f"{lay['tp']:>3}{lay['pp']:>4}{lay.get('cp', 1):>4}{lay['dp']:>5}{lay.get('ep', 1):>4}  {eng:<7}"
                     f"{lay['micro_batch']:>4}"
                     f"{lay['num_microbatches']:>6}  {lay['recompute']:<13}{x['per_gpu_bytes'] / GiB:>9.1f}"
                     f"{duration(x['step_time_s']):>10}{x['tokens_per_s']:>12,.0f}{x['mfu']:>7.1%}")
    return Answer(rows, "\n".join(lines), None, notes.warnings)
