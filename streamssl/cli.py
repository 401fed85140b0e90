"""Command line: a thin Typer app. Parse, resolve the configuration, hand over to the stage that does the work."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from streamssl import __version__
from streamssl.config import DEBUG_ENV, DEFAULT_PROFILE, resolve
from streamssl.errors import StreamsslError, UsageError, exit_code

# The CLI framework's own exits (usage errors, --help, typer.Exit) pass through untouched.
_FRAMEWORK = tuple({typer.Exit, typer.Abort,
                    *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})


def _debug(ctx: typer.Context) -> bool:
    flag = bool(isinstance(ctx.obj, dict) and ctx.obj.get("debug"))
    return flag or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError | StreamsslError):  # errors raised on purpose, and the OS's: their text suffices
        return text
    return f"{type(exc).__name__}: {text} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"


class _Commands(TyperGroup):
    """Every command's failure as one ``error:`` line: exit 2 for usage and configuration errors, 1 for run-time
    failures (streamssl.errors); ``--debug`` or STREAMSSL_DEBUG=1 shows the traceback instead."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (*_FRAMEWORK, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `streamssl ... | head`: the reader left; nothing to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:
            if _debug(ctx):
                raise
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(exit_code(exc)) from None


app = typer.Typer(cls=_Commands, help="Continuous self-supervised pretraining of image encoders from an "
                  "unbounded image stream.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect run profiles.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures as JSON.", no_args_is_help=True)
shards_app = typer.Typer(help="Make and inspect WebDataset shards.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(shards_app, name="shards")

ProfileOpt = Annotated[str, typer.Option("--config", "-c", help="Run profile: a TOML file or a name in "
                                         "pipelines/ (cpu-small, fmnist-cpu, gpu-resnet50).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override one key, section.key=value; "
                                                  "repeatable. Applied after the profile and STREAMSSL_* env.")]


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error (also {DEBUG_ENV}=1).")]
          = False) -> None:
    ctx.obj = {"debug": debug}


def _config(profile: str, overrides: list[str] | None):
    return resolve(profile, overrides=overrides or [])


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


@app.command()
def version() -> None:
    """Print the streamssl version."""
    typer.echo(__version__)


@config_app.command("show")
def config_show(profile: Annotated[str, typer.Argument(help="Profile name or TOML path.")] = DEFAULT_PROFILE,
                overrides: SetOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False) -> None:
    """Print the resolved configuration: defaults < profile < STREAMSSL_* environment < --set."""
    cfg = _config(profile, overrides)
    typer.echo(json.dumps(cfg.to_dict(), indent=2) if as_json else cfg.to_toml())


def method_summary(cfg: Any) -> str:
    """The run's method and the one number that sizes it, for the start-up line."""
    method = cfg.learner.method
    if method == "swav":
        return f"SwAV, K={cfg.model.n_prototypes}" + (f", queue {cfg.learner.queue_length}"
                                                      if cfg.learner.queue_length else "")
    if method == "deepcluster":
        return f"DeepCluster-v2, {cfg.model.n_prototypes} centroids on a memory of {cfg.deepcluster.memory_length}"
    if method == "simclr":
        return f"SimCLR, T={cfg.simclr.temperature:g}"
    if method == "moco":
        return f"MoCo v2, queue {cfg.moco.queue_length}, momentum {cfg.moco.momentum:g}"
    if method == "byol":
        return f"BYOL, momentum {cfg.byol.momentum:g} -> {cfg.byol.final_momentum:g}"
    return f"NPID, memory {cfg.npid.memory_length}, {cfg.npid.negatives} negatives"


def replay_summary(cfg: Any) -> str:
    """The replay buffer, for the start-up line ("" without one)."""
    r = cfg.replay
    if r.policy == "none":
        return ""
    return (f", replay {r.policy} of {r.max_samples} samples / {r.max_bytes / 2**20:g} MiB, ratio {r.ratio:g} "
            f"from {r.min_fill}")


