"""`celora` command line: run | compare | comm | report | eval | generate | attack | config | models | datasets |
flower-sim."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from celora.errors import CeloraError  # noqa: E402
from celora.eval import MetricSpec, score_headline  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning with tri-matrix LoRA.")
console = Console()
err_console = Console(stderr=True)


class RichObserver:
    """Progress bars for rounds and clients, plus messages (e.g. rejected payloads)."""

    def __init__(self, progress: Progress, rounds: int) -> None:
        self.progress = progress
        self.round_task = progress.add_task("rounds", total=rounds)
        self.client_task = progress.add_task("clients", total=0)

    def on_round_start(self, rnd: int, clients: list[int]) -> None:
        self.progress.reset(self.client_task, total=len(clients), description=f"round {rnd}: clients")

    def on_client_done(self, rnd: int, client: int, record: Any) -> None:
        self.progress.advance(self.client_task)

    def on_round_end(self, rnd: int, metrics: dict[str, Any]) -> None:
        self.progress.advance(self.round_task)
        self.progress.console.print(
            f"round {rnd}: {score_headline(metrics)}, up {metrics['bytes_up']} B, down {metrics['bytes_down']} B, "
            f"{metrics['wall_s']:.1f}s"
        )

    def on_message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}[/yellow]")


def _default_out(config: Path | None, method: str) -> Path:
    stem = config.stem if config else "default"
    return Path("runs") / f"{stem}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML (see configs/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key, e.g. --set data.alpha=0.1")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder (default runs/<config>-<method>-<time>)")] = (
        None
    ),
    no_export: Annotated[bool, typer.Option("--no-export", help="skip the PEFT adapter export")] = False,
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime",
            help="inprocess (one process) | flower (local SuperLink + SuperNodes on loopback, see docs/flower.md)",
        ),
    ] = "inprocess",
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="continue RUN_DIR from its last complete checkpoint, with its own config.toml (both runtimes; "
            "under flower the SuperNodes restore their state from RUN_DIR/flower/nodes)",
        ),
    ] = None,
) -> None:
    """Run one federated experiment (in-process engine, or a local Flower deployment) and write its run folder."""
    from celora.config import load_config
    from celora.data.partition import format_partition_table
    from celora.fl.simulation import Simulation, check_names, prepare
    from celora.fl.strategies import unused_keys
    from celora.report import clients_table, plot_accuracy, plot_weights, rounds_table, top_collaborators

    if runtime not in ("inprocess", "flower"):
        raise CeloraError(f"--runtime must be inprocess or flower, got {runtime!r}")
    if resume is not None:
        if config is not None or set_ or out is not None:
            raise CeloraError("--resume RUN_DIR uses the run's own config.toml and folder: drop CONFIG, --set, --out")
        if not (resume / "config.toml").is_file():
            raise CeloraError(f"--resume: {resume / 'config.toml'} not found (not a run folder)")
        if (resume / "summary.json").is_file():
            raise CeloraError(f"--resume: {resume} already finished (summary.json exists)")
        from celora.fl.run_folder import load_checkpoint

        ckpt = load_checkpoint(resume)
        if ckpt is None:
            raise CeloraError(f"--resume: {resume}: no complete checkpoint to resume from (checkpoints/ckpt-*.json)")
        resumed_from = ckpt.round
        config = resume / "config.toml"
    cfg = load_config(config, set_ or [])
    for line in unused_keys(cfg):
        err_console.print(f"warning: {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    cfg = check_names(cfg)
    out_dir = resume or out or _default_out(config, cfg.method)
    console.print(
        f"[bold]celora[/bold] {cfg.method} · model {cfg.model.name} · {cfg.num_clients} clients · "
        f"{cfg.rounds} rounds · data {cfg.data.source} · runtime {runtime}"
    )
    if resume is not None:
        console.print(f"resuming {resume} from its checkpoint of round {resumed_from} of {cfg.rounds}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    if runtime == "flower":
        from celora.fl.flower.runner import run_flower

        with progress:
            observer = RichObserver(progress, cfg.rounds)
            result = run_flower(cfg, out_dir, observer=observer, export=not no_export, resume=resume is not None)
    else:
        with console.status("loading data and model (offline)…"):
            prepared = prepare(cfg)
        from celora.fl.client import partition_report

        sim = Simulation(
            cfg,
            out_dir,
            observer=RichObserver(progress, cfg.rounds),
            prepared=prepared,
            export_adapters=not no_export,
            resume=resume is not None,
        )
        console.print(format_partition_table(partition_report(sim.infos, sim.clients[0].data.meta)))
        with progress:
            result = sim.run()
    console.print(rounds_table(result.rounds))
    console.print(clients_table(result.rounds[-1]))
    scheme = "sites" if cfg.data.sites else cfg.data.partition
    plot_accuracy(result.rounds, out_dir / "accuracy.png", title=f"{cfg.method} · {scheme}")
    weights = result.diagnostics.get("weights")
    if weights is not None:
        groups = result.rounds[-1].get("components", {})  # a task mixture: each client's component
        owner = {i: name for name, g in groups.items() for i in g["clients"]}
        comps = [owner[i] for i in range(len(owner))] if groups else None
        plot_weights(weights, out_dir / "weights.png", title=f"w_ij, round {cfg.rounds}", components=comps)
        tops = top_collaborators(weights)
        console.print(
            "top collaborators (client: partner w_ij …): "
            + "; ".join(f"{i}: " + ", ".join(f"{j} {w:.2f}" for j, w in pairs) for i, pairs in tops.items())
        )
    s = result.summary
    bpcr = s["bytes_per_client_round"]
    p = MetricSpec.of(s).primary
    majority = f"majority-label baseline {s['acc_majority']:.3f} · " if "acc_majority" in s else ""
    console.print(
        f"[bold]final[/bold]: {p} mean {s[f'{p}_mean']:.3f} · weighted {s[f'{p}_weighted']:.3f} · "
        f"worst-10% {s[f'{p}_worst10']:.3f} · global {s[f'{p}_global']:.3f} · {majority}"
        f"{bpcr['up']:.0f} B up / {bpcr['down']:.0f} B down per client-round · {s['wall_s']:.0f}s" + _task_extras(s)
    )
    if s.get("components"):
        from celora.report import components_frame
        from celora.tables import frame_rich

        console.print(frame_rich(components_frame(s), title="Per component (task mixture)"))
    if s.get("model_note"):
        console.print(f"note: {s['model_note']}")
    console.print(f"run folder: {out_dir}")


def _task_extras(s: dict[str, Any]) -> str:
    """Extra metrics of the final line: the task's own (e.g. exact match) and the zero-shot baseline."""
    p = MetricSpec.of(s).primary
    extras = [k for k in s if k.endswith("_mean") and k not in (f"{p}_mean", f"{p}_mean_agg")]
    text = "".join(f" · {k.removesuffix('_mean').replace('_', ' ')} {s[k]:.3f}" for k in extras)
    zs = s.get("zero_shot")
    if zs:
        text += " · zero-shot (no adapter): " + ", ".join(
            f"{k.removesuffix('_mean').replace('_', ' ')} {v:.3f}" for k, v in zs.items() if k.endswith("_mean")
        )
    return text


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="base experiment TOML")],
    methods: Annotated[
        str, typer.Option("--methods", help="comma-separated methods")
    ] = "celora,celora-global,fedit,local",
    seeds: Annotated[str, typer.Option("--seeds", help="comma-separated seeds")] = "0,1,2",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key for every cell")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="comparison folder (default runs/compare-<config>)")] = (
        None
    ),
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="extra column LABEL=METHOD;key=value;... (e.g. 'svd16=celora;model.rank=16')"),
    ] = None,
) -> None:
    """Run methods × seeds on identical partitions (resumable) and print the comparison table."""
    from celora.compare import (
        aggregate_rows,
        comparison_frame,
        parse_list,
        parse_seeds,
        parse_variants,
        run_comparison,
    )
    from celora.config import load_config
    from celora.fl.strategies import unused_keys
    from celora.tables import frame_rich

    base = load_config(config, set_ or [])
    variants = parse_variants(variant or [])
    method_list = parse_list(methods, "--methods")
    method_list += [label for label in variants if label not in method_list]
    used_by = [variants[m].method if m in variants else m for m in method_list]
    for line in unused_keys(base, list(dict.fromkeys(used_by))):
        err_console.print(f"warning: {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    seed_list = parse_seeds(seeds)
    out_dir = out or Path("runs") / f"compare-{config.stem}"
    total = len(method_list) * len(seed_list)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    with progress:
        cells = progress.add_task("cells", total=total)
        observers: list[RichObserver] = []

        def observer_for(method: str, seed: int) -> RichObserver:
            for ob in observers:  # drop the previous cell's bars
                progress.remove_task(ob.round_task)
                progress.remove_task(ob.client_task)
            observers.clear()
            progress.update(cells, description=f"cells (now {method}, seed {seed})")
            ob = RichObserver(progress, base.rounds)
            observers.append(ob)
            progress.advance(cells)
            return ob

        def on_skip(method: str, seed: int) -> None:
            progress.console.print(f"{method} seed {seed}: finished earlier, skipped")
            progress.advance(cells)

        rows = run_comparison(
            base, method_list, seed_list, out_dir, observer_for=observer_for, on_skip=on_skip, variants=variants
        )
    agg = aggregate_rows(rows, method_list)
    title = f"comparison: {len(seed_list)} seeds, identical partitions per seed"
    console.print(frame_rich(comparison_frame(agg), title=title))
    console.print(f"wrote {out_dir}/compare.csv, compare.md, compare.png")


@app.command()
def comm(
    model: Annotated[str, typer.Option("--model", help="zoo name, shape name (smollm2-135m, llama-7b) or HF folder")],
    rank: Annotated[int, typer.Option("--rank", help="adapter rank r")] = 8,
    targets: Annotated[
        str | None, typer.Option("--targets", help="comma-separated module names, or all-linear")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="wire precision fp32 | fp16 | int8")] = "fp32",
    num_labels: Annotated[
        int | None, typer.Option("--num-labels", help="K: add a K-class head where a method shares it")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Bytes per client-round of every method, from the model's shapes (meta device, no weights)."""
    import json

    from celora.compare import parse_list
    from celora.fl.comm import comm_context, comm_table

    if dtype not in ("fp32", "fp16", "int8"):
        raise CeloraError(f"--dtype must be fp32, fp16 or int8, got {dtype!r}")
    tg = parse_list(targets, "--targets") if targets else None
    rows = comm_table(model, rank, tg, dtype, num_labels)  # type: ignore[arg-type]
    ctx = comm_context(model, rank, tg)
    if as_json:
        console.print_json(json.dumps({"context": ctx, "methods": rows}))
        return
    t = Table(title=f"{model}: d={ctx['hidden']}, L={ctx['layers']}, r={rank}, {dtype}; per client-round, each way")
    cols = ["method", "travels", "numbers", "tensor bytes", "framing", "total", "fedit / this"]
    for col in cols + ([f"total with a {num_labels}-class head"] if num_labels else []):
        t.add_column(col, justify="right")
    for r in rows:
        ratio = f"{r['vs_fedit']:.0f}x" if r["vs_fedit"] else "-"
        cells = [r["method"], r["travels"], f"{r['params']:,}", f"{r['tensor_bytes']:,}", f"{r['framing_bytes']:,}"]
        cells += [f"{r['bytes_up']:,}", ratio]
        if num_labels:
            cells.append(f"{r['bytes_with_head']:,}" + (" (head shared)" if r["head_shared"] else ""))
        t.add_row(*cells)
    console.print(t)
    if not num_labels:
        console.print("adapters only; --num-labels K adds the classifier head where a method shares it by default")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="a run folder or a comparison folder")],
    html: Annotated[bool, typer.Option("--html", help="write report.html (self-contained) into the folder")] = False,
) -> None:
    """Print a run's tables again, or write one self-contained HTML page for a run or comparison."""
    from celora.report import clients_table, read_metrics, rounds_table, write_html_report

    if html:
        console.print(f"wrote {write_html_report(folder)}")
        return
    if any(folder.glob("*/seed_*/cell.json")):
        from celora.compare import aggregate_rows, comparison_cells, comparison_frame
        from celora.tables import frame_rich

        cells, methods = comparison_cells(folder)
        agg = aggregate_rows(cells, methods)
        console.print(frame_rich(comparison_frame(agg), title=f"comparison {folder.name}"))
        return
    if not (folder / "metrics.jsonl").is_file():
        raise CeloraError(f"{folder}: not a run folder (no metrics.jsonl)")
    rows = read_metrics(folder)
    console.print(rounds_table(rows))
    if rows:
        console.print(clients_table(rows[-1]))
    if rows and (folder / "zero_shot.json").is_file():
        from celora.report import zero_shot_frame
        from celora.tables import frame_rich

        console.print(frame_rich(zero_shot_frame(folder), title="Zero-shot → final (after aggregation), per client"))


