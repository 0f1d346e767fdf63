"""`skyferry land` as users run it: lag, throughput against `skyferry restore`, and a fleet.

    python -m benchmarks.land [--sites 3] [--files 1000] [--big 300MiB] [--stores azurite,moto]
        [--lag-objects 200] [--runs 5] [--only scale|throughput|lag ...] [--no-write]

Three measurements, each through the real CLI in a child process (peak RSS from wait4):

- **scale** (issue 16, acceptance 1): per store kind (Azurite, moto), a source container holding
  `--sites` sites' sealed objects (`--files` files each: one `--big` file on the first site,
  packs of small files, single files, MQTT batches, names in several scripts) is landed by
  `skyferry land --once` into a second container of the same emulator. Every file is compared
  byte for byte and by its metadata; the event log must hold exactly one event per file.
- **throughput** (acceptance 4): the same one-site data in a local folder, `skyferry restore --to`
  a folder and `skyferry land --once` into a `file://` destination, interleaved, `--runs` times
  each (this machine is shared and noisy: two runs each moved the ratio by 0.15); the ratio of
  median wall times and each one's peak RSS. Nothing is removed between runs (on ext4 without a
  journal, files freed seconds before slow down every creation that follows).
- **lag** (acceptance 2): `skyferry land` running with the default poll (2 s), one worker; a
  publisher puts `--lag-objects` sealed manifests one after another into the source (a folder,
  each written aside and renamed, as an object store makes a PUT visible), 2 to 8 a second. The
  lag of an object is its event's `landed_at` minus the moment its manifest became visible.

The sealed objects are made by tests/kits/restore.py (real keys, real encryption and signatures,
no daemon): the edge's upload path is measured by the link and ingest benchmarks, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.backends.protocol import Backend
from agent.config.units import parse_size
from agent.format.keys import load_edge_keys
from agent.format.manifest import KIND_MQTT_BATCH
from benchmarks.run import publish
from tests.kits.emulators import Emulator, new_cloud, start_azurite, start_moto
from tests.kits.restore import MTIME_NS, ROOT, CliRun, Cloud, Keys, make_keys, run_cli
from tests.kits.site import render_toml

MIB = 2**20
RSS_LIMIT = 256 * MIB
SCRIPTS = ["plain", "Überflug-ça", "日本語ファイル", "Карта", "خريطة", "नक्शा", "🛰️-data"]


@dataclass
class Expected:
    """What the destination must hold: key -> content hash and size, and per key its site."""

    # key -> sha256, size, site, source
    files: dict[str, tuple[str, int, str, str]] = field(default_factory=dict)
    bytes: int = 0

    def add(self, key: str, data: bytes, site: str, source: str) -> None:
        self.files[key] = (hashlib.sha256(data).hexdigest(), len(data), site, source)
        self.bytes += len(data)


def fleet_keys(folder: Path, sites: list[str]) -> list[Keys]:
    """One recipient for all sites; each site its own signing and dedup keys."""
    first = make_keys(folder / sites[0], sites[0])
    out = [first]
    for site in sites[1:]:
        own = make_keys(folder / site, site)
        pub = own.dir / "cloud" / "sites" / f"{site}.pub"
        (first.dir / "cloud" / "sites" / f"{site}.pub").write_bytes(pub.read_bytes())
        edge = load_edge_keys(first.dir / "edge" / "recipient.pub",
                              own.dir / "edge" / "site.key", own.dir / "edge" / "dedup.key")
        out.append(Keys(first.dir, edge, first.recipient))
    return out


def publish_site(cloud: Cloud, files: int, big: int, rng: random.Random,
                 want: Expected) -> None:
    """`files` files on one site: maybe one big file, packs, single files, MQTT batches."""
    site, left = cloud.site, files
    if big:
        data = b"".join(rng.randbytes(min(MIB, big - o)) for o in range(0, big, MIB))
        cloud.publish("survey/big.bin", data, chunk_size=4 * MIB)
        want.add(f"{site}/files/survey/big.bin", data, site, "files")
        left -= 1
    batches = max(1, files // 50)
    for i in range(batches):
        lines = b"".join(json.dumps({"topic": f"t/{i}", "payload": f"m{j} {SCRIPTS[j % 7]}"},
                                    ensure_ascii=False).encode() + b"\n" for j in range(40))
        name = f"20261125T12{i // 60:02d}{i % 60:02d}Z-{i:04d}"
        cloud.publish(name, lines, source="telemetry", kind=KIND_MQTT_BATCH)
        want.add(f"{site}/mqtt/telemetry/{name}.jsonl", lines, site, "telemetry")
    left -= batches
    singles = left // 10
    for i in range(singles):
        data = rng.randbytes(rng.randint(64 * 1024, 3 * MIB))
        name = f"{SCRIPTS[i % len(SCRIPTS)]}/single-{i}.bin"
        cloud.publish(name, data)
        want.add(f"{site}/files/{name}", data, site, "files")
    left -= singles
    while left > 0:
        n = min(left, 40)
        pack = [(f"{SCRIPTS[(left + j) % len(SCRIPTS)]}/logs/{left}-{j}.log",
                 rng.randbytes(rng.randint(200, 40_000))) for j in range(n)]
        cloud.publish_pack(pack)
        for name, data in pack:
            want.add(f"{site}/files/{name}", data, site, "files")
        left -= n


def land_config(path: Path, source: dict[str, Any], dest: dict[str, Any], keys: Keys,
                work: Path, **land: Any) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(render_toml({"source": source, "dest": dest,
                                 "land": {"key": str(keys.recipient_key),
                                          "work_dir": str(work), **land}}))
    return path


async def _upload(folder: Path, backend: Backend, parallel: int = 16) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()]
    sem = asyncio.Semaphore(parallel)

    async def one(p: Path) -> None:
        async with sem:
            await backend.put_if_absent(str(p.relative_to(folder)), p.read_bytes())

    await asyncio.gather(*(one(p) for p in files))
    return len(files)


async def _check(backend: Backend, want: Expected) -> list[str]:
    """Every expected file byte-identical with its metadata; one event per file."""
    problems: list[str] = []
    sem = asyncio.Semaphore(16)

    async def one(key: str, sha: str, size: int, site: str, source: str) -> None:
        async with sem:
            data = await backend.get(key)
            held = await backend.head(key)
        meta = held[1] if held else {}
        if hashlib.sha256(data).hexdigest() != sha or len(data) != size:
            problems.append(f"{key}: content differs")
        elif (meta.get("sha256"), meta.get("site"), meta.get("source"),
              meta.get("mtime")) != (sha, site, source, str(MTIME_NS)):
            problems.append(f"{key}: metadata {meta}")

    await asyncio.gather(*(one(k, *v) for k, v in want.files.items()))
    events: list[dict[str, Any]] = []
    async for info in backend.list("_skyferry/events/"):
        events += [json.loads(x) for x in (await backend.get(info.key)).decode().splitlines()]
    keys = [e["key"] for e in events]
    if sorted(keys) != sorted(want.files):
        problems.append(f"events: {len(keys)} for {len(want.files)} files, "
                        f"{len(keys) - len(set(keys))} duplicated")
    if len({e["id"] for e in events}) != len(events):
        problems.append("event ids are not unique")
    landed = {i.key async for i in backend.list("") if not i.key.startswith("_skyferry/")}
    if landed != set(want.files):
        problems.append(f"destination holds {len(landed - set(want.files))} unexpected and "
                        f"misses {len(set(want.files) - landed)} files")
    return problems


def scale(em: Emulator, work: Path, args: argparse.Namespace) -> tuple[str, bool]:
    sites = [f"site-{chr(97 + i)}" for i in range(args.sites)]
    keys = fleet_keys(work / "keys", sites)
    folder, want, rng = work / "sealed", Expected(), random.Random(16)
    for i, (site, k) in enumerate(zip(sites, keys, strict=True)):
        publish_site(Cloud(folder, k, site=site), args.files, args.big if i == 0 else 0,
                     rng, want)
    src, dst = new_cloud(work / "src", em), new_cloud(work / "dst", em)
    t = time.monotonic()
    objects = asyncio.run(_upload(folder, src.backend()))
    upload_s = time.monotonic() - t
    cfg = land_config(work / "land.toml", src.direct, dst.direct, keys[0], work / "stage")
    run = run_cli("land", "-c", str(cfg), "--once", "--json", "--no-progress", timeout=3600)
    problems = [f"exit {run.returncode}: {run.stderr.strip()[-300:]}"] if run.returncode else []
    if not problems:
        report = run.report
        if report["quarantined"]:
            problems.append(f"quarantined: {report['quarantined'][:3]}")
        problems += asyncio.run(_check(dst.backend(), want))
    ok = not problems and run.peak_rss <= RSS_LIMIT
    row = (f"| {em.kind} | {args.sites} × {args.files} | {len(want.files)} | "
           f"{want.bytes / MIB:.0f} MiB | {objects} | {upload_s:.0f} s | {run.seconds:.1f} s | "
           f"{want.bytes / MIB / run.seconds:.1f} MiB/s | {run.peak_rss / MIB:.0f} MiB | "
           f"{'byte-identical, one event each' if not problems else '; '.join(problems)[:300]} |")
    return row, ok


def throughput(work: Path, args: argparse.Namespace) -> tuple[list[str], bool]:
    keys = make_keys(work / "keys", "site-a")
    cloud, want = Cloud(work / "sealed", keys, site="site-a"), Expected()
    publish_site(cloud, args.files, args.big, random.Random(17), want)
    runs: dict[str, list[CliRun]] = {"restore": [], "land": []}
    for i in range(args.runs):
        out = work / f"restored-{i}"
        runs["restore"].append(run_cli("restore", "--backend", cloud.url, "--key",
                                       str(keys.recipient_key), "--to", str(out), "--json",
                                       "--no-progress", timeout=3600))
        cfg = land_config(work / f"land-{i}.toml", {"url": cloud.url},
                          {"url": f"file://{work / f'landed-{i}'}"}, keys, work / f"stage-{i}")
        runs["land"].append(run_cli("land", "-c", str(cfg), "--once", "--json",
                                    "--no-progress", timeout=3600))
    bad = [f"{verb} exit {r.returncode}: {r.stderr.strip()[-200:]}"
           for verb, rs in runs.items() for r in rs if r.returncode]
    med = {verb: statistics.median(r.seconds for r in rs) for verb, rs in runs.items()}
    rss = {verb: max(r.peak_rss for r in rs) for verb, rs in runs.items()}
    ratio = med["restore"] / med["land"]
    rows = [f"| `skyferry {verb}` | {' / '.join(f'{r.seconds:.1f}' for r in runs[verb])} s | "
            f"{want.bytes / MIB / med[verb]:.0f} MiB/s | {rss[verb] / MIB:.0f} MiB |"
            for verb in ("restore", "land")]
    rows.append(f"\nLand throughput = **{ratio:.2f}×** restore's (target ≥ 0.8×), land peak RSS "
                f"{rss['land'] / MIB:.0f} MiB (limit 256 MiB); {len(want.files)} files, "
                f"{want.bytes / MIB:.0f} MiB." + (f" Failed: {bad}" if bad else ""))
    return rows, not bad and ratio >= 0.8 and rss["land"] <= RSS_LIMIT


def lag(work: Path, args: argparse.Namespace) -> tuple[str, bool]:
    keys = make_keys(work / "keys", "site-a")
    # Manifests are filed under the date they are sent: today's folder, which polls look at.
    cloud = Cloud(work / "sealed", keys, site="site-a", clock=datetime.now(UTC))
    cloud.root.mkdir(parents=True)
    dest = work / "landed"
    cfg = land_config(work / "land.toml", {"url": cloud.url}, {"url": f"file://{dest}"}, keys,
                      work / "stage")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (work / "land.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "land", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    rng, visible = random.Random(18), {}
    try:
        time.sleep(3)  # the start-up backfill of an empty store
        for i in range(args.lag_objects):
            if i % 5 == 4:
                p = cloud.publish_pack([(f"p{i}/{j}.txt", rng.randbytes(3000)) for j in range(8)])
            else:
                p = cloud.publish(f"lag/{i}.bin", rng.randbytes(rng.randint(1000, 300_000)))
            visible[p.manifest.object_id] = time.time()
            time.sleep(rng.uniform(0.125, 0.5))
        deadline = time.monotonic() + 120
        landed: dict[str, float] = {}
        while time.monotonic() < deadline and len(landed) < len(visible):
            time.sleep(1)
            for f in (dest / "_skyferry" / "events").rglob("*.jsonl"):
                for line in f.read_text().splitlines():
                    e = json.loads(line)
                    t = datetime.fromisoformat(e["landed_at"]).timestamp()
                    landed[e["object_id"]] = max(landed.get(e["object_id"], 0.0), t)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    lags = sorted(landed[o] - t for o, t in visible.items() if o in landed)
    missing = len(visible) - len(lags)
    if missing:
        print((work / "land.log").read_text()[-3000:], file=sys.stderr)
    p50 = statistics.median(lags) if lags else float("inf")
    p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else float("inf")
    ok = not missing and p99 <= 5.0
    return (f"| {len(visible)} | {p50:.2f} s | {p99:.2f} s | {max(lags, default=0):.2f} s | "
            f"{missing} |"), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.land",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--files", type=int, default=1000, help="files per site")
    ap.add_argument("--big", type=parse_size, default=parse_size("300MiB"),
                    help="one file this big on the first site (0: none)")
    ap.add_argument("--stores", default="azurite,moto")
    ap.add_argument("--lag-objects", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5, help="throughput: runs of each, interleaved")
    ap.add_argument("--only", action="append", choices=("scale", "throughput", "lag"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    only = set(args.only or ("scale", "throughput", "lag"))
    command = "python -m benchmarks.land " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Landing (`skyferry land`)", "",
             f"`{command.strip()}` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} cores.", ""]
    verdicts: list[tuple[str, bool | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="sfy-land-") as tmp:
        work = Path(tmp)
        if "scale" in only:
            lines += ["Fleet landed by one `skyferry land --once`, source and destination in the "
                      "same emulator:", "",
                      "| store | sites × files | files | bytes | sealed objects | upload | land "
                      "| rate | peak RSS | result |", "|---|---|---|---|---|---|---|---|---|---|"]
            for kind in args.stores.split(","):
                (work / f"em-{kind}").mkdir()
                em = (start_azurite if kind == "azurite" else start_moto)(work / f"em-{kind}")
                try:
                    row, ok = scale(em, work / f"scale-{kind}", args)
                finally:
                    em.stop()
                lines.append(row)
                verdicts.append((f"scale {kind}", ok, row))
                print(row, flush=True)
            lines.append("")
        if "throughput" in only:
            lines += ["One site's data in a local folder, restore vs land (interleaved, "
                      f"{args.runs} runs each, ratio of the medians):", "",
                      "| command | wall (runs) | rate | peak RSS |", "|---|---|---|---|"]
            rows, ok = throughput(work / "throughput", args)
            lines += [*rows, ""]
            verdicts.append(("throughput", ok, rows[-1]))
        if "lag" in only:
            lines += ["Lag from a manifest becoming visible to its files landed (`skyferry land`, "
                      "default poll 2 s, one worker, folder to folder):", "",
                      "| objects | p50 | p99 | max | not landed |", "|---|---|---|---|---|"]
            row, ok = lag(work / "lag", args)
            lines += [row, "", f"Target: p99 ≤ 5 s — {'met' if ok else 'MISSED'}."]
            verdicts.append(("lag", ok, row))
    return publish("land", "\n".join(lines), not args.no_write, verdicts)


if __name__ == "__main__":
    sys.exit(main())
