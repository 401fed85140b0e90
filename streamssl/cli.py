"""Command line: a thin Typer app. Parse, resolve the configuration, hand over to the stage that does the work."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from streamssl import __version__
from streamssl.config import DEFAULT_PROFILE, ConfigError, resolve

app = typer.Typer(help="Continuous SwAV pretraining of image encoders from an unbounded image stream.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect run profiles.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures as JSON.", no_args_is_help=True)
shards_app = typer.Typer(help="Make and inspect WebDataset shards.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(shards_app, name="shards")

ProfileOpt = Annotated[str, typer.Option("--config", "-c", help="Run profile: a TOML file or a name in "
                                         "pipelines/ (cpu-small, gpu-resnet50).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override one key, section.key=value; "
                                                  "repeatable. Applied after the profile and STREAMSSL_* env.")]


def _config(profile: str, overrides: list[str] | None):
    try:
        return resolve(profile, overrides=overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


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


@app.command()
def run(profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None) -> None:
    """Run the daemon: shards -> multi-crop -> online SwAV, with checkpoints, the prototype store and metrics,
    until run.max_steps / run.max_images / run.max_seconds or a signal.

    With no source.urls it streams the embedded demo images. Ctrl-C (SIGINT) or SIGTERM finishes the current
    step, writes a checkpoint and the prototypes, acks the consumed shards and exits 0; a second signal exits
    at once. Started again with the same checkpoint.dir, it resumes where it stopped.
    """
    _logging()
    cfg = _config(profile, overrides)
    from streamssl.daemon import Daemon

    limits = [f"{n} {what}" for n, what in ((cfg.run.max_steps, "steps"), (cfg.run.max_images, "images"),
                                            (cfg.run.max_seconds, "seconds")) if n]
    typer.echo(f"streamssl {__version__}: {cfg.model.arch}, batch {cfg.learner.batch_size}, views "
               f"{list(cfg.augment.n_views)}x{list(cfg.augment.sizes)} px, K={cfg.model.n_prototypes}; "
               f"{'stops after ' + ' or '.join(limits) if limits else 'runs until stopped'}")
    typer.echo(f"watch: the progress lines below, `streamssl status --config {profile}`, "
               f"`streamssl report {cfg.checkpoint.dir}` for PNG plots, and /metrics (address below). "
               "Stop: Ctrl-C or SIGTERM (checkpoints first); again to exit at once.")
    try:
        summary = Daemon(cfg, echo=typer.echo).run()
    except RuntimeError as exc:  # configuration meets the world: a taken port, a foreign checkpoint
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    bad = ", ".join(f"{k} {v}" for k, v in sorted(summary.bad_samples.items())) or "none"
    typer.echo(f"stopped after {summary.steps} steps ({summary.images} images in this run, {summary.seconds:.0f} s); "
               f"last loss {summary.last_loss:.3f}; skipped steps {summary.skipped_steps}; bad samples: {bad}; "
               f"checkpoint {summary.checkpoint}")


@app.command()
def status(store: Annotated[str, typer.Option(help="redis://... of the run; default: the profile's store.url, "
                                              "or its local store under checkpoint.dir.")] = "",
           profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False) -> None:
    """Prototype version, step and age, each live learner's heartbeat, and the last checkpoint."""
    import os

    from streamssl.store import StoreError, format_status, open_store

    cfg = _config(profile, overrides)
    store_cfg = type(cfg.store)(**{**cfg.store.__dict__, "url": store or cfg.store.url})
    try:
        backend = open_store(store_cfg, local_dir=os.path.join(cfg.checkpoint.dir, "store"))
        info = backend.status()
        backend.close()
    except StoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else format_status(info))


@bench_app.command("learner")
def bench_learner(profile: ProfileOpt = DEFAULT_PROFILE, overrides: SetOpt = None,
                  steps: Annotated[int, typer.Option(min=1, help="Timed steps.")] = 10,
                  warmup: Annotated[int, typer.Option(min=0, help="Untimed steps first.")] = 2) -> None:
    """Learner step time, images/s and SwAV's share of the step, on pre-made tensors (JSON)."""
    cfg = _config(profile, overrides)
    from streamssl.bench import bench_learner as bench

    typer.echo(json.dumps(bench(cfg, steps=steps, warmup=warmup)))


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
    from streamssl.bench import bench_run as bench

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
    from streamssl.pack import pack_shards

    written = pack_shards(src_dir, out_pattern, per_shard=per_shard, labels=labels, max_side=max_side)
    for path in written:
        typer.echo(str(path))


@app.command()
def ingest(urls: Annotated[list[str], typer.Argument(help="Shard URLs to announce.")],
           store: Annotated[str, typer.Option(help="Redis URL of the ingest stream, redis://host:port/db.")],
           stream_key: Annotated[str, typer.Option(help="Stream key the learners read.")] = "streamssl:shards",
           ) -> None:
    """Add shard URLs to the Redis ingest stream that learners consume (at least once)."""
    from streamssl.source import publish_urls

    for entry in publish_urls(store, urls, stream_key=stream_key):
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
    from streamssl import eval as evaluation

    if task not in ("knn", "linear"):
        typer.echo("error: TASK must be knn or linear", err=True)
        raise typer.Exit(2)
    if checkpoint == "pixels":
        trunk, size = None, image_size or 28
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    else:
        trunk, config = evaluation.load_trunk(checkpoint)
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
    from streamssl.export import export

    meta = export(checkpoint, fmt, out)
    typer.echo(json.dumps({"out": str(out), **meta}))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="The run's checkpoint.dir (holding history.jsonl), or "
                                                    "the history file itself.")],
           out: Annotated[Path | None, typer.Option(help="Folder for the PNGs; default RUN_DIR/report.")] = None,
           ) -> None:
    """Draw PNG plots of loss, code entropy, prototypes in use, probe accuracy and throughput over time."""
    from streamssl.report import draw

    try:
        written = draw(run_dir, out)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for path in written:
        typer.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    app()