@app.command("eval")
def eval_cmd(
    folder: Annotated[Path, typer.Argument(help="a run folder, or one client's adapter folder in it")],
    data: Annotated[
        str | None, typer.Option("--data", help="score on every row of this file (the run's columns/format)")
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="score the un-adapted base model instead")] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="override a config key, e.g. train.device=cpu")
    ] = None,
) -> None:
    """Score each client's exported adapter (reloaded with PEFT) with the task's metrics on its own test rows; a
    finished run folder's scores equal its summary.json's final metrics after aggregation."""
    from celora.fl.saved import evaluate_saved, summary_of
    from celora.report import saved_eval_frame
    from celora.tables import frame_rich

    res = evaluate_saved(folder, data_file=data, base=base, overrides=overrides)
    summary = None if (data or base) else summary_of(folder)
    console.print(frame_rich(saved_eval_frame(res.clients, summary), title=f"celora eval {folder}"))
    p = res.spec.primary
    line = " · ".join(f"{k.removesuffix('_mean')} {v:.4f}" for k, v in res.means.items())
    console.print(f"[bold]mean[/bold]: {line}")
    if summary is not None and f"{p}_mean_agg" in summary:
        console.print(f"summary.json: {p} mean after aggregation {summary[f'{p}_mean_agg']:.4f}")


