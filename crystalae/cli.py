"""`crystalae` command line: thin parsers over typed functions that return their results.

This is the one module that composes the science core with `search` and `dashboard`; anything heavy
(ray, streamlit, torch) is imported inside the subcommand that needs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from crystalae.config import VoxelConfig, field_choices


def _add_voxel_options(parser: argparse.ArgumentParser) -> None:
    """One --option per VoxelConfig field, so the CLI never drifts from the dataclass."""
    group = parser.add_argument_group("voxelization (defaults: VoxelConfig)")
    group.add_argument("--voxel-config", type=Path, help="YAML file of VoxelConfig fields; options below override it")
    hints = typing.get_type_hints(VoxelConfig)
    for f in fields(VoxelConfig):
        flag = "--" + f.name.replace("_", "-")
        choices = field_choices(f.name)
        if hints[f.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"default {f.default}")
        else:
            kind = type(choices[0]) if choices else hints[f.name]
            group.add_argument(flag, type=kind, choices=choices or None, default=None, help=f"default {f.default}")


def voxel_config_from_args(args: argparse.Namespace) -> VoxelConfig:
    values: dict[str, Any] = {}
    if args.voxel_config is not None:
        import yaml

        values.update(yaml.safe_load(args.voxel_config.read_text()) or {})
    for f in fields(VoxelConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    return VoxelConfig.from_dict(values)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from crystalae.shards import PrepareOptions, prepare_dataset

    options = PrepareOptions(shard_size=args.shard_size, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, limit=args.limit)
    manifest = prepare_dataset(args.source, args.out, voxel_config_from_args(args), options,
                               workers=args.workers, overwrite=args.overwrite)
    counts = manifest["counts"]
    print(f"wrote {counts['rows']} rows from {counts['crystals']} of {counts['entries']} structures "
          f"into {len(manifest['shards'])} shards under {args.out} (splits {counts['splits']}); "
          f"{counts['rejected']} rejected" + (f", reasons in {Path(args.out) / 'rejects.csv'}" if counts["rejected"] else ""))
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from crystalae.roundtrip import metrics_path, roundtrip

    metrics = roundtrip(args.source, args.out, voxel_config_from_args(args), species=args.species,
                        workers=args.workers, limit=args.limit)
    print(format_metrics(metrics))
    print(f"wrote {args.out} and {metrics_path(Path(args.out))}")
    return 0


def format_metrics(metrics: dict[str, Any]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    rms = "n/a" if metrics.get("mean_rms") is None else f"{metrics['mean_rms']:.4g}"
    return (f"{metrics['n']} structures: match rate {pct(metrics['match_rate'])}, mean RMS {rms}, "
            f"composition {pct(metrics['composition_accuracy'])}, atom count {pct(metrics['atom_count_accuracy'])}"
            f" ({metrics.get('rejected_inputs', 0)} inputs rejected, {metrics.get('decode_failures', 0)} decode failures,"
            f" {metrics.get('seconds', 0)} s)")


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the built-in demo data: prepare shards, then the no-learning round trip."""
    from crystalae.roundtrip import roundtrip
    from crystalae.shards import PrepareOptions, prepare_dataset

    out = Path(args.out)
    config = VoxelConfig(grid=args.grid)
    manifest = prepare_dataset(f"demo:{args.count}", out / "data", config, PrepareOptions(shard_size=64),
                               workers=args.workers)
    print(f"dataset: {manifest['counts']['rows']} rows in {len(manifest['shards'])} shards at {out / 'data'}")
    metrics = roundtrip(f"demo:{args.count}", out / "roundtrip.csv", config, workers=args.workers)
    print("round trip (no learning): " + format_metrics(metrics))
    return 0


def load_train_yaml(path: Path | None) -> dict[str, Any]:
    """YAML with optional sections `train` (TrainConfig), `model` (ModelConfig fields), `preset`."""
    if path is None:
        return {}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"train", "model", "preset"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (allowed: train, model, preset)")
    return data


