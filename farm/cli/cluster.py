"""farm pools (the renderer pools of a running cluster) and farm cluster up|down|status|check
(Ray's cluster launcher on a cluster.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TextIO, cast

import typer
from rich.table import Table

from farm.cli.common import Format, FormatOpt, app, out, print_json, stdout


@app.command()
def pools(
    address: Annotated[str | None, typer.Option(help="The Ray cluster to look at.")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """The cluster's renderer pools: GPU type, VRAM, cost, nodes, renderers and what they do."""
    from farm import api

    rows = api.pools(address)
    if fmt is Format.json:
        print_json(rows)
        return
    table = Table()
    for column in ("pool", "gpu", "vram", "$/h", "slots", "nodes", "renderers", "busy"):
        table.add_column(column)
    for r in rows:
        busy = sum(bool(x["busy"]) for x in r["renderers"])
        table.add_row(
            r["pool"],
            r["gpu_type"] or "CPU",
            f"{r['vram_gb']:g} GB" if r["vram_gb"] else "-",
            f"{r['cost_per_hour']:g}",
            str(r["slots"]),
            str(len(r["nodes"])),
            str(len(r["renderers"])),
            str(busy),
        )
    out.print(table)


cluster_app = typer.Typer(
    help="Start, stop and inspect a Ray cluster from a cluster.yaml (Ray's cluster launcher).", no_args_is_help=True
)
ClusterConfigArg = Annotated[Path, typer.Argument(help="The cluster-launcher config.")]


def _launched(config, what: str) -> None:
    pools = ", ".join(
        f"{t.pool.name} ({t.pool.gpu_type} {t.pool.vram_gb} GB, ${t.pool.cost_per_hour:.2f}/h per slot, "
        f"{t.min_workers}–{t.max_workers} '{t.name}' nodes)"
        for t in config.node_types
    )
    out.print(f"cluster '{config.cluster_name}' {what}; pools: {pools}", markup=False, highlight=False)


@cluster_app.command("up")
def cluster_up(
    config: ClusterConfigArg = Path("cluster.yaml"),
    restart: Annotated[bool, typer.Option(help="Restart Ray on nodes that are already up.")] = True,
) -> None:
    """Check CONFIG, create the cluster's Ray token if missing, then 'ray up'. Workers of each pool
    are started by Ray's autoscaler when farm asks for them."""
    from farm import launcher

    _launched(launcher.up(config, restart=restart).config, "is up")
    out.print(
        f"next: ray attach {config}, then 'farm submit MANIFEST --address auto' on the head node "
        "(farm's image sets RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH for that shell)",
        markup=False,
        highlight=False,
    )


@cluster_app.command("down")
def cluster_down(config: ClusterConfigArg = Path("cluster.yaml")) -> None:
    """Terminate every node of the cluster ('ray down'). The catalog on the head goes with it unless
    FARM_CATALOG points at S3."""
    from farm import launcher

    _launched(launcher.down(config).config, "is down")


@cluster_app.command("status")
def cluster_status(config: ClusterConfigArg = Path("cluster.yaml")) -> None:
    """Ray's view of the cluster: nodes per type, resources in use, pending requests."""
    from farm import launcher

    launcher.status(config, echo=cast(TextIO, stdout))


@cluster_app.command("check")
def cluster_check(config: ClusterConfigArg = Path("cluster.yaml")) -> None:
    """Check CONFIG the way 'farm cluster up' does (Ray's schema, farm pools, token auth), offline."""
    from farm import launcher

    _launched(launcher.load_config(config), "config is valid")