@app.command()
def run(profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None) -> None:
    """Run the daemon: shards -> multi-crop -> the method (learner.method, SwAV by default), with checkpoints,
    the prototype store and metrics, until run.max_steps / run.max_images / run.max_seconds or a signal.

    With no source.urls it streams the embedded demo images. Ctrl-C (SIGINT) or SIGTERM finishes the current
    step, writes a checkpoint and the prototypes, acks the consumed shards and exits 0; a second signal exits
    at once. Started again with the same checkpoint.dir, it resumes where it stopped.
    """
    _logging()
    cfg = _config(profile, overrides)
    from streamssl.distributed import world_from_env
    from streamssl.service.daemon import Daemon

    world = world_from_env()  # under torchrun: rank 0 speaks for the job
    echo = typer.echo if world.is_main else (lambda line: None)

    limits = [f"{n} {what}" for n, what in ((cfg.run.max_steps, "steps"), (cfg.run.max_images, "images"),
                                            (cfg.run.max_seconds, "seconds")) if n]
    echo(f"streamssl {__version__}: {cfg.model.arch}, batch {cfg.learner.batch_size}, views "
         f"{list(cfg.augment.n_views)}x{list(cfg.augment.sizes)} px, {method_summary(cfg)}{replay_summary(cfg)}; "
         f"{'stops after ' + ' or '.join(limits) if limits else 'runs until stopped'}"
         f"{'; ' + str(world.size) + ' ranks (torchrun), batch per rank' if world.distributed else ''}")
    echo(f"watch: the progress lines below, `{status_command(profile, cfg)}`, "
         f"`streamssl report {shlex.quote(cfg.checkpoint.dir)}` for PNG plots, and /metrics (address "
         "below). Stop: Ctrl-C or SIGTERM (checkpoints first); again to exit at once.")
    summary = Daemon(cfg, echo=typer.echo).run()
    bad = ", ".join(f"{k} {v}" for k, v in sorted(summary.bad_samples.items())) or "none"
    echo(f"stopped after {summary.steps} steps ({summary.images} images in this run, {summary.seconds:.0f} s); "
         f"last loss {summary.last_loss:.3f}; skipped steps {summary.skipped_steps}; bad samples: {bad}; "
         f"checkpoint {summary.checkpoint}")
    if summary.error is not None:  # stopped cleanly (checkpoint written) because of an error: report it
        raise summary.error


def status_command(profile: str, cfg: Any) -> str:
    """The ``streamssl status`` command that shows this run: its store and checkpoint folder, whatever
    overrides or environment chose them."""
    from streamssl.urls import redact

    parts = ["streamssl", "status", "--config", profile, "--set", f"checkpoint.dir={cfg.checkpoint.dir}"]
    if cfg.store.url:
        parts += ["--store", redact(cfg.store.url)]
    return shlex.join(parts)


@app.command()
def status(store: Annotated[str, typer.Option(help="redis://... of the run; default: the profile's store.url, "
                                              "or its local store under checkpoint.dir.")] = "",
           profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False) -> None:
    """Prototype version, step and age, each live learner's heartbeat, and the last checkpoint."""
    from streamssl.errors import RuntimeFailure
    from streamssl.store import format_status, open_store

    cfg = _config(profile, overrides)
    store_cfg = type(cfg.store)(**{**cfg.store.__dict__, "url": store or cfg.store.url})
    local_dir = os.path.join(cfg.checkpoint.dir, "store")
    if not store_cfg.url and not os.path.isdir(cfg.checkpoint.dir):
        raise RuntimeFailure(f"no run at checkpoint.dir {cfg.checkpoint.dir!r}: the folder does not exist; give the "
                             "run's folder (--set checkpoint.dir=...) or its Redis (--store redis://...)")
    backend = open_store(store_cfg, local_dir=local_dir)
    try:
        info = backend.status()
    finally:
        backend.close()
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else format_status(info))