def cmd_train(args: argparse.Namespace) -> int:
    from crystalae.training import TrainConfig, best_checkpoint_path, train

    spec = load_train_yaml(args.config)
    train_values = dict(spec.get("train") or {})
    for key in ("epochs", "workers", "batch_size", "lr"):
        if getattr(args, key) is not None:
            train_values[key] = getattr(args, key)
    if args.gpu:
        train_values["use_gpu"] = True
    cfg = TrainConfig.from_dict(train_values)
    result = train(args.data, cfg, spec.get("model") or {}, storage=args.storage, name=args.name,
                   preset=args.preset or spec.get("preset"))
    if result.error:
        print(f"crystalae: training failed: {result.error}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float)}
    print(f"trained {metrics.get('epoch', -1) + 1} epochs; last validation: {shown}")
    print(f"best checkpoint: {best_checkpoint_path(result)}")
    return 0


def _load_model(args: argparse.Namespace):
    from crystalae.checkpoint import load_checkpoint

    import torch

    device = "cuda" if torch.cuda.is_available() and not getattr(args, "cpu", False) else "cpu"
    return load_checkpoint(args.checkpoint, device=device)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from crystalae.generate import reconstruct
    from crystalae.roundtrip import metrics_path

    metrics = reconstruct(_load_model(args), args.source, args.out, limit=args.limit)
    print(format_metrics(metrics))
    print(f"wrote {args.out} and {metrics_path(Path(args.out))}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from crystalae import generate

    loaded = _load_model(args)
    named: list = []
    if args.sample:
        named += [(f"sample-{i:04d}", s) for i, s in enumerate(generate.sample(loaded, args.sample, args.seed))]
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
    summary = generate.write_generated(args.out, named)
    print(f"wrote {summary['decoded']} of {summary['count']} crystals to {args.out}: structural validity "
          f"{100 * summary['structural_validity']:.1f}%, composition validity {100 * summary['composition_validity']:.1f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crystalae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="voxelize a structure source into Parquet shards")
    prep.add_argument("source", help="CDVAE-style CSV, folder of CIF/POSCAR/JSON, one file, or demo[:N]")
    prep.add_argument("--out", required=True, type=Path)
    prep.add_argument("--shard-size", type=int, default=256)
    prep.add_argument("--val-fraction", type=float, default=0.1)
    prep.add_argument("--test-fraction", type=float, default=0.1)
    prep.add_argument("--limit", type=int)
    prep.add_argument("--workers", type=int, help="processes (default: all cores)")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset built with other settings")
    _add_voxel_options(prep)
    prep.set_defaults(func=cmd_data_prepare)

    rt = sub.add_parser("roundtrip", help="voxelize and decode every structure (no learning) and score it")
    rt.add_argument("source")
    rt.add_argument("--out", required=True, type=Path, help="CSV of material_id,cif")
    rt.add_argument("--species", choices=("labels", "composition", "density"), default="labels",
                    help="where decoded atoms get their element from")
    rt.add_argument("--limit", type=int)
    rt.add_argument("--workers", type=int)
    _add_voxel_options(rt)
    rt.set_defaults(func=cmd_roundtrip)

    demo = sub.add_parser("demo", help="run the main job on the built-in demo data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--count", type=int, default=300)
    demo.add_argument("--grid", type=int, default=32)
    demo.add_argument("--workers", type=int)
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train the VAE + segmenter with Ray Train")
    tr.add_argument("--data", required=True, type=Path, help="dataset folder from `data prepare`")
    tr.add_argument("--config", type=Path, help="YAML with `train:` / `model:` sections and `preset:`")
    tr.add_argument("--preset", choices=("paper",), help="paper: Hoffmann et al. architecture")
    tr.add_argument("--workers", type=int, help="Ray Train workers")
    tr.add_argument("--gpu", action="store_true", help="one GPU per worker")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--storage", default="runs/train", help="results folder or pyarrow URI (s3://...)")
    tr.add_argument("--name", default="crystalae", help="run name; rerunning the same name resumes it")
    tr.set_defaults(func=cmd_train)

    rc = sub.add_parser("reconstruct", help="encode and decode a source with a trained model and score it")
    rc.add_argument("source")
    rc.add_argument("--checkpoint", required=True, type=Path)
    rc.add_argument("--out", required=True, type=Path)
    rc.add_argument("--limit", type=int)
    rc.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is present")
    rc.set_defaults(func=cmd_reconstruct)

    gen = sub.add_parser("generate", help="sample, interpolate or alter crystals with a trained model")
    gen.add_argument("--checkpoint", required=True, type=Path)
    gen.add_argument("--out", type=Path, default=Path("runs/generated"))
    gen.add_argument("--sample", type=int, default=0, metavar="N", help="N crystals from the prior")
    gen.add_argument("--interpolate", nargs=2, metavar=("ID_A", "ID_B"))
    gen.add_argument("--steps", type=int, default=5)
    gen.add_argument("--alter", metavar="ID")
    gen.add_argument("--scale", type=float, default=0.5, help="latent noise scale for --alter")
    gen.add_argument("--count", type=int, default=4, help="variants for --alter")
    gen.add_argument("--source", help="where --interpolate/--alter ids live (structure source)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cpu", action="store_true")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # our input errors subclass ValueError
        print(f"crystalae: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
