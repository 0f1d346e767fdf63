"""The fleet view as people read it: one row of cells per site (`cells`), as the HTML page the
lander serves (`render_html`) and the table `skyferry fleet` prints (agent/cli/fleet.py). Both
take the JSON of `FleetWatch.to_json`, so the page, the table and /fleet.json never disagree.
Plain server-rendered HTML: no script, a refresh every few seconds.
"""

from __future__ import annotations

from html import escape
from typing import Any

from agent.config.units import format_duration, format_size

COLUMNS = ("site", "status", "last contact", "backlog", "oldest queued", "disk free",
           "errors", "forecast", "version", "landed", "quarantined")
STATUS_TEXT = {"ok": "ok", "silent": "SILENT", "never": "NEVER HEARD"}
REFRESH_S = 5


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "now" if seconds < 1 else f"{format_duration(round(seconds))} ago"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(round(seconds))


def status_text(site: dict[str, Any]) -> str:
    text = str(STATUS_TEXT.get(site["status"], site["status"]))
    if not site["trusted"]:
        text += ", UNTRUSTED"
    return text


def backlog_by_class(site: dict[str, Any]) -> str:
    queue = site.get("queue") or {}
    return " ".join(f"{name}={q['objects']}/{format_size(q['bytes'])}"
                    for name, q in sorted(queue.items()) if q["objects"])


def cells(site: dict[str, Any]) -> dict[str, str]:
    """The display text of each column for one site."""
    heard = site.get("seq") is not None
    forecast = site.get("forecast") or {}
    ratio = forecast.get("hit_ratio")
    fc = "-" if ratio is None else f"{ratio:.0%} ({forecast.get('basis')})"
    if heard and ratio is None and forecast.get("basis") == "always":
        fc = "n/a (always on)"
    return {
        "site": site["site"],
        "status": status_text(site),
        "last contact": _age(site["last_contact_age_s"]) if heard else "never",
        "backlog": (f"{site['queued_objects']} obj, {format_size(site['queued_bytes'])}"
                    if heard else "-"),
        "oldest queued": _duration(site.get("oldest_queued_age_s")),
        "disk free": format_size(site["disk_free_bytes"]) if heard else "-",
        "errors": str(site["errors"]) if heard else "-",
        "forecast": fc,
        "version": site.get("software") or "-",
        "landed": "-" if site["landed_manifests"] is None else str(site["landed_manifests"]),
        "quarantined": "-" if site["quarantined"] is None else str(site["quarantined"]),
    }


def attention(data: dict[str, Any]) -> list[str]:
    """One line per site that needs a look: silent, never heard from, untrusted heartbeats."""
    out = []
    for s in data["sites"]:
        if s["status"] == "silent":
            out.append(f"{s['site']}: SILENT, last contact {_age(s['last_contact_age_s'])}")
        elif s["status"] == "never":
            out.append(f"{s['site']}: never heard from (no trusted heartbeat)")
        if s.get("key_problem"):
            out.append(f"{s['site']}: {s['key_problem']}")
        for u in s["untrusted"]:
            out.append(f"{s['site']}: heartbeat NOT TRUSTED: {u['key']}: {u['reason']}")
        if s.get("clock_ahead_s"):
            out.append(f"{s['site']}: its clock is {_duration(s['clock_ahead_s'])} ahead")
    return out


_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
.meta { color: #555; margin-bottom: 1em; }
.alert { background: #b00020; color: #fff; padding: .6em 1em; margin: .8em 0;
         font-weight: bold; border-radius: 4px; }
.alert ul { margin: .3em 0 0; padding-left: 1.3em; font-weight: normal; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: .45em .6em; text-align: left;
         vertical-align: top; white-space: nowrap; }
th { background: #eee; }
tr.silent td, tr.never td { background: #fde2e2; }
tr.untrusted td { background: #fff1c2; }
td.status { font-weight: bold; }
tr.silent td.status, tr.never td.status { color: #b00020; font-size: 1.1em; }
.classes { color: #555; font-size: .85em; }
.lander { display: flex; gap: 2em; margin: 1em 0; }
.lander div { background: #f4f6f8; padding: .5em .9em; border-radius: 4px; }
"""


def _lander_html(lander: dict[str, Any] | None) -> str:
    if lander is None:
        return ""
    lag = lander["lag_s"]
    p50 = "-" if lag["p50"] is None else f"{lag['p50']:.2f} s"
    p99 = "-" if lag["p99"] is None else f"{lag['p99']:.2f} s"
    parts = [("landed since start", f"{lander['files']} files, "
              f"{format_size(lander['bytes'])}"),
             ("lag p50 / p99", f"{p50} / {p99}"),
             ("quarantined since start", str(lander["quarantined"]))]
    return '<div class="lander">' + "".join(
        f"<div>{escape(k)}: <b>{escape(v)}</b></div>" for k, v in parts) + "</div>"


def render_html(data: dict[str, Any], lander: dict[str, Any] | None = None) -> str:
    rows = []
    for s in data["sites"]:
        c = cells(s)
        kind = s["status"]
        if kind == "ok" and not s["trusted"]:
            kind = "untrusted"
        tds = []
        for col in COLUMNS:
            text = escape(c[col])
            if col == "backlog" and (by := backlog_by_class(s)):
                text += f'<div class="classes">{escape(by)}</div>'
            cls = ' class="status"' if col == "status" else ""
            tds.append(f"<td{cls}>{text}</td>")
        rows.append(f'<tr class="{kind}" data-site="{escape(s["site"])}" '
                    f'data-status="{escape(s["status"])}">{"".join(tds)}</tr>')
    notes = attention(data)
    alert = ("" if not notes else '<div class="alert" id="attention">'
             f"{len(notes)} to look at:<ul>"
             + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul></div>")
    summary = data["summary"]
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>skyferry fleet</title><style>{_STYLE}</style></head><body>"
        "<h1>skyferry fleet</h1>"
        f'<div class="meta">{summary["sites"]} sites, {summary["silent"]} silent, '
        f'{summary["never"]} never heard from, {summary["untrusted"]} with untrusted '
        f'heartbeats; silent after {escape(_duration(data["silent_after_s"]))} without a '
        f'heartbeat. Generated {escape(data["generated"])}; landing figures as of '
        f'{escape(data["landing_refreshed"] or "-")}. '
        '<a href="fleet.json">fleet.json</a> · <a href="metrics">metrics</a></div>'
        f"{alert}{_lander_html(lander)}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "</body></html>\n")
