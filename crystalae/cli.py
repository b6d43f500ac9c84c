"""`crystalae` command line: thin parsers over typed functions that return their results.

This is the one module that composes the science core with `search` and `dashboard`; anything heavy
(ray, streamlit, torch) is imported inside the subcommand that needs it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from crystalae import __version__
from crystalae.cli_args import Parser, add_config_options, count, given, location, number
from crystalae.config import GENERATE_DEFAULTS as DEFAULTS
from crystalae.config import VoxelConfig
from crystalae.locations import DEMO, GENERATED, REGISTRY, SWEEPS, TRAIN
from crystalae.report_lines import format_composition_validity, format_distribution, format_metrics, format_sweep

__all__ = ["build_parser", "configure_logging", "main", "voxel_config_from_args"]

log = logging.getLogger("crystalae")

_DESCRIPTION = ("crystalae turns crystal structures into 3-D density grids, trains a variational autoencoder "
                "on them (Ray Train, Ray Tune sweeps) and generates new crystals with the trained models. "
                "Start with `crystalae demo`; run `crystalae COMMAND --help` for a command's options. "
                "--debug, -q, -v and --version work anywhere on the line.")
_VOXEL_HELP = {
    "representation": "cell: the unit cell in fractional coordinates (periodic, lattice kept alongside); "
                      "box: a fixed Cartesian cube (the paper's)",
    "grid": "voxels per edge (at most 128)",
    "sigma": "Gaussian width of each atom, in angstrom",
    "element_sigma": "scale sigma by each element's atomic radius relative to carbon's",
    "box_size": "edge of the box cube, in angstrom (box only)",
    "box_mode": "what fills the box: one centred unit cell, or the repeating lattice (box only)",
    "rotations": "random rotations per crystal (box only); 0 keeps the crystal unrotated",
    "label_radius": "voxels this close to an atom (angstrom) carry its atomic number",
    "cutoff_sigmas": "each Gaussian is summed out to this many sigma",
    "reduce": "cell reduction applied before voxelizing",
    "seed": "seed of the random rotations",
    "max_atoms": "crystals with more atoms are rejected (with the reason)",
}
_PREPARE_HELP = {
    "shard_size": "crystals per shard (box rotations multiply the rows)",
    "val_fraction": "share of the crystals in the validation split (drawn from a hash of the id: stable across runs)",
    "test_fraction": "share of the crystals in the test split",
    "limit": "use only the first N entries of the source (default: all)",
}
# TrainConfig fields with an option on `train` (the rest come from --config's `train:` section);
# --gpu sets use_gpu
_TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "grad_clip", "workers", "threads")
_TRAIN_HELP = {
    "epochs": "epochs to train (default {default}; with --from-trial: the sweep's budget)",
    "batch_size": "crystals per batch on each worker",
    "lr": "peak learning rate",
    "grad_clip": "clip the gradients' global norm to this before each step (default {default}: no clipping)",
    "workers": "Ray Train workers (data parallel)",
    "threads": "torch threads (= CPUs reserved) per worker (default {default}: cores / workers)",
}


def _command(sub, name: str, func, help: str) -> Parser:
    """A subcommand's parser, its --help opening with what it does."""
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.set_defaults(func=func)
    return parser


def _add_voxel_options(parser: argparse.ArgumentParser) -> None:
    """One --option per VoxelConfig field, so the CLI never drifts from the dataclass."""
    group = parser.add_argument_group("voxelization (defaults: VoxelConfig)")
    group.add_argument("--voxel-config", type=Path, help="YAML file of VoxelConfig fields; options below override it")
    add_config_options(group, VoxelConfig, helps=_VOXEL_HELP)


def voxel_config_from_args(args: argparse.Namespace) -> VoxelConfig:
    values: dict[str, Any] = {}
    if args.voxel_config is not None:
        from crystalae.files import read_yaml_mapping

        values.update(read_yaml_mapping(args.voxel_config, "--voxel-config"))
    values.update(given(args, [f.name for f in fields(VoxelConfig)]))
    return VoxelConfig.from_dict(values)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="dataset commands", description="Dataset commands.")
    _add_data_prepare(data.add_subparsers(dest="data_command", required=True))


def _add_data_prepare(sub) -> None:
    prep = _command(sub, "prepare", _cmd_data_prepare, "voxelize a structure source into Parquet shards")
    prep.add_argument("source", nargs="+", help="CDVAE-style CSV, folder of CIF/POSCAR/JSON, one file, or "
                      "demo[:N]; several are read as one dataset")
    prep.add_argument("--out", required=True, type=location, help="dataset folder or object-storage URI (s3://...)")
    prep.add_argument("--workers", type=count(1, 1024), help="processes (default: all cores)")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset built with other settings")
    prep.add_argument("--ray", action="store_true", help="build the shards as Ray Data tasks on a Ray cluster "
                      "(--out must be reachable from every node: s3://... or a shared mount)")
    prep.add_argument("--address", help="Ray cluster for --ray: auto (default), HOST:PORT, or local")
    prep.later(_add_prepare_options)
    prep.later(_add_voxel_options)  # after the dataset options