@app.command()
def generate(
    folder: Annotated[Path, typer.Argument(help="a client's adapter folder (or a run folder: its first client)")],
    prompt: Annotated[str, typer.Option("--prompt", help="the user turn to answer")],
    system: Annotated[str, typer.Option("--system", help="an optional system instruction")] = "",
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="default: the run's")] = None,
) -> None:
    """Answer one prompt with a saved generative adapter (greedy, the run's chat template)."""
    from celora.fl.saved import generate_text

    console.print(generate_text(folder, prompt, system=system, max_new_tokens=max_new_tokens), markup=False)


@app.command("config")
def config_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON schema of an experiment config")] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print docs/configuration.md (the reference as Markdown)")
    ] = False,
) -> None:
    """Print every config key with its type, default and description (from the pydantic models)."""
    import json

    from celora.config import ExperimentConfig
    from celora.report import config_frame, config_markdown
    from celora.tables import frame_rich

    if as_json:
        print(json.dumps(ExperimentConfig.model_json_schema(), indent=2, ensure_ascii=False))
    elif markdown:
        print(config_markdown(), end="")
    else:
        console.print(frame_rich(config_frame().drop(columns="section"), title="celora configuration", left=4))


@app.command()
def attack(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML (model, data, lr; see configs/)")] = None,
    shared: Annotated[
        str, typer.Option("--shared", help="what travels: fedit|ffa|c-known|c-private|head|c+head|full")
    ] = "c+head",
    rank: Annotated[int | None, typer.Option("--rank", help="adapter rank (default: the config's)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="examples in the attacked batch")] = 1,
    fedavg: Annotated[bool, typer.Option("--fedavg", help="observe a local round (ΔC / (−η·steps)), not one step")] = (
        False
    ),
    local_steps: Annotated[int, typer.Option("--local-steps", help="local SGD steps with --fedavg")] = 4,
    samples: Annotated[
        int, typer.Option("--samples", help="batches attacked (from --client on, then the next clients)")
    ] = 10,
    iterations: Annotated[int, typer.Option("--iterations", help="steps of the optimisation attacks")] = 200,
    warm_steps: Annotated[int, typer.Option("--warm-steps", help="local steps before the attack (B ≠ 0)")] = 10,
    client: Annotated[int, typer.Option("--client", help="the (first) attacked client")] = 0,
    lm_prior: Annotated[
        str | None, typer.Option("--lm-prior", help="text: a zoo causal LM read as a prior (e.g. smollm2)")
    ] = None,
    lm_weight: Annotated[float, typer.Option("--lm-weight", help="weight λ of the prior's log-likelihood")] = 0.1,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key, e.g. --set model.max_length=32")] = (
        None
    ),
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default runs/attack-<shared>-<time>)")] = (
        None
    ),
) -> None:
    """Gradient inversion by an honest-but-curious server: attack.json, attack.md and a picture (docs/privacy.md)."""
    from celora.attack import attack_experiment, write_outputs
    from celora.config import load_config

    overrides = (set_ or []) + ([f"model.rank={rank}"] if rank is not None else [])
    cfg = load_config(config, overrides)
    out_dir = out or Path("runs") / f"attack-{shared.replace('+', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    with console.status(f"attacking {shared} · rank {cfg.model.rank} · batch {batch_size}…"):
        result, meta = attack_experiment(
            cfg,
            shared,
            batch_size=batch_size,
            fedavg=fedavg,
            local_steps=local_steps,
            samples=samples,
            iterations=iterations,
            warm_steps=warm_steps,
            client=client,
            lm_prior=lm_prior,
            lm_weight=lm_weight,
        )
    files = write_outputs(result, meta, out_dir)
    console.print(files[1].read_text(encoding="utf-8"))
    console.print("wrote " + ", ".join(str(f) for f in files))


@app.command()
def models() -> None:
    """List the offline model zoo."""
    from celora.models.zoo import ZOO

    t = Table(title="models")
    for col in ("name", "kind", "package", "description"):
        t.add_column(col)
    for e in ZOO.values():
        t.add_row(e.name, e.kind, e.package or "(built in code)", e.description)
    console.print(t)


@app.command()
def datasets() -> None:
    """List the shipped datasets (any CSV/JSONL/Parquet works via data.path)."""
    from celora.data.sources import DATASETS

    for name in sorted(DATASETS):
        console.print(name)


@app.command(
    "flower-sim",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def flower_sim(ctx: typer.Context) -> None:
    """`flwr run [APP] [ARGS…]` in Flower's simulation engine (APP default "."), with this environment's Flower
    binaries on PATH and runtime dependency installation off, e.g.
    `celora flower-sim . --federation-config "num-supernodes=4" --stream` (docs/flower.md)."""
    from celora.fl.flower.deploy import flwr_run

    raise typer.Exit(flwr_run(ctx.args))


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    console_log = logging.StreamHandler()
    console_log.setLevel(logging.WARNING)  # a run's INFO lines go to its celora.log, not the terminal
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[console_log])
    try:
        app(standalone_mode=False)
    except CeloraError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