@bench_app.command("learner")
def bench_learner(profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
                  steps: Annotated[int, typer.Option(min=1, help="Timed steps.")] = 10,
                  warmup: Annotated[int, typer.Option(min=0, help="Untimed steps first.")] = 2) -> None:
    """Learner step time, images/s and SwAV's share of the step, on pre-made tensors (JSON)."""
    cfg = _config(profile, overrides)
    from streamssl.tools.bench import bench_learner as bench

    typer.echo(json.dumps(bench(cfg, steps=steps, warmup=warmup)))


@bench_app.command("sinkhorn")
def bench_sinkhorn(profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
                   spread: Annotated[float, typer.Option(min=0, help="Noise around each row's prototype "
                                                         "(0.3: trained-like, 3: nearly random).")] = 1.0) -> None:
    """How far bfloat16 prototype scores move SwAV's codes against float32 ones, beside a float64 reference
    (JSON)."""
    cfg = _config(profile, overrides)
    from streamssl.devices import pick_device
    from streamssl.tools.bench import sinkhorn_precision

    typer.echo(json.dumps(sinkhorn_precision(cfg, device=pick_device(cfg.run.device), spread=spread)))


@bench_app.command("run")
def bench_run(profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
              steps: Annotated[int, typer.Option(min=2, help="Timed daemon steps.")] = 20,
              warmup: Annotated[int, typer.Option(min=1, help="Untimed steps first.")] = 5,
              minutes: Annotated[float, typer.Option(min=0, help="Run this long instead (memory growth check).")]
              = 0.0) -> None:
    """Daemon images/s on the real data path beside the learner's compute-bound images/s, their ratio, and
    resident memory after warm-up and at peak (JSON)."""
    _logging()
    cfg = _config(profile, overrides)
    from streamssl.tools.bench import bench_run as bench

    typer.echo(json.dumps(bench(cfg, steps=steps, warmup=warmup, minutes=minutes)))


@bench_app.command("augment")
def bench_augment(shards: Annotated[str, typer.Option(help="Shard pattern, e.g. 'data/shard-{000000..000009}.tar'.")],
                  backend: Annotated[str, typer.Option(help="dali or torchvision.")] = "dali",
                  batches: Annotated[int, typer.Option(min=1, help="Batches to time.")] = 20,
                  batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
                  profile: ProfileOpt = "gpu-resnet50", overrides: SetOpt = None) -> None:
    """Multi-crop throughput of a backend on real shards: images/s, views/s, bad samples by reason (JSON)."""
    cfg = _config(profile, overrides)
    from streamssl.augment.bench import bench_augment as bench

    typer.echo(json.dumps(bench(shards, backend, batches, cfg.augment, batch_size=batch_size)))


@shards_app.command("pack")
def shards_pack(src_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
                out_pattern: Annotated[str, typer.Argument(help="Output pattern with one %d field, "
                                                           "e.g. out/shard-%06d.tar.")],
                per_shard: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 1000,
                labels: Annotated[bool, typer.Option(help="Store the sub-folder name as a class index (.cls) "
                                                     "and write classes.json.")] = False,
                max_side: Annotated[int, typer.Option(min=0, help="Scale images down so that the longer side "
                                                      "is at most this (0: keep sizes). Decoding and "
                                                      "cropping cost scale with the stored pixels.")] = 0,
                ) -> None:
    """Pack a folder of images into WebDataset shards, each written atomically."""
    _logging()
    from streamssl.stream.pack import pack_shards

    written = pack_shards(src_dir, out_pattern, per_shard=per_shard, labels=labels, max_side=max_side)
    for path in written:
        typer.echo(str(path))