def _add_prepare_options(parser: argparse.ArgumentParser) -> None:
    """One --option per PrepareOptions field (added when `data prepare` is parsed: crystalae.shards loads pyarrow)."""
    from crystalae.shards import PrepareOptions

    group = parser.add_argument_group("dataset (defaults: PrepareOptions)")
    add_config_options(group, PrepareOptions, helps=_PREPARE_HELP, defaults=True)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from crystalae import uri_fs
    from crystalae.shards import DatasetError, PrepareOptions, prepare_dataset

    options = PrepareOptions(**given(args, [f.name for f in fields(PrepareOptions)]))
    if args.address and not args.ray:
        raise ValueError("--address names the Ray cluster for --ray: add --ray, or drop --address")
    config = voxel_config_from_args(args)  # every option is checked before the folder is touched
    source = args.source[0] if len(args.source) == 1 else args.source
    executor = None
    if args.ray:
        from crystalae.ray_shards import on_ray

        executor = on_ray(args.address or "auto")
    manifest = prepare_dataset(source, args.out, config, options, workers=args.workers, overwrite=args.overwrite,
                               executor=executor)
    counts = manifest["counts"]
    rejects = uri_fs.join(args.out, "rejects.csv")
    skipped = f", {counts['skipped']} skipped by --limit" if counts.get("skipped") else ""
    print(f"wrote {counts['rows']} rows from {counts['crystals']} of {counts['entries']} structures "
          f"into {len(manifest['shards'])} shards under {args.out} (splits {counts['splits']}); "
          f"{counts['rejected']} rejected{skipped}" + (f", reasons in {rejects}" if counts["rejected"] else ""))
    if counts["entries"] and not counts["rows"]:
        raise DatasetError(f"{args.out}: every one of the {counts['entries']} structures was rejected "
                           f"(reasons in {rejects}); nothing to train on")
    return 0


def _check_output_file(path: Path, option: str = "--out") -> Path:
    """Refuse an output that cannot be written before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name such as {path / 'out.csv'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{option} {path}: {path.parent} is a file, not a folder")
    return path


def _add_roundtrip(sub) -> None:
    rt = _command(sub, "roundtrip", _cmd_roundtrip, "voxelize and decode every structure (no learning) and score it")
    rt.add_argument("source", help="structure source: CDVAE-style CSV, folder of CIF/POSCAR/JSON, one file, or demo[:N]")
    rt.add_argument("--out", required=True, type=Path, help="CSV of material_id,cif (OUT.details.csv and "
                    "OUT.metrics.json are written beside it)")
    rt.add_argument("--species", choices=("labels", "composition", "density"), default="labels",
                    help="where decoded atoms get their element from")
    rt.add_argument("--limit", type=count(1), metavar="N", help="only the first N structures of the source")
    rt.add_argument("--workers", type=count(1, 1024), help="processes (default: all cores)")
    _add_voxel_options(rt)


def _cmd_roundtrip(args: argparse.Namespace) -> int:
    from crystalae.roundtrip import roundtrip

    _check_output_file(args.out)
    metrics = roundtrip(args.source, args.out, voxel_config_from_args(args), species=args.species,
                        workers=args.workers, limit=args.limit)
    _report_scored(metrics, args.out)
    return 0


def _report_scored(metrics: dict[str, Any], out: Path) -> None:
    """The figures of a roundtrip or reconstruct run and the three files it wrote (the console names each, so
    OUT.details.csv is no surprise); then `_refuse_if_all_rejected`."""
    from crystalae.roundtrip import details_path, metrics_path

    print(format_metrics(metrics))
    print(f"wrote {out}, {details_path(Path(out))} (per structure) and {metrics_path(Path(out))}")
    _refuse_if_all_rejected(metrics, out)


def _refuse_if_all_rejected(metrics: dict[str, Any], out: Path) -> None:
    """A run whose every input was refused did nothing it could score: one line with the first reason, exit 2."""
    from crystalae.roundtrip import details_path

    if metrics["entries"] and metrics["rejected_inputs"] == metrics["entries"]:
        many = f"every one of the {metrics['entries']} structures was" if metrics["entries"] > 1 else "the structure was"
        raise ValueError(f"{metrics['source']}: {many} rejected ({metrics['first_rejection']}); "
                         f"reasons in {details_path(Path(out))}")


def _add_demo(sub) -> None:
    demo = _command(sub, "demo", _cmd_demo, "run the main job on the built-in demo data")
    demo.add_argument("--out", type=Path, default=DEMO,
                      help=f"folder for the round trip and the generated crystals (default {DEMO})")
    # the sweep and its champion go where every other command looks by default, so that `generate --model
    # champion`, `models`, `crystalae.load("champion")` and `dashboard` find them with no flag
    demo.add_argument("--storage", type=Path, default=SWEEPS,
                      help=f"sweeps folder for the demo's sweep; a rerun resumes it (default {SWEEPS})")
    demo.add_argument("--registry", type=Path, default=REGISTRY,
                      help=f"registry the champion is promoted into (default {REGISTRY})")
    demo.add_argument("--workers", type=count(1, 1024), help="processes for the round trip (default: all cores)")


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the built-in demo data: round trip, sweep, promote the best, generate."""
    from crystalae.search.demo_job import run_demo

    run_demo(Path(args.out), args.storage, args.registry, args.workers)
    return 0


