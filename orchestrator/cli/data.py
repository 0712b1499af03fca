"""`vis4mer data ...`: write, import, check and inspect feature datasets."""
from __future__ import annotations

from vis4mer.orchestrator.cli.args import (
    Parser,
    add_storage_args,
    positive_float,
    positive_int,
    seed_int,
    storage_from_args,
)
from vis4mer.orchestrator.files import one_line


def _synth(a) -> int:
    from vis4mer.datasets.synthetic import write_synthetic

    m = write_synthetic(a.uri, task=a.task, videos=tuple(a.videos), frames=a.frames, tokens=a.tokens, dim=a.dim,
                        seed=a.seed, storage=storage_from_args(a), overwrite=a.overwrite,
                        shard_bytes=int(a.shard_mb * 2**20))
    print(f"wrote {one_line(a.uri)}: {m.task.name}, {m.split_rows()}, {len(m.shards)} shards")
    return 0


def _import_lvu(a) -> int:
    from vis4mer.datasets.lvu import import_lvu

    m, report = import_lvu(a.task, a.labels, a.features, a.out, storage=storage_from_args(a),
                           overwrite=a.overwrite, shard_bytes=int(a.shard_mb * 2**20))
    print(report.summary())
    print(f"wrote {one_line(a.out)}: {len(m.shards)} shards")
    return 0


def _verify(a) -> int:
    from vis4mer.datasets.format import verify

    r = verify(a.uri, storage_from_args(a))
    print(f"ok: {r['uri']}: {r['shards']} shards, {r['videos']} videos {r['splits']}: "
          "sizes, hashes and values check out")
    return 0


def _inspect(a) -> int:
    from vis4mer.datasets.format import open_dataset

    ds = open_dataset(a.uri, storage_from_args(a))
    print(ds.manifest.to_json())
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="feature datasets: synth, import-lvu, verify, inspect")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)

    s = dsub.add_parser("synth", help="write a synthetic long-range task as feature shards")
    s.add_argument("uri", help="output folder or object-store prefix")
    s.add_argument("--task", default="synthetic_order", choices=["synthetic_order", "synthetic_gap"])
    s.add_argument("--videos", type=positive_int, nargs=3, default=[512, 128, 128], metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--frames", type=positive_int, default=64)
    s.add_argument("--tokens", type=positive_int, default=4, help="tokens per frame")
    s.add_argument("--dim", type=positive_int, default=16, help="feature dim")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--shard-mb", type=positive_float, default=256.0)
    s.add_argument("--overwrite", action="store_true")
    add_storage_args(s)
    s.set_defaults(func=_synth)

    i = dsub.add_parser("import-lvu", help="convert released LVU .npy features + label CSVs of one task")
    i.add_argument("--task", required=True, help="relationship, way_speaking, scene, like_ratio, view_count, "
                                                 "director, genre, writer or year")
    i.add_argument("--labels", required=True, help="the lvu_1.0 folder (holding <task>/{train,val,test}.csv)")
    i.add_argument("--features", required=True, help="folder or prefix of <youtube_id>.npy files")
    i.add_argument("--out", required=True, help="output folder or object-store prefix")
    i.add_argument("--shard-mb", type=positive_float, default=512.0)
    i.add_argument("--overwrite", action="store_true")
    add_storage_args(i)
    i.set_defaults(func=_import_lvu)

    v = dsub.add_parser("verify", help="check sizes, sha256 hashes and every value against the manifest")
    v.add_argument("uri")
    add_storage_args(v)
    v.set_defaults(func=_verify)

    n = dsub.add_parser("inspect", help="print the manifest after checking sizes and schemas")
    n.add_argument("uri")
    add_storage_args(n)
    n.set_defaults(func=_inspect)