@app.command()
def ingest(urls: Annotated[list[str], typer.Argument(help="Shard URLs to announce.")],
           store: Annotated[str, typer.Option(help="Redis URL of the ingest stream, redis://host:port/db.")],
           stream_key: Annotated[str, typer.Option(help="Stream key the learners read.")] = "streamssl:shards",
           profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
           ) -> None:
    """Add shard URLs to the Redis ingest stream that learners consume (at least once). Each URL is checked
    first: an allowed scheme, and an existing file for a local path. TLS files: the profile's store.tls_*."""
    from streamssl.redis_client import TLSFiles
    from streamssl.stream.redis_source import publish_urls

    cfg = _config(profile, overrides)
    for entry in publish_urls(store, urls, stream_key=stream_key, tls=TLSFiles.of(cfg.store),
                              allow_pipe=cfg.source.allow_pipe):
        typer.echo(entry)


@app.command("eval")
def eval_(task: Annotated[str, typer.Argument(help="knn (weighted k-NN, k=20, T=0.07) or linear (logistic "
                                              "regression on frozen features).")],
          checkpoint: Annotated[str, typer.Option(help="A streamssl checkpoint, or 'pixels' for the raw-pixel "
                                                  "baseline.")],
          dataset: Annotated[str, typer.Option(help="fashion-mnist[:FOLDER], an image folder (one sub-folder per "
                                               "class; train/ and val/ inside for splits) or labeled shards.")],
          k: Annotated[int, typer.Option(min=1, help="Neighbours (knn).")] = 20,
          temperature: Annotated[float, typer.Option(min=1e-6, help="Vote temperature (knn).")] = 0.07,
          image_size: Annotated[int, typer.Option(min=0, help="Input side in pixels; 0: the run's global crop "
                                                  "size.")] = 0,
          limit_train: Annotated[int, typer.Option(min=0, help="Use at most this many training images.")] = 0,
          limit_test: Annotated[int, typer.Option(min=0, help="Use at most this many test images.")] = 0) -> None:
    """Accuracy of a frozen trunk on a labeled dataset: top-1, top-5 and image counts as JSON."""
    from streamssl.learner import evaluate as evaluation
    from streamssl.service.checkpoint import load_trunk

    if task not in ("knn", "linear"):
        raise UsageError(f"TASK {task!r}: knn or linear")
    if checkpoint == "pixels":
        trunk, size = None, image_size or 28
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    else:
        trunk, config = load_trunk(checkpoint)
        augment = config["augment"]
        size = image_size or int(augment["sizes"][0])
        mean, std = augment["mean"], augment["std"]
    train, test = evaluation.load_splits(dataset, limit_train=limit_train, limit_test=limit_test)
    result = evaluation.evaluate(task, trunk, train, test, size=size, mean=mean, std=std, k=k,
                                 temperature=temperature)
    typer.echo(evaluation.dumps({"checkpoint": checkpoint, "dataset": dataset, **result}))


@app.command("export")
def export_(checkpoint: Annotated[str, typer.Option(help="A streamssl checkpoint.")],
            out: Annotated[Path, typer.Argument(help="Output file (a .json with the metadata is written beside).")],
            fmt: Annotated[str, typer.Option("--format", help="torchvision (state dict for a plain torchvision "
                                             "ResNet), torchscript or onnx.")] = "torchvision") -> None:
    """Export the trained trunk for use outside streamssl."""
    from streamssl.tools.export import export

    meta = export(checkpoint, fmt, out)
    typer.echo(json.dumps({"out": str(out), **meta}))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="The run's checkpoint.dir (holding history.jsonl), or "
                                                    "the history file itself.")],
           out: Annotated[Path | None, typer.Option(help="Folder for the PNGs; default RUN_DIR/report.")] = None,
           ) -> None:
    """Draw PNG plots of loss, code entropy, prototypes in use, probe accuracy and throughput over time."""
    from streamssl.tools.report import draw

    for path in draw(run_dir, out):
        typer.echo(str(path))


def main() -> None:
    """The console script."""
    app(prog_name="streamssl")


if __name__ == "__main__":  # pragma: no cover
    main()