def _add_train(sub) -> None:
    tr = _command(sub, "train", _cmd_train, "train the VAE and its species reader with Ray Train")
    tr.add_argument("--data", type=location, help="dataset folder or URI from `data prepare`")
    tr.add_argument("--from-trial", metavar="SWEEP/TRIAL",
                    help="retrain a sweep trial's configuration (its voxel, model and train settings), recording "
                         "its lineage; --data defaults to the sweep's own shards for it")
    tr.add_argument("--sweeps", default=str(SWEEPS), help="with --from-trial: the sweeps folder or URI")
    tr.add_argument("--config", type=Path, help="YAML with `train:` / `model:` sections and `preset:`")
    tr.add_argument("--preset", choices=("paper",), help="paper: Hoffmann et al. architecture")
    tr.add_argument("--gpu", action="store_true", help="one GPU per worker")
    tr.add_argument("--storage", default=str(TRAIN), help="results folder or pyarrow URI (s3://...)")
    tr.add_argument("--mlflow", metavar="URI", help="also log the run to MLflow at this tracking URI, e.g. "
                    "sqlite:///mlflow.db (needs crystalae[tracking])")
    tr.add_argument("--name", help="run name; rerunning the same name resumes it (default: crystalae; "
                                  "with --from-trial: SWEEP-TRIAL)")
    tr.later(_add_train_options)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """The _TRAIN_OPTIONS from TrainConfig's fields (added when `train` is parsed: crystalae.training loads torch)."""
    from crystalae.config import TrainConfig

    group = parser.add_argument_group("training (override --config's `train:` section; defaults: TrainConfig)")
    add_config_options(group, TrainConfig, _TRAIN_OPTIONS, helps=_TRAIN_HELP)


def _cmd_train(args: argparse.Namespace) -> int:
    from crystalae.config import TrainConfig
    from crystalae.training import read_train_spec, train

    if args.from_trial is not None:
        return _retrain(args)
    if args.data is None:
        raise ValueError("train needs --data DIR (a prepared dataset) or --from-trial SWEEP/TRIAL")
    spec = read_train_spec(args.config)
    train_values = dict(spec.get("train") or {})
    train_values.update(given(args, _TRAIN_OPTIONS))
    if args.gpu:
        train_values["use_gpu"] = True
    cfg = TrainConfig.from_dict(train_values)
    started = time.time()
    result = train(args.data, cfg, spec.get("model") or {}, storage=args.storage,
                   name=args.name or "crystalae",  # --name '': the default, as promote's
                   preset=args.preset or spec.get("preset"), progress=True, mlflow=args.mlflow)
    return _report_training(result, started)


