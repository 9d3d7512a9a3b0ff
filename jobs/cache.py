"""``pvu cache``'s command line: its flags and their help.

The job itself is :mod:`jobs.run.cache` (its config :mod:`jobs.run.cache_config`), imported
only when the command runs: torch, timm and Ray take seconds to import, ``--help`` none.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from jobs import names_of
from jobs.config import ConfigFile, job_config
from jobs.terminal import Verbose, console, reported, run_cli, setup_logging
from pipeline.named import counted


def cache(
    ctx: typer.Context,
    shards: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Required. Brace pattern (s3://b/train-{0000..2047}.tar), a "
            "directory or prefix of .tar (.tar.gz, .tgz) files, or a text file of URLs.",
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Required. timm model name, e.g. vit_base_patch16_224."),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Required. Cache root: a local path or any fsspec URL."),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            metavar="hub|random|FILE", help="Hub weights, random, or a safetensors/state-dict file."
        ),
    ] = "hub",
    model_kwargs: Annotated[
        str | None,
        typer.Option(
            metavar="JSON",
            help="Arguments of timm.create_model the weights were made with, as a JSON object, "
            'e.g. \'{"global_pool": "avg"}\' for a checkpoint fine-tuned with average pooling.',
        ),
    ] = None,
    label_remap: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="File mapping shard labels to the classifier's indices (JSON or one per line).",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Augmentation epochs to cache.")] = 1,
    augment: Annotated[
        Literal["train", "eval"],
        typer.Option(help="timm train transform, re-drawn per epoch; or eval transform, epoch 0."),
    ] = "train",
    seed: Annotated[
        int, typer.Option(help="Global seed; augmentations are a function of (seed, epoch, key).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per backbone forward.")] = 64,
    actors: Annotated[
        int | None,
        typer.Option(
            help="Backbone actors (default: as many as the cluster holds at once: one per GPU, "
            "or on CPU clusters one per node where the nodes are alike)."
        ),
    ] = None,
    gpus_per_actor: Annotated[
        float | None,
        typer.Option(help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)."),
    ] = None,
    cpus_per_actor: Annotated[
        float | None,
        typer.Option(
            help="CPUs per actor, above 0 (default: the GPU nodes' CPUs per GPU, the "
            "fewest; on CPU clusters the smallest node's CPUs); below 1, several actors "
            "share a core, each with its own backbone (warned of past the cluster's cores)."
        ),
    ] = None,
    image_key: Annotated[
        str | None,
        typer.Option(
            metavar="EXT",
            help="Image member extension, or several tried in order as jpg/png (or "
            "WebDataset's jpg;png) (default: jpg/jpeg/png/webp/bmp/gif/tif/tiff/ppm/pgm/pbm/pnm).",
        ),
    ] = None,
    label_key: Annotated[
        str,
        typer.Option(
            metavar="EXT[:FIELD]",
            help="Label member: its extension (a whole number from 0 as text: 3, 003, 3.0), or "
            "EXT:FIELD for such a field of a JSON member, e.g. json:label (dots for nested "
            "fields).",
        ),
    ] = "cls",
    ray_address: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Ray cluster to join: HOST:PORT, ray://..., auto (the one Ray finds running) or "
            "local (default: $RAY_ADDRESS, else a new local Ray on 127.0.0.1).",
        ),
    ] = None,
    dtype: Annotated[
        Literal["float16", "float32"], typer.Option(help="Stored embedding type.")
    ] = "float16",
    max_attempts: Annotated[
        int, typer.Option(help="Tries per unit before it counts as failed.")
    ] = 3,
    unit_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="A unit with no result after this long has its actor killed and is tried "
            "again (a hung read or device). Default: 10x the longest unit finished so far (for "
            "a larger shard, its bytes at the slowest rate per byte), at least 15 minutes; 2 "
            "hours for the first units.",
        ),
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(help="Square input size (default: the backbone's).")
    ] = None,
    crop_scale: Annotated[
        tuple[float, float],
        typer.Option(
            metavar="MIN MAX",
            help="Area fraction range of the train transform's random-resized crop.",
        ),
    ] = (0.08, 1.0),
    decode_workers: Annotated[
        int | None,
        typer.Option(
            help="Decode + augmentation processes per actor, 0 = a thread of the actor "
            "(default: 0 on CPUs, the actor's whole CPUs - 1, at least 1, on a GPU)."
        ),
    ] = None,
    decode: Annotated[
        Literal["pil", "device"],
        typer.Option(
            help="Where images are decoded and augmented: 'pil' (Pillow and timm's PIL steps on "
            "the actor's CPUs, or its --decode-workers) or 'device' (JPEGs decoded by nvJPEG "
            "and timm's transform run on the backbone's GPU; other formats by Pillow). Pixels "
            "differ slightly between the two, so a cache keeps one. 'device' is for GPU actors: "
            "on a CPU it runs, slower than 'pil'."
        ),
    ] = "pil",
    label_space: Annotated[
        Literal["classifier", "dataset"] | None,
        typer.Option(
            help="'classifier' (labels remapped into the classifier's classes, loss against "
            "them) or 'dataset' (every sample keeps its own label, loss null: downstream "
            "datasets). Default: classifier for --augment train, dataset for --augment eval."
        ),
    ] = None,
    ambiguity_key: Annotated[
        str | None,
        typer.Option(
            metavar="MEMBER",
            help="Shard member with a per-sample ambiguity for the 'ambiguity' column: a "
            "number, or a JSON soft label (list or object of class weights) read as "
            "1 - max/sum (default: none, the column is null).",
        ),
    ] = None,
    deteriorate: Annotated[
        str | None,
        typer.Option(
            metavar="KIND:STRENGTH",
            help="Deteriorate every image before the eval transform: KIND one of blur, box "
            "(grey box), zoom (centre crop), noise; STRENGTH 0 (none) to 1 (content all but "
            "gone), e.g. blur:0.5. Needs --augment eval and --decode pil.",
        ),
    ] = None,
    precision: Annotated[
        Literal["bf16", "fp32"],
        typer.Option(
            help="Backbone trunk on GPUs: bf16 (autocast) or fp32; CPUs run fp32. The classifier, "
            "loss, max_prob and entropy are always float32."
        ),
    ] = "bf16",
    also: Annotated[
        list[str] | None,
        typer.Option(
            metavar="BACKBONE,WEIGHTS,OUTPUT",
            help="Another backbone to cache from the same decode pass, as "
            "BACKBONE,WEIGHTS,OUTPUT (or BACKBONE,OUTPUT for hub weights); repeat for more. "
            "Each image is decoded once; each cache is what its own run would write.",
        ),
    ] = None,
    also_deteriorate: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KIND:STRENGTH,OUTPUT",
            help="A copy of this backbone's cache deteriorated by KIND:STRENGTH (as "
            "--deteriorate) into OUTPUT, from the same decode pass; repeat for more (figure 6: "
            "each kind at each strength in one run). Needs --augment eval and --decode pil; "
            "each cache is what --deteriorate KIND:STRENGTH --output OUTPUT alone would write. "
            "--also backbones get no copies.",
        ),
    ] = None,
    config: ConfigFile = None,
    verbose: Verbose = False,
) -> None:
    """Cache embeddings and per-sample losses of a frozen timm backbone over augmented epochs."""
    setup_logging(verbose)
    with reported(  # a Ctrl-C while torch and Ray import says so too
        "cache", verbose=verbose, resume="committed units are kept; the same command resumes"
    ):
        from jobs.run.cache import run_cache
        from jobs.run.cache_config import CacheJobConfig

        failures = len(run_cache(job_config(CacheJobConfig, ctx)).failed)
    if failures:
        console.print(
            f"[red]{counted(failures, 'unit')} failed permanently; re-run to retry them",
            markup=True,
        )
        raise typer.Exit(code=1)


__getattr__ = names_of("jobs.run.cache")


def main() -> None:
    """``python -m jobs.cache``."""
    run_cli(lambda: typer.run(cache), "cache")


if __name__ == "__main__":
    main()