def _report_training(result, started: float) -> int:
    """The run's last lines: the epochs this command trained (a resumed run counts only its own, against all
    it has), the last validation figures and the best checkpoint."""
    from crystalae.training import best_checkpoint_path

    if result.error:
        print(f"crystalae: training failed: {result.error}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float)}
    record = _newest_record(result)
    # epochs this command trained: those that finished after it started (the history holds earlier runs' too)
    now = sum(1 for h in record.get("history") or [] if isinstance(h.get("finished_at"), (int, float))
              and h["finished_at"] >= started)
    done, total = metrics.get("epoch", -1) + 1, (record.get("train_config") or {}).get("epochs", "?")
    print(f"trained {now} epoch{'' if now == 1 else 's'}" + (f" ({done}/{total} in all)" if now != done else "")
          + f"; last validation: {shown}")
    print(f"best checkpoint: {best_checkpoint_path(result)}")
    return 0


def _newest_record(result) -> dict[str, Any]:
    """The newest checkpoint's config.json (history, train config) of a Ray result; {} without one."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        return {}
    import json

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/config.json") as handle:
        return json.loads(handle.read())


def _retrain(args: argparse.Namespace) -> int:
    """`train --from-trial SWEEP/TRIAL`: the trial's configuration at full budget, with its lineage."""
    from crystalae.search.retrain import retrain_trial

    if args.config or args.preset or args.batch_size is not None or args.lr is not None:
        raise ValueError("--from-trial takes the trial's own configuration: drop --config, --preset, --batch-size, --lr")
    # how the run trains, not what the trial found: these the command line may set
    overrides = {k: getattr(args, k) for k in ("workers", "threads", "grad_clip") if getattr(args, k) is not None}
    if args.gpu:
        overrides["use_gpu"] = True
    started = time.time()
    result = retrain_trial(args.sweeps, args.from_trial, epochs=args.epochs, data=args.data,
                           train_overrides=overrides, out=args.storage,
                           name=args.name, progress=True, mlflow=args.mlflow)
    return _report_training(result, started)


def _load_model(args: argparse.Namespace):
    from crystalae.loading import load_model

    if (args.checkpoint is None) == (getattr(args, "model", None) is None):
        raise ValueError("give exactly one of --checkpoint PATH or --model NAME[@VERSION]|ALIAS|PATH")
    loaded = load_model(args.checkpoint if args.checkpoint is not None else args.model, args.registry,
                        device="cpu" if getattr(args, "cpu", False) else None, symprec=getattr(args, "symprec", None))
    voxel, prior = loaded.voxel, loaded.meta.get("latent_prior")
    log.debug("model %s: epoch %s, latent %d, grid %d^3, sigma %.3g A, %s representation, on %s, prior %s",
              _model_ref(args), loaded.meta.get("epoch"), loaded.model_config.latent_dim, voxel.grid, voxel.sigma,
              voxel.representation, next(loaded.model.parameters()).device,
              prior.get("kind", "fitted") if isinstance(prior, dict) else "none")
    return loaded


def _model_ref(args: argparse.Namespace) -> str:
    """How the user named the model (recorded in outputs): the checkpoint path, the shipped name or the registry
    reference."""
    from crystalae.pretrained import pretrained_models

    if args.checkpoint is not None or Path(args.model).exists():
        return str(args.checkpoint if args.checkpoint is not None else args.model)
    if args.model in {m["name"] for m in pretrained_models()}:
        return f"{args.model} (shipped)"
    return f"{args.model} (registry {args.registry})"


def _add_model_options(parser: argparse.ArgumentParser, example: str = "") -> None:
    """--checkpoint or --model (+ --registry), read by _load_model, and --cpu."""
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder, e.g. pretrained/perov_5 (or give --model)")
    parser.add_argument("--model", help="a shipped model (perov_5, carbon_24), a registry model: NAME, "
                        "NAME@VERSION or an alias" + example + ", or a checkpoint path (as crystalae.load)")
    parser.add_argument("--registry", default=str(REGISTRY), help="registry folder or URI that --model names")
    parser.add_argument("--symprec", type=float, metavar="ANGSTROM",
                        help="snap decoded crystals to the space group they have within this many Å (default: "
                             "reconstructions at the model's own tolerance, chosen on its validation split, "
                             "samples raw; 0: raw decode)")


def _add_reconstruct(sub) -> None:
    rc = _command(sub, "reconstruct", _cmd_reconstruct, "encode and decode a source with a trained model and score it")
    rc.add_argument("source", help="structure source: CDVAE-style CSV, folder of CIF/POSCAR/JSON, one file, or demo[:N]")
    _add_model_options(rc)
    rc.add_argument("--out", required=True, type=Path, help="CSV of material_id,cif (OUT.details.csv and "
                    "OUT.metrics.json are written beside it)")
    rc.add_argument("--limit", type=count(1), metavar="N", help="only the first N structures of the source")
    rc.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is present")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from crystalae.reconstruct import reconstruct

    _check_output_file(args.out)
    metrics = reconstruct(_load_model(args), args.source, args.out, limit=args.limit, model_ref=_model_ref(args))
    _report_scored(metrics, args.out)
    return 0


def _add_generate(sub) -> None:
    gen = _command(sub, "generate", _cmd_generate, "sample, interpolate or alter crystals with a trained model")
    _add_model_options(gen, " such as champion")
    gen.add_argument("--out", type=Path, default=GENERATED,
                     help=f"folder for the CIFs and summary.csv/json (default {GENERATED})")
    gen.add_argument("--sample", type=count(0, 100_000), default=0, metavar="N", help="N crystals from the prior")
    gen.add_argument("--interpolate", nargs=2, metavar=("ID_A", "ID_B"),
                     help="decode the straight path between two --source crystals' latent codes")
    gen.add_argument("--steps", type=count(2, 1000), help="crystals along the --interpolate path, ends "
                     f"included (default {DEFAULTS.interpolate_steps})")
    gen.add_argument("--alter", metavar="ID", help="decode variants of this --source crystal: its latent code plus noise")
    gen.add_argument("--scale", type=number(0, 100), help=f"latent noise scale for --alter (default {DEFAULTS.alter_scale:g})")
    gen.add_argument("--count", type=count(1, 10_000), help=f"variants for --alter (default {DEFAULTS.alter_count})")
    gen.add_argument("--source", help="where --interpolate/--alter ids live (structure source)")
    gen.add_argument("--prior", choices=("auto", "fitted", "posterior", "normal"), default="auto",
                     help="--sample from the Gaussian fitted to the training codes (fitted), around the training "
                          "codes (posterior), or N(0, I) (normal); auto: the kind stored with the checkpoint's prior")
    gen.add_argument("--temperature", type=number(0, 10),
                     help="temperature of --sample: the Gaussian noise scale (default: the one stored with the prior; "
                          "1 for fitted and normal, 0.1 for posterior)")
    gen.add_argument("--seed", type=count(0, 2**63 - 1), default=DEFAULTS.seed, help="random seed of --sample and --alter")
    _add_generate_extras(gen)
    gen.add_argument("--overwrite", action="store_true", help="replace an earlier run's crystals in --out")
    gen.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is present")


def _add_generate_extras(gen: argparse.ArgumentParser) -> None:
    """generate's options that need an extra: --relax (crystalae[relax]) and --reference (crystalae[metrics])."""
    gen.add_argument("--relax", action="store_true",
                     help="relax each crystal (cell and positions) with the CHGNet potential before writing it: "
                          "physical local geometry (needs crystalae[relax]; ~8 s a small crystal per core)")
    gen.add_argument("--relax-steps", type=count(1, 10_000), metavar="N", help="most FIRE steps per crystal "
                     "(default 100)")
    gen.add_argument("--reference", metavar="SOURCE",
                     help="score the batch against these crystals: COV-R, COV-P, d_rho, d_elem as CDVAE "
                          "(needs crystalae[metrics]; compare batches of equal size)")
    gen.add_argument("--reference-limit", type=count(1), metavar="N", help="read only the first N reference crystals")
    gen.add_argument("--cutoffs", nargs=2, type=number(0, 1000), metavar=("STRUCT", "COMP"),
                     help="coverage cutoffs on the structure and composition fingerprints (default 0.2 4; "
                          "CDVAE: 0.2 4 for perov_5 and carbon_24, 0.4 10 for mp_20)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from crystalae import generate
    from crystalae.provenance import provenance as make_provenance
    from crystalae.search.training_set import training_set

    generate.check_generate_folder(args.out, args.overwrite)
    _check_generate_options(args)
    _check_generate_extras(args)
    loaded = _load_model(args)
    provenance: dict[str, Any] = {"provenance": make_provenance(_model_ref(args), seed=args.seed)}
    if args.sample:  # refused here, before any sampling, when the model has no prior for it
        from crystalae.prior import resolve_prior

        kind, temperature = resolve_prior(loaded, args.prior, args.temperature, str(args.checkpoint or "CKPT"))
        provenance["prior"] = {"kind": kind, "temperature": temperature}
        print(f"sampling {args.sample} latents from the {kind} prior at temperature {temperature:g}"
              + (" (the kind stored with the model)" if args.prior == "auto" else ""))
    started = time.monotonic()
    named, interrupted = _generated(args, loaded)
    log.debug("decoded %d crystals in %.1f s", len(named), time.monotonic() - started)
    if interrupted:
        provenance["interrupted"] = f"stopped by the user after {len(named)} of {args.sample} samples"
    elif args.relax:
        from crystalae.relax import relax

        relaxed, provenance["relaxation"] = relax([s for _, s in named], steps=args.relax_steps)
        named = [(name, s) for (name, _), s in zip(named, relaxed)]
        print(_relaxation_line(provenance["relaxation"], sum(s is not None for _, s in named)))
    reference = None
    if args.reference is not None and not interrupted:
        reference = generate.reference_structures(args.reference, args.reference_limit)
    summary = generate.write_generated(args.out, named, overwrite=args.overwrite, reference=reference,
                                       cutoffs=tuple(args.cutoffs), provenance=provenance,
                                       training=training_set(loaded),
                                       relaxation=provenance.get("relaxation", {}).get("per_crystal"))
    novelty = ("" if summary["novelty"] is None else f", {100 * summary['novelty']:.0f}% novel")
    print(f"wrote {summary['decoded']} of {summary['count']} crystals to {args.out}: structural validity "
          f"{100 * summary['structural_validity']:.1f}%, {format_composition_validity(summary)}, "
          f"{100 * summary['uniqueness']:.0f}% unique{novelty} (space groups and symmetrized CIFs"
          f"{', relaxed energies' if 'relaxation' in provenance else ''} in summary.csv)")
    if summary["novelty"] is None:
        print(summary["novelty_note"])
    if "distribution" in summary:
        print(f"against {len(reference)} reference crystals of {args.reference}: "
              + format_distribution(summary["distribution"]))
    if interrupted:
        print(f"crystalae: interrupted: kept the {len(named)} crystals decoded so far", file=sys.stderr)
        return 130
    if summary["count"] and not summary["decoded"]:  # a run that made nothing did not succeed
        print(f"crystalae: error: none of the {summary['count']} latents decoded to a crystal "
              f"(wrote only {args.out / 'summary.csv'} and summary.json)", file=sys.stderr)
        return 1
    return 0


def _relaxation_line(record: dict[str, Any], decoded: int) -> str:
    """What --relax did, crystals that could not be relaxed (written as decoded) counted apart."""
    failed = record.get("failed", 0)
    converged = record.get("converged")
    return (f"relaxed {record.get('relaxed', 0)} of {decoded} decoded crystals with {record.get('potential')}"
            + ("" if converged is None else f" ({converged} converged within {record.get('steps')} steps)")
            + (f"; {failed} could not be relaxed and are written as decoded" if failed else ""))


#: generate options that do something only with another: option -> (the option it belongs to, its default)
_GENERATE_NEEDS: dict[str, tuple[str, Any]] = {
    "temperature": ("sample", None), "steps": ("interpolate", DEFAULTS.interpolate_steps),
    "scale": ("alter", DEFAULTS.alter_scale), "count": ("alter", DEFAULTS.alter_count),
    "source": ("interpolate", None), "relax_steps": ("relax", 100), "reference_limit": ("reference", None),
    "cutoffs": ("reference", [0.2, 4.0]),
}


def _check_generate_options(args: argparse.Namespace) -> None:
    """Refuse an option that would be ignored without the one it belongs to (--relax-steps without --relax:
    the user meant something that would not happen), then fill in the defaults."""
    for option, (needs, default) in _GENERATE_NEEDS.items():
        given = getattr(args, option) is not None
        wanted = [needs, "alter"] if option == "source" else [needs]  # ids of --interpolate or --alter
        if given and not any(getattr(args, n) for n in wanted):
            flags = " or ".join(f"--{n}" for n in wanted)
            raise ValueError(f"--{option.replace('_', '-')} does something only with {flags}: add it, or drop "
                             f"--{option.replace('_', '-')}")
        if not given:
            setattr(args, option, default)


def _check_generate_extras(args: argparse.Namespace) -> None:
    """Refuse before any work when an option needs an extra that is not installed."""
    from crystalae.coverage import matminer_available
    from crystalae.relax import relax_available

    if args.reference is not None and not matminer_available():
        raise ValueError("--reference needs matminer for the coverage fingerprints: pip install 'crystalae[metrics]'")
    if args.relax and not relax_available():
        raise ValueError("--relax needs CHGNet: pip install 'crystalae[relax]'")


def _generated(args: argparse.Namespace, loaded) -> tuple[list[tuple[str, Any]], bool]:
    """(name, crystal) for every --sample, --interpolate and --alter crystal, and whether Ctrl-C stopped
    the sampling (the crystals decoded until then are kept)."""
    from crystalae import generate

    named: list = []
    if args.sample:
        try:
            sampled = generate.sample(loaded, args.sample, args.seed, args.prior, args.temperature)
        except generate.GenerationInterrupted as stop:
            return [(f"sample-{i:04d}", s) for i, s in enumerate(stop.structures)], True
        named += [(f"sample-{i:04d}", s) for i, s in enumerate(sampled)]
    if args.interpolate or args.alter:
        if args.source is None:
            raise ValueError("--interpolate and --alter need --source (where the ids are)")
        ids = list(args.interpolate or []) + ([args.alter] if args.alter else [])
        items = {it["material_id"]: it for it in generate.voxelized_source(loaded, args.source, ids=ids)}
        for mid, it in items.items():
            if "error" in it:
                raise ValueError(f"{mid}: {it['error']}")
        if args.interpolate:
            a, b = args.interpolate
            path = generate.interpolate(loaded, items[a]["density"], items[b]["density"], args.steps)
            named += [(f"interp-{k:02d}", s) for k, s in enumerate(path)]
        if args.alter:
            variants = generate.alter(loaded, items[args.alter]["density"], args.scale, args.count, args.seed)
            named += [(f"alter-{k:02d}", s) for k, s in enumerate(variants)]
    if not named:
        raise ValueError("nothing to generate: give --sample N, --interpolate ID_A ID_B or --alter ID")
    return named, False


def _add_fit_prior(sub) -> None:
    fp = _command(sub, "fit-prior", _cmd_fit_prior,
                  "fit the sampling prior of a checkpoint to its training set's latents")
    fp.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (left as it is: see --out)")
    fp.add_argument("--data", required=True, type=location, help="dataset folder or URI from `data prepare` (the model's own)")
    fp.add_argument("--split", default="train", choices=("train", "val", "test"),
                    help="dataset split whose latent codes are fitted (default train)")
    fp.add_argument("--out", required=True, type=Path, help="new checkpoint folder (weights copied, prior added)")
    fp.add_argument("--allow-other-data", action="store_true",
                    help="fit on a dataset other than the one the checkpoint was trained on (same voxel settings)")
    fp.add_argument("--kind", choices=("posterior", "fitted"), default="posterior",
                    help="how `generate` samples by default: around the training codes (posterior, better coverage) "
                         "or from the fitted Gaussian")
    fp.add_argument("--temperature", type=number(0, 10),
                    help="default sampling temperature stored with the prior (default: 0.1 posterior, 1 fitted)")


def _cmd_fit_prior(args: argparse.Namespace) -> int:
    from crystalae.prior import with_latent_prior

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # a checkpoint, a registry version...
        raise ValueError(f"--out {out} already exists: write the new checkpoint to a new folder "
                         "(checkpoints and registry versions are never rewritten)")
    info = with_latent_prior(args.checkpoint, args.data, out, split=args.split, temperature=args.temperature,
                             kind=args.kind, allow_other_data=args.allow_other_data)
    print(f"fitted a latent prior on {info['count']} {args.split} crystals of {args.data} "
          f"(|mean| {info['mean_norm']:.3g}, typical std {info['mean_std']:.3g}); samples by default from the "
          f"{info['kind']} prior at temperature {info['temperature']:g}; wrote {args.out}")
    return 0


def _add_sweep(sub) -> None:
    sw = _command(sub, "sweep", _cmd_sweep, "hyperparameter search with Ray Tune + Optuna")
    sw.add_argument("config", type=Path, help="sweep YAML (see search/configs/demo.yaml)")
    sw.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: a local Ray)")
    sw.add_argument("--name", help="override the sweep name")
    sw.add_argument("--resume", action="store_true",
                    help="continue a sweep whose driver stopped; with --trials N, extend an ended sweep to N trials")
    sw.add_argument("--trials", type=count(1, 100_000), help="trial budget (overrides the YAML's budget.trials)")
    sw.add_argument("--storage", default=str(SWEEPS),
                    help="results folder or object-storage URI (s3://bucket/sweeps); on a cluster, storage every node reaches")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from crystalae.search.config import load_sweep_config

    sweep = load_sweep_config(args.config, name=args.name)  # validated before Ray starts
    if args.trials is not None:
        sweep = dataclasses.replace(sweep, trials=args.trials)  # re-validated
    from crystalae.search.layout import sweep_dir
    from crystalae.search.sweep import run_sweep

    summary = run_sweep(sweep, storage=args.storage, address=args.address, resume=args.resume)
    print(format_sweep(summary))
    print(f"results in {sweep_dir(args.storage, sweep.name)}")
    return 0


def _add_promote(sub) -> None:
    pr = _command(sub, "promote", _cmd_promote, "copy a checkpoint into the model registry")
    pr.add_argument("source", help="RUN/TRIAL, a trial or checkpoint folder, or with --best a sweep name/folder")
    pr.add_argument("--best", action="store_true", help="pick the best checkpoint of the whole sweep")
    pr.add_argument("--metric", help="metric to rank by (default: the sweep objective)")
    pr.add_argument("--mode", choices=("min", "max"), help="whether --metric is better low or high "
                    "(default: the sweep objective's)")
    pr.add_argument("--within", type=number(0.0, 1e12), metavar="D",
                    help="with --best: among trials within D of the best objective, take the one best on --prefer")
    pr.add_argument("--prefer", metavar="METRIC[:MODE]",
                    help="with --within: what to prefer (default: the sweep's second objective), e.g. parameters:min")
    pr.add_argument("--fit-prior", action=argparse.BooleanOptionalAction,
                    help="fit the sampling prior on a sweep trial's own dataset first, so the version generates "
                         "(default: on for sweep trials; a checkpoint folder needs `crystalae fit-prior`)")
    pr.add_argument("--name", help="registry name (default: the sweep name)")
    pr.add_argument("--alias", help="alias to move to the new version, e.g. champion")
    pr.add_argument("--storage", default=str(SWEEPS), help="sweeps folder or URI (s3://...)")
    pr.add_argument("--registry", default=str(REGISTRY), help="registry folder or URI (s3://...)")


def _cmd_promote(args: argparse.Namespace) -> int:
    from crystalae.registry import Registry
    from crystalae.search.promote import promote_source

    entry = promote_source(args.source, Registry(args.registry), args.storage, best=args.best, name=args.name,
                           alias=args.alias, metric=args.metric, mode=args.mode, within=args.within,
                           prefer=args.prefer, fit_prior=args.fit_prior)
    print(f"promoted {entry['source']['checkpoint']} as {entry['ref']}" + (f" (alias {args.alias})" if args.alias else ""))
    return 0


def _add_alias(sub) -> None:
    al = _command(sub, "alias", _cmd_alias, "point a registry alias (e.g. champion) at an existing version")
    al.add_argument("alias", help="the alias, e.g. champion")
    al.add_argument("ref", help="NAME@VERSION (or NAME for its latest version)")
    al.add_argument("--registry", default=str(REGISTRY), help="registry folder or URI (s3://...)")


def _cmd_alias(args: argparse.Namespace) -> int:
    from crystalae.registry import Registry

    registry = Registry(args.registry)
    pinned = registry.set_alias(args.alias, args.ref)
    print(f"alias {args.alias} -> {pinned} ({registry.resolve(args.alias)})")
    return 0


def _add_models(sub) -> None:
    md = _command(sub, "models", _cmd_models, "list shipped reference models and registry models, versions and aliases")
    md.add_argument("--registry", default=str(REGISTRY), help="registry folder or URI (s3://...)")


def _cmd_models(args: argparse.Namespace) -> int:
    from crystalae.pretrained import pretrained_models
    from crystalae.registry import Registry, lineage_text

    for m in pretrained_models():
        shown = _format_figures({k: v for k, v in m["test"].items() if k in ("match_rate", "rms", "species_accuracy")})
        made = f"\n    from: {lineage_text(m)}" if m["lineage"] else ""
        if m["default_decoding"]:
            default = m["default_decoding"]
            figures = _format_figures({k: default[k] for k in ("match_rate", "rms")})
            shown = f"{figures} as it decodes by default ({default['decoding']}); raw decode {shown}"
        print(f"pretrained {m['name']}: --model {m['name']} (or --checkpoint {m['path']})  test: {shown}{made}")
    entries = Registry(args.registry).entries()
    if not entries:
        print(f"no models in {args.registry} yet (promote one with `crystalae promote`)")
    for e in entries:
        shown = _format_figures({k.removeprefix("val_"): v for k, v in e["metrics"].items()
                                 if k in _MODEL_FIGURES and isinstance(v, float)})
        aliases = f" [{', '.join(e['aliases'])}]" if e["aliases"] else ""
        print(f"{e['ref']}{aliases}  epoch {e['epoch']}  validation: {shown}\n    from: {lineage_text(e)}")
    return 0


_MODEL_FIGURES = ("val_match_rate", "val_rms", "val_species_accuracy", "val_recovery", "val_score")


def _format_figures(figures: dict[str, float]) -> str:
    """`match rate 61.5%, rms 0.0961` : rates (names ending in rate, accuracy, recovery) as percentages."""
    def shown(name: str, value: float) -> str:
        percent = name.endswith(("rate", "accuracy", "recovery"))
        return f"{name.replace('_', ' ')} {100 * value:.1f}%" if percent else f"{name.replace('_', ' ')} {value:.3g}"

    return ", ".join(shown(k, v) for k, v in figures.items()) or "no figures recorded"


def _add_dashboard(sub) -> None:
    db = _command(sub, "dashboard", _cmd_dashboard, "Streamlit app over sweeps and the registry")
    db.add_argument("--storage", default=str(SWEEPS), help="sweeps folder or URI (s3://...)")
    db.add_argument("--registry", default=str(REGISTRY), help="registry folder or URI (s3://...)")
    db.add_argument("--port", type=count(1, 65535), default=8501, help="port to serve on (default 8501)")
    db.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")


def _cmd_dashboard(args: argparse.Namespace) -> int:
    """Start the Streamlit app; it reads sweeps and the registry from disk (no Ray needed).

    The process becomes Streamlit (exec), so a SIGTERM or Ctrl-C reaches the server itself and
    nothing is left serving behind us.
    """
    import os

    from crystalae.dashboard.launch import launch_command

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"crystalae: warning: --host {args.host} serves the dashboard beyond this machine; anyone who "
              "can reach it can browse your results and promote models (there is no login)", file=sys.stderr)
    command = launch_command(str(args.storage), str(args.registry), port=args.port, host=args.host)
    print(f"dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="crystalae", description=_DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only: no warnings, progress lines or bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
    parser.add_argument("--version", action="version", version=f"crystalae {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for add in (_add_data, _add_roundtrip, _add_demo, _add_train, _add_reconstruct, _add_generate, _add_fit_prior,
                _add_sweep, _add_promote, _add_alias, _add_models, _add_dashboard):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # accepted anywhere on the line, not only before the subcommand
    flags = {"--debug", "-q", "--quiet", "-v", "--verbose"}
    debug = "--debug" in argv
    verbosity = sum(a in ("-v", "--verbose") for a in argv) - sum(a in ("-q", "--quiet") for a in argv)
    if "--version" in argv:
        argv = ["--version"]  # prints the version and exits, after any subcommand too
    args = build_parser().parse_args([a for a in argv if a not in flags])
    args.debug = debug
    configure_logging(verbosity)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("crystalae: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"crystalae: error: {_error_line(exc)}", file=sys.stderr)
        return 2


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a captured or redirected one too)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"crystalae: {level}{record.getMessage()}"


def configure_logging(verbosity: int = 0) -> None:
    """The `crystalae` logger to stderr: warnings and progress lines by default, only errors with -q,
    debug records with -v. -q also turns off progress bars (tqdm reads TQDM_DISABLE). Library code
    only logs; without this (in Python) the records follow the caller's logging setup."""
    logger = logging.getLogger("crystalae")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
    level = logging.ERROR if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger.setLevel(level)
    if verbosity < 0:
        os.environ["TQDM_DISABLE"] = "1"


def _error_line(exc: BaseException) -> str:
    """Our input errors (ValueError subclasses) speak for themselves; anything else gets its type
    named and a pointer to --debug."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ValueError) or (isinstance(exc, ImportError) and "pip install" in text):
        return text
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, MemoryError):
        return "out of memory: use a smaller --grid, --batch-size or fewer --workers"
    return f"unexpected {type(exc).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
